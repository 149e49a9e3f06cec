"""`swarmoe demo` (the random-weight plumbing mode, and the trained-model mode on a tiny random
checkpoint for its plumbing) and `benchmarks/swarm_mini.py --quick`, each in a subprocess. The
trained model's grades are asserted in test_swarmoe_mini.py, not here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from swarmoe.testing import make_tiny_checkpoint

SWARMOE = str(Path(sys.executable).with_name("swarmoe"))
REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("demo") / "tiny", seed=5,
                                max_position_embeddings=16384)


def test_random_demo_runs_and_says_it_is_noise(tmp_path):
    r = subprocess.run([SWARMOE, "demo", "--random", "--dir", str(tmp_path / "demo"),
                        "--max-tokens", "6"], capture_output=True, text=True, timeout=180, env=ENV)
    assert r.returncode == 0, r.stderr
    assert "RANDOM weights" in r.stdout and "noise" in r.stdout
    assert "name=get_weather" in r.stdout


def test_trained_demo_runs_every_part_on_a_checkpoint_path(checkpoint, tmp_path):
    r = subprocess.run([SWARMOE, "demo", "--model", str(checkpoint), "--dir", str(tmp_path),
                        "--entities", "4", "--attributes", "2", "--max-tokens", "6",
                        "--report-pages", "30", "--single-deadline", "30", "--deadline", "60"],
                       capture_output=True, text=True, timeout=240, env=ENV)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "seed 2147" in out and "item-F1" in out and "row-F1" in out
    assert "single agent" in out and "single / swarm wall time" in out
    assert "long-document recipe" in out
    assert "swarmoe serve" in out and "/v1" in out and "Demo done" in out


def test_demo_names_a_missing_checkpoint_without_a_traceback(tmp_path):
    r = subprocess.run([SWARMOE, "demo", "--model", "no-such-model", "--dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=60, env=ENV)
    assert r.returncode != 0 and "Traceback" not in r.stderr and "--model" in r.stderr


def test_swarm_mini_benchmark_quick_writes_its_record(checkpoint, tmp_path):
    out = tmp_path / "swarm_mini.jsonl"
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "swarm_mini.py"), "--quick",
                        "--model", str(checkpoint), "--max-tokens", "6", "--dir", str(tmp_path),
                        "--out", str(out)], capture_output=True, text=True, timeout=240, env=ENV)
    assert r.returncode == 0, r.stderr
    record = json.loads(out.read_text().splitlines()[-1])
    assert record["benchmark"] == "swarm_mini" and record["quick"] is True
    ws = record["widesearch"]
    for row in ws["by_entities"].values():
        assert {"tasks", "item_f1", "row_f1", "exact", "subagents", "critical_steps",
                "wall_s", "stopped"} <= set(row)
    assert all(run["seed"] >= 2**31 for run in ws["runs"])
    versus = ws["swarm_vs_single"]
    assert {"swarm", "single", "single_over_swarm_wall", "single_wall_is_lower_bound"} <= set(versus)
    assert {"steps", "mean_batch", "max_batch", "batch_hist", "prefix_hit_rate"} <= set(ws["engine"])
    assert {"cited_recall", "precision", "recall", "runs"} <= set(record["reports"])
    assert {"emitted", "well_formed", "rate"} <= set(record["tool_calls"])
    assert "item-F1" in r.stdout  # the summary table
