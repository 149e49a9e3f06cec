"""`swarmoe train` end to end on tiny configs: the loss falls on chat data, checkpoints load in
swarmoe and transformers with equal logits, `LLM` generates, resume equals an uninterrupted run,
Ctrl-C saves, balancing and QK-clip do what they claim, and bad input gets a clear error."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from swarmoe.cli import app
from swarmoe.model import load_model
from swarmoe.testing.tiny import tiny_config
from swarmoe.testing.tokenizer_files import write_tiny_tokenizer

NAMES = ["Ada", "Bo", "Cy", "Di", "Ed", "Flo"]
CITIES = ["Paris", "Oslo", "Rome", "Lima", "Kyiv"]
TOOLS = [{"type": "function", "function": {
    "name": "lookup", "description": "Look up where a person lives.",
    "parameters": {"type": "object", "properties": {"name": {"type": "string"}},
                   "required": ["name"]}}}]


def chat_record(rng: random.Random) -> dict:
    name, city = rng.choice(NAMES), rng.choice(CITIES)
    return {"tools": TOOLS, "messages": [
        {"role": "user", "content": f"Where does {name} live?"},
        {"role": "assistant", "content": "", "reasoning_content": f"I should look up {name}.",
         "tool_calls": [{"id": "functions.lookup:0", "type": "function",
                         "function": {"name": "lookup", "arguments": json.dumps({"name": name})}}]},
        {"role": "tool", "tool_call_id": "functions.lookup:0", "content": f"{name}: {city}"},
        {"role": "assistant", "reasoning_content": "The tool said so.",
         "content": f"{name} lives in {city}."},
    ]}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    tok = root / "tok"
    vocab = write_tiny_tokenizer(tok)
    config = tiny_config(vocab, num_hidden_layers=2, hidden_size=32, intermediate_size=64,
                         moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=2,
                         q_lora_rank=None, torch_dtype="float32")
    (root / "config.json").write_text(json.dumps(config))
    rng = random.Random(0)
    with (root / "chat.jsonl").open("w") as f:
        for _ in range(48):
            f.write(json.dumps(chat_record(rng)) + "\n")
    return root


def run_cli(args: list[str]) -> str:
    result = CliRunner().invoke(app, ["train", *args])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.output


def base_args(setup: Path, out: Path, steps: int, *extra: str) -> list[str]:
    return ["--config", str(setup / "config.json"), "--tokenizer", str(setup / "tok"),
            "--data", str(setup / "chat.jsonl"), "--out", str(out), "--steps", str(steps),
            "--batch-size", "4", "--seq-len", "160", "--lr", "3e-3", "--no-autocast", *extra]


def log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(setup):
    out = setup / "run"
    run_cli(base_args(setup, out, 40, "--save-every", "20"))
    return out


def test_loss_falls_on_chat_data(trained):
    losses = [r["loss"] for r in log(trained)]
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5
    first = log(trained)[0]
    assert {"step", "loss", "lr", "tokens_per_s", "balance", "layers"} <= set(first)
    assert first["layers"] and {"max_over_mean", "cv", "dead"} <= set(first["layers"][0])


def test_checkpoint_loads_in_swarmoe_and_transformers_with_equal_logits(trained):
    from transformers import DeepseekV3ForCausalLM

    assert (trained / "step-000020" / "config.json").is_file()
    ids = torch.randint(0, 500, (2, 12), generator=torch.Generator().manual_seed(0))
    ours = load_model(trained, dtype=torch.float32)
    peer = DeepseekV3ForCausalLM.from_pretrained(trained, dtype=torch.float32).eval()
    with torch.no_grad():
        a, b = ours(ids), peer(ids).logits
    assert torch.allclose(a, b, atol=2e-5), (a - b).abs().max()


def test_llm_generates_from_the_trained_checkpoint(trained):
    from swarmoe import LLM, SamplingParams

    llm = LLM(model=str(trained), dtype="float32")
    prompt = llm.tokenizer.encode("Where does Ada live?")
    out = llm.generate([{"prompt_token_ids": prompt}], SamplingParams(temperature=0, max_tokens=8))
    assert len(out[0].outputs[0].token_ids) > 0


def test_resume_matches_an_uninterrupted_run(setup, trained):
    from swarmoe.train.trainer import Trainer, TrainOptions

    out = setup / "resumed"

    def ctrl_c_at_step_20(record) -> None:
        if record.step == 20:
            os.kill(os.getpid(), signal.SIGINT)

    opts = TrainOptions(data=setup / "chat.jsonl", out=out, steps=40, config=setup / "config.json",
                        tokenizer=setup / "tok", batch_size=4, seq_len=160, lr=3e-3,
                        autocast=False, save_every=1000)
    first = Trainer(opts, on_step=ctrl_c_at_step_20).run()
    assert first.interrupted and first.steps == 20
    run_cli(base_args(setup, out, 40, "--save-every", "1000", "--resume"))
    whole, parts = log(trained), log(out)
    assert [r["step"] for r in parts] == list(range(1, 41))
    for a, b in zip(whole, parts, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=1e-7), a["step"]
    from swarmoe.train.state import load_state

    x, y = (load_state(d / "step-000040")["model"] for d in (trained, out))  # float32 weights
    assert x.keys() == y.keys()
    for name in x:
        assert torch.allclose(x[name], y[name], rtol=1e-5, atol=1e-6), name


def test_ctrl_c_writes_a_checkpoint_and_exits_cleanly(setup):
    out = setup / "interrupted"
    cmd = [str(Path(sys.executable).parent / "swarmoe"), "train",
           *base_args(setup, out, 100000, "--save-every", "100000")]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    deadline = time.time() + 120
    while time.time() < deadline and not ((out / "log.jsonl").is_file()
                                          and len(log(out)) >= 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output
    steps = len(log(out))
    assert f"stopped at step {steps}" in output and "--resume" in output
    assert (out / f"step-{steps:06d}" / "trainer_state.json").is_file()
    load_model(out / f"step-{steps:06d}")


def test_bad_input_gets_a_clear_error(setup, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\nnot json\n')
    cases = [
        (base_args(setup, tmp_path / "a", 2) + ["--optimizer", "sgd"], "adamw or muon"),
        (["--data", str(bad), "--out", str(tmp_path / "b"), "--steps", "1",
          "--config", str(setup / "config.json"), "--tokenizer", str(setup / "tok")], "bad.jsonl:2"),
        (["--data", str(setup / "chat.jsonl"), "--out", str(tmp_path / "c"), "--steps", "1",
          "--config", str(setup / "config.json")], "--tokenizer"),
        (["--data", str(setup / "chat.jsonl"), "--out", str(tmp_path / "d"), "--steps", "1",
          "--resume", "--config", str(setup / "config.json"), "--tokenizer", str(setup / "tok")],
         "no checkpoint"),
    ]
    for args, message in cases:
        result = CliRunner().invoke(app, ["train", *args])
        assert result.exit_code != 0 and message in result.output, (args, result.output)
