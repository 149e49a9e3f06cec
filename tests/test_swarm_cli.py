"""`swarmoe run`: flags, environment, JSON output, clear errors, and the live view."""

from __future__ import annotations

import io
import json

from rich.console import Console
from typer.testing import CliRunner

from swarmoe import Swarm, tool
from swarmoe.cli import app
from swarmoe.commands.swarm import LiveView
from swarmoe.testing import FakeModel
from swarmoe.testing.fake_model import WideLookup


def test_run_prints_json_and_reads_the_environment(tmp_path, monkeypatch):
    work = WideLookup(groups=3, rounds=1, per_round=2)
    with FakeModel(WideLookup(groups=3, rounds=1, per_round=2).script).serve() as url:
        monkeypatch.setenv("SWARMOE_BASE_URL", url)
        monkeypatch.setenv("OPENAI_API_KEY", "from-env")
        monkeypatch.setenv("SWARMOE_RUNS_DIR", str(tmp_path))
        out = CliRunner().invoke(app, ["run", work.task, "--model", "fake", "--tool",
                                       "swarm_helpers:lookup", "--json", "--run-id", "cli-1"],
                                 env={"SWARM_TOOL_LOG": str(tmp_path / "log"),
                                      "SWARM_TOOL_LATENCY": "0"})
    assert out.exit_code == 0, out.output
    data = json.loads(out.stdout.strip().splitlines()[-1])
    assert data["run_id"] == "cli-1" and data["answer"] == work.expected_answer()
    assert data["stats"]["tool_calls"] == 6 and data["stopped"] is None
    assert (tmp_path / "cli-1.sqlite").exists()
    again = CliRunner().invoke(app, ["run", work.task, "--api-key", "k", "--run-id", "cli-1",
                                     "--runs-dir", str(tmp_path)])
    assert again.exit_code == 2 and "already exists" in again.output


def test_run_errors_are_one_clear_line():
    runner = CliRunner()
    no_task = runner.invoke(app, ["run", "--api-key", "k"])
    assert no_task.exit_code == 2 and "give a task" in no_task.output
    bad_tool = runner.invoke(app, ["run", "t", "--api-key", "k", "--tool", "nocolon"])
    assert bad_tool.exit_code == 2 and "module:function" in bad_tool.output
    missing = runner.invoke(app, ["run", "--resume", "nope", "--api-key", "k",
                                  "--runs-dir", "/nonexistent"])
    assert missing.exit_code == 2 and "no journal" in missing.output


def test_live_view_counts_agents_steps_and_tool_calls(tmp_path):
    view = LiveView()
    work = WideLookup(groups=4, rounds=2, per_round=3, tool_latency=0)
    Swarm(FakeModel(work.script).backend(), tools=[tool(work.lookup)], on_event=view.on_event,
          runs_dir=tmp_path).run_sync(work.task)
    console = Console(file=io.StringIO(), width=120)
    console.print(view)
    text = " ".join(console.file.getvalue().split())
    assert "5 agent runs, 0 running, 24 tool calls" in text
    assert all(f"w{i}" in text for i in range(4))
    assert view.agents["main"]["steps"] == 3
