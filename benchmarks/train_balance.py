"""Expert balancing and QK-clip, each measured both ways on the same seed and data.

Balancing: a tiny K2 model whose routers are skewed on purpose (each MoE layer's router rows of
a quarter of the experts get `SKEW` x the mean direction of that layer's inputs added: those
experts' logits rise by about `SKEW` on an average token, a sigmoid score of 0.5 becomes 0.73 at
SKEW = 1) is trained with the bias update at the default γ = 1e-3 and with `--no-balance`. The
figure is the worst layer's max/mean expert load: at step 1, as the mean and the max over the
last 100 steps, the first step below 1.3, and the step from which the mean of every 50 steps in
a row stays below 1.3 to the end of the run.

QK-clip: the same data at a learning rate where logits grow past tau (Muon, 3e-3; tau = 5),
three ways: the default clip (the guard checks each forward pass's input before it runs), K2's
rule alone (clip after each step by that step's logits), and no clip (tau = inf, which observes
and never clips). The figure is the largest pre-softmax logit any training forward pass computed.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/train_balance.py [balance|qk-clip]
    # ~3.5 min for balance, ~3 min for qk-clip on one core
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
from swarmoe.train.qk_clip import QKClip  # noqa: E402
from swarmoe.train.trainer import Trainer, TrainOptions  # noqa: E402

SKEW = 1.0
STEPS = 800
BATCH, SEQ_LEN = 8, 256  # ~1,700 real tokens a step on this data: ~420 choices per expert
BIAS_RATE = 1e-3  # the default γ
QK_STEPS, TAU, QK_LR = 300, 5.0, 3e-3


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


def run(work: Path, name: str, *, steps: int, batch_size: int, seq_len: int,
        guard: bool = True, **kw) -> tuple[list, list[float]]:
    opts = TrainOptions(data=work / "data.jsonl", out=work / name, steps=steps,
                        batch_size=batch_size, seq_len=seq_len, save_every=10**6, autocast=False,
                        seed=0, **kw)
    trainer = Trainer(opts)
    unclipped: list[float] = []
    if trainer.qk_clip is not None:
        if not guard:  # K2's rule alone: clip after each step by that step's logits
            trainer.qk_clip.remove()
            trainer.qk_clip = QKClip(trainer.model, trainer.qk_clip.tau, guard=False)
        clip = trainer.qk_clip
        trainer.on_step = lambda record: unclipped.append(clip.max_logit_unclipped)
    return trainer.run().records, unclipped


def balance(work: Path, skewed: Path, result: dict) -> None:
    result.update(steps=STEPS, skew=SKEW, bias_rate=BIAS_RATE, tokens_per_step=None)
    for name, on in (("bias_update", True), ("no_balance", False)):
        recs, _ = run(work, name, steps=STEPS, batch_size=BATCH, seq_len=SEQ_LEN,
                      init_from=skewed, balance=on, lr=1e-3, bias_update_rate=BIAS_RATE)
        loads = [r.balance["max_over_mean"] for r in recs]
        result["tokens_per_step"] = round(sum(r.tokens for r in recs) / len(recs))
        last = loads[-100:]
        below = next((r.step for r, x in zip(recs, loads, strict=True) if x < 1.3), None)
        means = [sum(loads[i - 50:i]) / 50 for i in range(50, len(loads) + 1)]  # ends at step i
        stays = next((i + 50 for i in range(len(means)) if all(m < 1.3 for m in means[i:])), None)
        result[name] = {"start_max_over_mean": loads[0], "last100_mean": round(sum(last) / 100, 3),
                        "last100_max": round(max(last), 3), "first_step_below_1.3": below,
                        "mean50_below_1.3_from_step": stays}
        print(f"{name:<12} max/mean load: step 1 {loads[0]:.2f}, last 100 steps mean "
              f"{sum(last) / 100:.2f} max {max(last):.2f}; first step below 1.3: {below}; "
              f"50-step mean below 1.3 from step {stays} on")


def qk_clip(work: Path, skewed: Path, result: dict) -> None:
    result.update(qk_steps=QK_STEPS, tau=TAU, qk_lr=QK_LR, optimizer="muon")
    ways = (("qk_clip", TAU, True), ("qk_clip_after_step_only", TAU, False),
            ("no_clip", float("inf"), True))
    for name, tau, guard in ways:
        recs, unclipped = run(work, name, steps=QK_STEPS, batch_size=4, seq_len=128, guard=guard,
                              init_from=skewed, lr=QK_LR, qk_clip=tau, optimizer="muon")
        forward = [r.max_logit for r in recs]
        worst = max(forward)
        over = sum(x > TAU * (1 + 1e-5) for x in forward)  # beyond float rounding
        result[name] = {"max_forward_logit": round(worst, 6), "steps_over_tau": over,
                        "head_clips": sum(r.clipped_heads for r in recs)}
        if guard and tau != float("inf"):
            result[name]["max_logit_before_guard"] = round(max(unclipped), 3)
        print(f"{name:<24} largest forward logit {worst:.6f} (tau {TAU}); steps with a forward "
              f"logit over tau (beyond 1e-5 rounding): {over}; head clips: "
              f"{result[name]['head_clips']}")


def main() -> None:
    parts = sys.argv[1:] or ["balance", "qk-clip"]
    work = Path(tempfile.mkdtemp(prefix="swarmoe-balance-"))
    write_data(work / "data.jsonl")
    skewed = skewed_checkpoint(work, work / "data.jsonl")
    result: dict = {"bench": "train_balance", "threads": torch.get_num_threads()}
    if "balance" in parts:
        balance(work, skewed, result)
    if "qk-clip" in parts:
        qk_clip(work, skewed, result)
    print(json.dumps(result))
    report(result, ROOT / "benchmarks/results/train_balance.jsonl")


if __name__ == "__main__":
    main()
