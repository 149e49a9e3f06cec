"""Durability: a run killed with SIGKILL resumes with `swarmoe run --resume` and finishes
without repeating a finished tool call or model call."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from swarmoe import Swarm, tool
from swarmoe.swarm import RunStopped
from swarmoe.testing import FakeModel
from swarmoe.testing.fake_model import WideLookup

TESTS = Path(__file__).parent


def finished_tool_calls(journal: Path) -> int:
    if not journal.exists():
        return 0
    db = sqlite3.connect(f"file:{journal}?mode=ro", uri=True)
    try:
        return db.execute("SELECT count(*) FROM events WHERE kind = 'tool_result' "
                          "AND data LIKE '%\"started\"%'").fetchone()[0]
    except sqlite3.OperationalError:  # tables not created yet
        return 0
    finally:
        db.close()


def test_sigkill_then_resume_repeats_no_finished_call(tmp_path):
    groups = 20
    work = WideLookup(groups=groups)
    fake = FakeModel(work.script, latency=0.3)
    log = tmp_path / "executed.log"
    # Secrets are not journaled: the resumed process finds the key in the environment.
    env = {**os.environ, "SWARM_TOOL_LOG": str(log), "SWARM_TOOL_LATENCY": "0.3",
           "OPENAI_API_KEY": "test",
           "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    runs = tmp_path / "runs"
    journal = runs / "crash-1.sqlite"
    with fake.serve() as url:
        first = subprocess.Popen(
            [sys.executable, "-m", "swarmoe", "run", work.task, "--model", "fake",
             "--base-url", url, "--api-key", "test", "--tool", "swarm_helpers:lookup",
             "--run-id", "crash-1", "--runs-dir", str(runs), "--json", "--no-live"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while finished_tool_calls(journal) < 100:  # of 300: kill mid-way
            assert first.poll() is None, first.communicate()
            assert time.monotonic() < deadline, "the run never got going"
            time.sleep(0.02)
        first.send_signal(signal.SIGKILL)
        first.wait()
        done_before = log.read_text().split()
        assert 100 <= len(done_before) < groups * 15

        second = subprocess.run(
            [sys.executable, "-m", "swarmoe", "run", "--resume", "crash-1", "--runs-dir",
             str(runs), "--json", "--no-live"],
            env=env, capture_output=True, text=True, timeout=120)
    assert second.returncode == 0, second.stderr
    out = json.loads(second.stdout)
    assert out["answer"] == work.expected_answer()
    executed = Counter(log.read_text().split())
    assert sorted(executed) == sorted(k for g in range(groups) for k in work.keys(g))
    assert max(executed.values()) == 1, [k for k, n in executed.items() if n > 1]
    stats = out["stats"]
    assert stats["tool_calls"] == groups * 15
    assert stats["total_steps"] == 3 + groups * 4
    assert stats["critical_steps"] == 7
    assert stats["replayed"] >= len(done_before)
    # Every model call was answered into the journal exactly once across both processes.
    db = sqlite3.connect(journal)
    keys = [k for (k,) in db.execute("SELECT key FROM events WHERE kind = 'llm_response'")]
    assert len(keys) == len(set(keys)) == stats["total_steps"]


async def test_stopped_run_resumes_in_process_without_redoing_work(tmp_path):
    work = WideLookup(groups=10, tool_latency=0.2)
    fake = FakeModel(work.script, latency=0.2)
    swarm = Swarm(fake.backend(), tools=[tool(work.lookup)], runs_dir=tmp_path, deadline=1.5)
    try:
        await swarm.run(work.task, run_id="r1")
        raise AssertionError("the deadline should have stopped the run")
    except RunStopped as e:
        assert "deadline" in e.reason
        assert 0 < e.result.stats.tool_calls < 150
    done_first = Counter(work.executed)
    swarm.deadline = None
    result = await swarm.resume("r1")
    assert result.answer == work.expected_answer()
    assert set(work.executed.values()) == {1}, "a finished tool call ran again"
    assert result.stats.replayed >= sum(done_first.values())
    assert result.stats.tool_calls == 150
    # Calls answered before the stop are not sent again: the model answered each step once.
    assert fake.counts["ok"] == result.stats.total_steps
