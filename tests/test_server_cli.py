"""`swarmoe serve` as users start it (loopback by default, key from the environment), in a
subprocess (`swarmoe demo`: test_demo.py)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import psutil
import pytest

from swarmoe.testing import make_tiny_checkpoint

SWARMOE = str(Path(sys.executable).with_name("swarmoe"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("cli") / "tiny-cli", seed=4)


def test_serve_binds_loopback_and_enforces_the_key(checkpoint):
    port = free_port()
    env = {**os.environ, "SWARMOE_API_KEY": "sk-cli"}
    proc = subprocess.Popen([SWARMOE, "serve", "--model", str(checkpoint), "--port", str(port),
                             "--served-model-name", "kimi-tiny", "--log-level", "warning"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.2)
        listening = [c.laddr for c in psutil.Process(proc.pid).net_connections(kind="inet")
                     if c.status == psutil.CONN_LISTEN]
        assert listening and all(addr.ip == "127.0.0.1" for addr in listening), listening
        url = f"http://127.0.0.1:{port}/v1"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url, api_key="wrong", max_retries=0).models.list()
        client = openai.OpenAI(base_url=url, api_key="sk-cli", max_retries=0)
        assert [m.id for m in client.models.list()] == ["kimi-tiny"]
        r = client.chat.completions.create(model="kimi-tiny", max_tokens=3,
                                           messages=[{"role": "user", "content": "hi"}])
        assert r.usage.completion_tokens <= 3
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_serve_refuses_a_missing_checkpoint(tmp_path):
    r = subprocess.run([SWARMOE, "serve", "--model", str(tmp_path / "nope")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "Traceback" not in r.stderr and "--model" in r.stderr
