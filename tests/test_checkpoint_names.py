"""Checkpoints shipped by name (`swarmoe.checkpoints`): `--model swarmoe-mini`, `LLM(model=...)`,
`load_model(...)`. A tiny checkpoint stands in for the shipped one through a monkeypatched
registry directory; only the last test reads the real packaged model (and is skipped where it
is not there yet)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import swarmoe.checkpoints as checkpoints
from swarmoe.checkpoints import (
    MissingCheckpointError,
    local_checkpoint,
    missing_files,
    resolve_checkpoint,
)
from swarmoe.cli import app
from swarmoe.testing import make_tiny_checkpoint

NAME = "swarmoe-mini"
REAL_DIR = checkpoints.CHECKPOINTS_DIR / NAME


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """One tiny checkpoint, written once, placed under a registry directory of its own."""
    registry = tmp_path_factory.mktemp("registry")
    make_tiny_checkpoint(registry / NAME, seed=3)
    return registry


@pytest.fixture
def shipped(tiny_dir, tmp_path, monkeypatch) -> Path:
    """`swarmoe-mini` resolves to the tiny checkpoint; cwd is an empty directory, so no local
    path shadows the name, and no environment picks a model."""
    monkeypatch.setattr(checkpoints, "CHECKPOINTS_DIR", tiny_dir)
    monkeypatch.chdir(tmp_path)
    for var in ("SWARMOE_MODEL", "SWARMOE_BASE_URL", "MOONSHOT_API_KEY", "OPENAI_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    return tiny_dir / NAME


@pytest.fixture
def empty_registry(tmp_path, monkeypatch) -> Path:
    """A registry where `swarmoe-mini` has only some of its files."""
    registry = tmp_path / "registry"
    (registry / NAME).mkdir(parents=True)
    (registry / NAME / "config.json").write_text("{}")
    monkeypatch.setattr(checkpoints, "CHECKPOINTS_DIR", registry)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SWARMOE_MODEL", raising=False)
    return registry / NAME


# --- resolution rules ---------------------------------------------------------------------------


def test_a_shipped_name_resolves_to_its_packaged_directory(shipped):
    assert resolve_checkpoint(NAME) == shipped
    assert local_checkpoint(NAME) == shipped
    assert missing_files(NAME) == []  # sharded weights (an index) stand in for model.safetensors


def test_an_existing_local_path_wins_over_a_shipped_name(shipped, tmp_path):
    local = tmp_path / NAME
    local.mkdir()
    assert resolve_checkpoint(NAME) == Path(NAME)
    assert local_checkpoint(NAME) == Path(NAME)
    assert resolve_checkpoint(local) == local


def test_anything_else_comes_back_unchanged(shipped, tmp_path):
    for spec in ("kimi-k2.5", "moonshotai/Kimi-K2.5", str(tmp_path / "nope")):
        assert resolve_checkpoint(spec) == Path(spec)
    assert resolve_checkpoint(Path("kimi-k2.5")) == Path("kimi-k2.5")


def test_model_names_for_an_endpoint_are_not_checkpoints(shipped, tmp_path):
    for spec in (None, "", "kimi-k2.5", "moonshotai/Kimi-K2.5", "gpt-4o-mini", "./swarmoe-mini"):
        assert local_checkpoint(spec) is None, spec
    assert local_checkpoint(str(shipped)) == shipped  # a checkpoint directory, by path


def test_a_shipped_name_with_files_missing_names_them(empty_registry):
    with pytest.raises(MissingCheckpointError) as info:
        resolve_checkpoint(NAME)
    message = str(info.value)
    absent = ["model.safetensors", "tiktoken.model", "tokenizer_config.json", "chat_template.jinja"]
    assert missing_files(NAME) == absent  # config.json is there, so not listed
    assert f"lacks {', '.join(absent)} " in message
    assert NAME in message and str(empty_registry) in message
    with pytest.raises(MissingCheckpointError):
        local_checkpoint(NAME)
    assert isinstance(info.value, FileNotFoundError)


def test_a_shipped_name_whose_directory_is_absent_names_every_file(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoints, "CHECKPOINTS_DIR", tmp_path / "nothing")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(MissingCheckpointError, match="config.json, model.safetensors"):
        resolve_checkpoint(NAME)


def test_the_registry_imports_nothing_heavy():
    code = ("import sys, swarmoe.checkpoints; "
            "heavy = {'torch', 'swarmoe.model', 'swarmoe.engine', 'swarmoe.config'} & set(sys.modules); "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)


# --- the Python API ------------------------------------------------------------------------------


def test_load_model_and_llm_take_a_shipped_name(shipped):
    import torch

    from swarmoe import LLM, SamplingParams
    from swarmoe.model import load_model

    by_name = load_model(NAME)
    by_path = load_model(shipped)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.equal(by_name(ids), by_path(ids))
    llm = LLM(model=NAME)
    assert llm.path == shipped and llm.tokenizer is not None
    out = llm.generate(["hello"], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 3


def test_llm_with_an_incomplete_shipped_name_says_what_is_missing(empty_registry):
    from swarmoe import LLM
    from swarmoe.model import load_model

    with pytest.raises(MissingCheckpointError, match="tiktoken.model"):
        LLM(model=NAME)
    with pytest.raises(MissingCheckpointError, match="model.safetensors"):
        load_model(NAME)


# --- the commands that only run checkpoints ----------------------------------------------------


def test_generate_takes_a_shipped_name(shipped):
    r = CliRunner().invoke(app, ["generate", "hello", "--model", NAME, "--max-tokens", "3"])
    assert r.exit_code == 0, r.output
    assert "tokens]" in r.output


def test_inspect_takes_a_shipped_name(shipped):
    r = CliRunner().invoke(app, ["inspect", "--model", NAME, "--prompt", "a b c"])
    assert r.exit_code == 0, r.output
    assert "Routing of" in r.output


def test_bench_engine_takes_a_shipped_name(shipped):
    r = CliRunner().invoke(app, ["bench", "engine", "--model", NAME, "--num-prompts", "2",
                                 "--prompt-len", "8", "--max-tokens", "2"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output.strip().splitlines()[-1])["generated_tokens"] == 4


class _Stop(Exception):
    pass


def test_serve_takes_a_shipped_name(shipped, monkeypatch):
    import swarmoe.engine.engine_process as engine_process

    seen = []

    def fake_engine(model, **kwargs):
        seen.append(Path(model))
        raise RuntimeError("stopped by the test")

    monkeypatch.setattr(engine_process, "EngineProcess", fake_engine)
    r = CliRunner().invoke(app, ["serve", "--model", NAME])
    assert seen == [shipped]
    assert r.exit_code == 2 and "stopped by the test" in r.output


@pytest.mark.parametrize("argv", [
    ["generate", "hi", "--model", NAME],
    ["inspect", "--model", NAME],
    ["bench", "engine", "--model", NAME],
    ["serve", "--model", NAME],
])
def test_checkpoint_commands_name_the_missing_files(empty_registry, argv):
    r = CliRunner().invoke(app, argv)
    assert r.exit_code == 2, r.output
    assert "tiktoken.model" in r.output and "Traceback" not in r.output


@pytest.mark.parametrize("argv", [
    ["generate", "hi", "--model", "nope"],
    ["inspect", "--model", "nope"],
    ["serve", "--model", "nope"],
])
def test_checkpoint_commands_reject_what_is_no_checkpoint(shipped, argv):
    r = CliRunner().invoke(app, argv)
    assert r.exit_code == 2, r.output
    assert "does not exist" in r.output and NAME in r.output  # the shipped names are offered


# --- the commands that run a checkpoint or talk to an endpoint ---------------------------------


@pytest.fixture
def downstream(monkeypatch, tmp_path):
    """Stop `run`, `analyze` and `widesearch` where they hand their model on, recording it:
    an in-process `LLM` for a checkpoint, the name itself for an endpoint."""
    import swarmoe.docs.recipe as recipe
    import swarmoe.swarm as swarm
    import swarmoe.tasks as tasks

    seen: list = []

    def fake_swarm(**options):
        seen.append(options.get("model"))
        raise ValueError("stopped by the test")

    async def fake_recipe(tools, question, model, **options):
        seen.append(model)
        raise ValueError("stopped by the test")

    async def fake_task(task, options, single_agent=False):
        seen.append(options.get("model"))
        raise ValueError("stopped by the test")

    monkeypatch.setattr(swarm, "Swarm", fake_swarm)
    monkeypatch.setattr(recipe, "analyze", fake_recipe)
    monkeypatch.setattr(tasks, "run_task", fake_task)
    doc = tmp_path / "notes.md"
    doc.write_text("# Revenue\n\nRevenue grew to 12 million.\n")
    table = tmp_path / "table.csv"
    table.write_text("country,capital\nFrance,Paris\nJapan,Tokyo\n")
    runs = str(tmp_path / "runs")
    argv = {
        "run": ["run", "a task", "--json", "--runs-dir", runs],
        "analyze": ["analyze", str(doc), "-q", "what grew?", "--quiet", "--runs-dir", runs],
        "widesearch": ["widesearch", str(table), "--runs-dir", runs],
    }
    return seen, argv


COMMANDS = ["run", "analyze", "widesearch"]


@pytest.mark.parametrize("command", COMMANDS)
def test_a_shipped_name_runs_in_process(shipped, downstream, command):
    from swarmoe import LLM

    seen, argv = downstream
    r = CliRunner().invoke(app, [*argv[command], "--model", NAME])
    assert r.exit_code == 2 and "stopped by the test" in r.output, r.output
    [model] = seen
    assert isinstance(model, LLM) and model.path == shipped


@pytest.mark.parametrize("command", COMMANDS)
def test_a_checkpoint_directory_runs_in_process(shipped, downstream, command):
    from swarmoe import LLM

    seen, argv = downstream
    r = CliRunner().invoke(app, [*argv[command], "--model", str(shipped)])
    assert r.exit_code == 2, r.output
    [model] = seen
    assert isinstance(model, LLM) and model.path == shipped


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("name", ["kimi-k2.5", "moonshotai/Kimi-K2.5"])
def test_an_api_model_name_goes_to_the_endpoint(shipped, downstream, command, name):
    seen, argv = downstream
    r = CliRunner().invoke(app, [*argv[command], "--model", name])
    assert r.exit_code == 2 and "stopped by the test" in r.output, r.output
    assert seen == [name]


@pytest.mark.parametrize("command", COMMANDS)
def test_the_environment_model_is_decided_the_same_way(shipped, downstream, command,
                                                       monkeypatch):
    from swarmoe import LLM

    seen, argv = downstream
    monkeypatch.setenv("SWARMOE_MODEL", NAME)
    r = CliRunner().invoke(app, argv[command])
    assert r.exit_code == 2, r.output
    [model] = seen
    assert isinstance(model, LLM) and model.path == shipped


@pytest.mark.parametrize("command", COMMANDS)
def test_an_incomplete_shipped_name_is_a_usage_error(empty_registry, downstream, command):
    seen, argv = downstream
    r = CliRunner().invoke(app, [*argv[command], "--model", NAME])
    assert r.exit_code == 2, r.output
    assert "tiktoken.model" in r.output and "Traceback" not in r.output
    assert seen == []


# --- the real packaged model -------------------------------------------------------------------


@pytest.mark.skipif(not (REAL_DIR / "config.json").is_file(),
                    reason="the swarmoe-mini checkpoint is not in the package yet")
def test_the_shipped_swarmoe_mini_loads_and_generates():
    from swarmoe import LLM, SamplingParams

    assert missing_files(NAME) == []
    files = [p for p in REAL_DIR.rglob("*") if p.is_file()]
    total = sum(p.stat().st_size for p in files)
    assert total <= 40_000_000, f"{REAL_DIR} holds {total / 1e6:.1f} MB, more than 40 MB"
    # Only what the wheel's package data carries (pyproject.toml) may be in the directory.
    assert {p.suffix for p in files} <= {".safetensors", ".json", ".model", ".jinja"}, files
    llm = LLM(model=NAME)
    assert llm.path == REAL_DIR and llm.tokenizer is not None
    out = llm.generate(["Hello"], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    completion = out[0].outputs[0]
    assert len(completion.token_ids) == 4 and isinstance(completion.text, str)


def test_config_and_tokenizer_load_by_name(shipped):
    from swarmoe.config import load_config
    from swarmoe.text import Tokenizer

    assert load_config(NAME) == load_config(shipped)
    assert Tokenizer.from_pretrained(NAME).encode("hello") == \
        Tokenizer.from_pretrained(shipped).encode("hello")
