"""Tools for swarm tests that run in a child process (`swarmoe run --tool swarm_helpers:...`).

`lookup` appends each key to the file named by $SWARM_TOOL_LOG when it finishes, so a test can
count executions across a killed process and its resumed successor."""

from __future__ import annotations

import asyncio
import os

from swarmoe.testing.fake_model import WideLookup


async def lookup(key: str) -> str:
    """Look a key up in the slow store.

    Args:
        key: the key, like k3.14
    """
    await asyncio.sleep(float(os.environ.get("SWARM_TOOL_LATENCY", "0.3")))
    with open(os.environ["SWARM_TOOL_LOG"], "a") as log:
        log.write(key + "\n")
    return str(WideLookup.value(key))
