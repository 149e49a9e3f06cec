"""The swarm on the in-process engine: `Swarm(model=LLM(...))`, no HTTP.

A scripted engine double writes real K2 tool-call syntax, so the whole path — chat template,
tool declarations, K2 output parsing, the swarm's tool loop — is exercised with meaningful
output; the real engine then runs a swarm end to end (its random weights write noise).
"""

from __future__ import annotations

import json
import re

from swarmoe import LLM, Swarm, tool
from swarmoe.server.local_backend import LocalChatBackend
from swarmoe.testing import make_tiny_checkpoint, write_tiny_tokenizer
from swarmoe.text import Tokenizer
from test_server_scripted import ScriptedEngine

LOOKUPS: list[str] = []


@tool
def lookup(key: str) -> str:
    """Look up the value stored under a key."""
    LOOKUPS.append(key)
    return f"value-of-{key}"


def calls(*items: tuple[str, dict]) -> str:
    body = "".join(
        f"<|tool_call_begin|>functions.{name}:{i}<|tool_call_argument_begin|>{json.dumps(args)}<|tool_call_end|>"
        for i, (name, args) in enumerate(items)
    )
    return f"planning</think><|tool_calls_section_begin|>{body}<|tool_calls_section_end|>"


def swarm_script(prompt: str) -> str:
    """Orchestrator: create two workers, assign each a key, integrate. Workers: look up, answer."""
    returns = prompt.count("## Return of")
    if "create_subagent" in prompt:
        if returns == 0:
            return calls(("create_subagent", {"name": "w1", "system_prompt": "You look things up."}),
                         ("create_subagent", {"name": "w2", "system_prompt": "You look things up."}))
        if returns == 2:
            return calls(("assign_task", {"agent": "w1", "prompt": "find key alpha"}),
                         ("assign_task", {"agent": "w2", "prompt": "find key beta"}))
        found = sorted(set(re.findall(r"found (value-of-[a-z]+)", prompt)))
        return "done</think>Integrated: " + ", ".join(found)
    if returns == 0:
        key = prompt.rsplit("find key ", 1)[1].split("<")[0].strip()
        return calls(("lookup", {"key": key}))
    value = prompt.rsplit("value-of-", 1)[1].split("<")[0].strip()
    return f"ok</think>found value-of-{value}"


def test_swarm_runs_tool_calls_through_the_local_chat_path(tmp_path):
    vocab = write_tiny_tokenizer(tmp_path)
    engine = ScriptedEngine(Tokenizer.from_pretrained(tmp_path), vocab, multimodal=False)
    engine.reply = swarm_script
    LOOKUPS.clear()
    swarm = Swarm(model=LocalChatBackend(engine), tools=[lookup], runs_dir=tmp_path / "runs")
    result = swarm.run_sync("Find alpha and beta.")
    assert result.answer == "Integrated: value-of-alpha, value-of-beta"
    assert sorted(LOOKUPS) == ["alpha", "beta"]
    assert result.stats.subagents == 2 and result.stats.tool_calls == 2
    # orchestrator 3 steps; each worker 2 steps, run in the middle step
    assert result.stats.total_steps == 3 + 2 * 2
    assert result.stats.critical_steps == 1 + (1 + 2) + 1
    # The K2 chat layer declared the tools to the model and returned results in its format.
    assert any("tool_declare" in p and "lookup" in p for p in engine.prompts)


def test_swarm_on_the_real_engine_completes(tmp_path):
    llm = LLM(make_tiny_checkpoint(tmp_path / "tiny", seed=5))
    swarm = Swarm(model=llm, tools=[lookup], runs_dir=tmp_path / "runs",
                  sampling={"max_tokens": 12, "temperature": 0,
                            "chat_template_kwargs": {"thinking": False}})
    result = swarm.run_sync("Say something.")
    # Random weights write noise (which may even contain a <think> marker, so the answer may be
    # empty): the run must finish cleanly, its tokens counted by the engine.
    assert result.stats.total_steps >= 1
    assert result.stats.prompt_tokens > 100 and 0 < result.stats.completion_tokens <= 12 * result.stats.total_steps


def test_cli_run_takes_a_checkpoint_directory(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from swarmoe.cli import app

    path = make_tiny_checkpoint(tmp_path / "tiny", seed=6)
    monkeypatch.delenv("MOONSHOT_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    result = CliRunner().invoke(app, ["run", "hello", "--model", str(path), "--json",
                                      "--runs-dir", str(tmp_path / "runs")])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output.strip().splitlines()[-1])
    assert report["stats"]["total_steps"] >= 1 and report["stats"]["prompt_tokens"] > 100


def test_cli_run_with_files_gives_the_agents_document_tools(tmp_path):
    from typer.testing import CliRunner

    from swarmoe.cli import app

    path = make_tiny_checkpoint(tmp_path / "tiny", seed=6)
    doc = tmp_path / "notes.md"
    doc.write_text("# Revenue\n\nRevenue grew to 12 million.\n")
    base = ["run", "hello", "--model", str(path), "--json", "--runs-dir", str(tmp_path / "runs")]
    plain = CliRunner().invoke(app, base)
    with_doc = CliRunner().invoke(app, [*base, "--file", str(doc)])
    assert plain.exit_code == 0 and with_doc.exit_code == 0, with_doc.output
    tokens = [json.loads(r.output.strip().splitlines()[-1])["stats"]["prompt_tokens"] for r in (plain, with_doc)]
    steps = [json.loads(r.output.strip().splitlines()[-1])["stats"]["total_steps"] for r in (plain, with_doc)]
    # The document tools are declared and the document listed: the first prompt is longer.
    assert tokens[1] / steps[1] > tokens[0] / steps[0]
    missing = CliRunner().invoke(app, [*base, "--file", str(tmp_path / "nope.pdf")])
    assert missing.exit_code == 2 and "nope.pdf" in missing.output
