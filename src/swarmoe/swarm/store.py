"""The run journal: one SQLite file per run, every event appended and committed as it happens.

Resuming is replay. Agents are deterministic given their model responses and tool results,
and both are journaled under keys that depend only on the run's structure (agent path, step,
call index), never on timing. A resumed run executes the same code; a call whose key has a
recorded result takes that result instead of calling the model or the tool again.

Each event is committed before the run moves on (WAL, synchronous=NORMAL: survives a killed
process, which is the crash that matters here; an OS crash may lose the last events).
"""

from __future__ import annotations

import json
import os
import secrets
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY,
    t REAL NOT NULL,
    kind TEXT NOT NULL,
    agent TEXT NOT NULL,
    key TEXT,
    data TEXT NOT NULL
);
"""
# No AUTOINCREMENT and no index: rows are only appended (rowids stay in order) and only read
# whole, at resume or for a trace. Both cut an append from ~60 to ~15 us, and a run makes
# thousands of them on the event loop.


@dataclass
class Event:
    t: float
    kind: str
    agent: str
    key: str | None
    data: dict[str, Any]


def runs_dir(path: str | os.PathLike[str] | None = None) -> Path:
    """Where run journals live: the argument, else `$SWARMOE_RUNS_DIR`, else `./runs`."""
    return Path(path or os.environ.get("SWARMOE_RUNS_DIR") or "runs")


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)


class Journal:
    """Append-only event log of one run."""

    def __init__(self, path: Path, *, create: bool) -> None:
        if not create and not path.exists():
            raise FileNotFoundError(f"no journal for this run at {path}")
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)

    @classmethod
    def open(cls, run_id: str, directory: str | os.PathLike[str] | None = None, *,
             create: bool = False) -> Journal:
        if not run_id or "/" in run_id or run_id.startswith("."):
            raise ValueError(f"invalid run id {run_id!r}")
        return cls(runs_dir(directory) / f"{run_id}.sqlite", create=create)

    def set_meta(self, **values: Any) -> None:
        self._db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                             [(k, json.dumps(v)) for k, v in values.items()])

    def meta(self) -> dict[str, Any]:
        return {k: json.loads(v) for k, v in self._db.execute("SELECT key, value FROM meta")}

    def append(self, event: Event) -> None:
        self._db.execute("INSERT INTO events (t, kind, agent, key, data) VALUES (?, ?, ?, ?, ?)",
                         (event.t, event.kind, event.agent, event.key, json.dumps(event.data)))

    def results(self) -> dict[tuple[str, str], dict[str, Any]]:
        """Keyed events by (kind, key), for replay: `llm_response` and `tool_result` data are
        reused instead of redoing the work, and no keyed event is written twice."""
        rows = self._db.execute("SELECT kind, key, data FROM events WHERE key IS NOT NULL")
        return {(kind, key): json.loads(data) for kind, key, data in rows}

    def events(self) -> list[Event]:
        rows = self._db.execute("SELECT t, kind, agent, key, data FROM events ORDER BY seq")
        return [Event(t, kind, agent, key, json.loads(data)) for t, kind, agent, key, data in rows]

    def close(self) -> None:
        self._db.close()
