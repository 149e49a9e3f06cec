"""Expert balancing and QK-clip, each measured both ways on the same seed and data.

Balancing: a tiny K2 model whose routers are skewed on purpose (each MoE layer's router rows of
a quarter of the experts get `SKEW` x the mean direction of that layer's inputs added, so those
experts take most tokens) is trained with the bias update and with `--no-balance`; the worst
layer's max/mean expert load is printed at the start, and as the mean over the last 10 steps.

QK-clip: the same data with a high learning rate, with `--qk-clip TAU` and without (AdamW, no
clip); prints the max pre-softmax attention logit seen over the run.

    .venv/bin/python benchmarks/train_balance.py      # ~2 min on 2 cores
"""

from __future__ import annotations

import json
import random
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from record import report  # noqa: E402
from swarmoe.model import load_model  # noqa: E402
from swarmoe.model.moe import MoE  # noqa: E402
from swarmoe.model.saver import save_checkpoint  # noqa: E402
from swarmoe.testing import make_tiny_checkpoint  # noqa: E402
from swarmoe.train.trainer import Trainer, TrainOptions  # noqa: E402

SKEW = 6.0
STEPS = 300
# γ of the bias update: at the default 1e-3 a skew this strong needs more steps than these.
BIAS_RATE = 1e-2


def skewed_checkpoint(work: Path, data: Path) -> Path:
    src = make_tiny_checkpoint(work / "init", dtype=torch.float32, shards=1)
    config = json.loads((src / "config.json").read_text())
    config["model_type"] = "deepseek_v3"
    model = load_model(src, dtype=torch.float32)
    inputs: dict[int, list[torch.Tensor]] = {}
    for moe in (m for m in model.modules() if isinstance(m, MoE)):
        moe.register_forward_hook(
            lambda m, args, out: inputs.setdefault(m.layer_idx, []).append(args[0].detach()))
    from swarmoe.text import Tokenizer

    tok = Tokenizer.from_pretrained(src)
    texts = [json.loads(x)["text"] for x in data.read_text().splitlines()[:8]]
    with torch.no_grad():
        for t in texts:
            model(torch.tensor([tok.encode(t)[:256]]))
    with torch.no_grad():
        for moe in (m for m in model.modules() if isinstance(m, MoE)):
            h = torch.cat([x.reshape(-1, x.shape[-1]) for x in inputs[moe.layer_idx]])
            mean = h.mean(0)
            experts = moe.gate.weight.shape[0]
            moe.gate.weight[: experts // 4] += SKEW * mean / mean.square().sum()
    return save_checkpoint(model, config, work / "skewed", dtype=torch.float32, tokenizer_from=src)


def write_data(path: Path) -> None:
    rng = random.Random(0)
    words = ["the", "swarm", "splits", "work", "among", "agents", "who", "search", "pages", "and", "report", "rows", "of", "a", "table", "with", "cited", "facts", "experts", "route", "tokens"]
    with path.open("w") as f:
        for _ in range(64):
            f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(300))}) + "\n")


def run(work: Path, name: str, **kw) -> list:
    opts = TrainOptions(data=work / "data.jsonl", out=work / name, steps=STEPS, batch_size=4,
                        seq_len=128, save_every=10**6, autocast=False, seed=0, **kw)
    return Trainer(opts).run().records


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="swarmoe-balance-"))
    write_data(work / "data.jsonl")
    skewed = skewed_checkpoint(work, work / "data.jsonl")
    result: dict = {"bench": "train_balance", "steps": STEPS, "skew": SKEW, "bias_rate": BIAS_RATE}
    for name, balance in (("bias_update", True), ("no_balance", False)):
        recs = run(work, name, init_from=skewed, balance=balance, lr=1e-3,
                   bias_update_rate=BIAS_RATE)
        start = recs[0].balance["max_over_mean"]
        end = sum(r.balance["max_over_mean"] for r in recs[-10:]) / 10
        below = next((r.step for r in recs if r.balance["max_over_mean"] < 1.3), None)
        result[name] = {"start_max_over_mean": start, "end_max_over_mean": round(end, 3),
                        "first_step_below_1.3": below}
        print(f"{name:<12} max/mean load: step 1 {start:.2f} -> last 10 steps {end:.2f}"
              f" (first below 1.3 at step {below})")
    tau = 5.0
    # Without the clip the same observer runs with an infinite threshold: it measures, never clips.
    for name, clip in (("qk_clip", tau), ("no_clip", float("inf"))):
        recs = run(work, name, init_from=skewed, lr=3e-2, qk_clip=clip, optimizer="adamw")
        worst = max(r.max_logit for r in recs)
        result[name] = {"tau": tau, "max_logit_over_run": round(worst, 3)}
        print(f"{name:<12} max attention logit over the run: {worst:.2f} (tau {tau})")
    print(json.dumps(result))
    report(result, ROOT / "benchmarks/results/train_balance.jsonl")


if __name__ == "__main__":
    main()
