"""A training step of swarmoe against transformers' DeepseekV3ForCausalLM, in the same run.

Both start from the same release-layout checkpoint (a K2 config scaled down, written as
`swarmoe train` writes configs: `deepseek_v3`) and take the same batches: swarmoe through its
`Trainer` (padded batched-GEMM experts, fused AdamW, the bias update, in the Trainer's default
precision, and also in the other one: float32 <-> bf16 autocast), the peer as its users train it: `from_pretrained` with its default attention and
experts implementations, `torch.optim.AdamW`, cross entropy on the same labels, in float32 and
under the same bf16 autocast (the faster of the two is the peer's figure). Steps alternate
between the two, so load from other jobs falls on both alike; medians after warmup.

A GEMM probe in the same run gives this CPU's peak FLOP/s (float32 and bf16, 2048^3 matmuls on
all threads); model FLOP/s count 6 x the parameters a token passes through (attention
projections, dense MLP, shared and top-k routed experts, lm_head) plus attention scores.

    .venv/bin/python benchmarks/train.py            # ~3 min on 2 cores
    .venv/bin/python benchmarks/train.py --steps 6 --batch 2 --seq 128

Prints a table and one JSON line, also appended to benchmarks/results/train.jsonl.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from record import report  # noqa: E402
from swarmoe.testing import make_tiny_checkpoint  # noqa: E402
from swarmoe.train.trainer import Trainer, TrainOptions, native_bf16  # noqa: E402

SHAPE = dict(
    hidden_size=512, intermediate_size=1536, moe_intermediate_size=256, num_hidden_layers=4,
    num_attention_heads=8, num_key_value_heads=8, n_routed_experts=64, num_experts_per_tok=6,
    n_shared_experts=1, first_k_dense_replace=1, q_lora_rank=192, kv_lora_rank=128,
    qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
)


def gemm_peak(dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def flops_per_token(cfg: dict, seq: int) -> float:
    h, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    qk, v = cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"], cfg["v_head_dim"]
    attn = (h * cfg["q_lora_rank"] + cfg["q_lora_rank"] * heads * qk
            + h * (cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"])
            + cfg["kv_lora_rank"] * heads * (cfg["qk_nope_head_dim"] + v) + heads * v * h)
    expert = 3 * h * cfg["moe_intermediate_size"]
    moe = expert * (cfg["num_experts_per_tok"] + cfg["n_shared_experts"]) + h * cfg["n_routed_experts"]
    dense = 3 * h * cfg["intermediate_size"]
    layers, k = cfg["num_hidden_layers"], cfg["first_k_dense_replace"]
    params = layers * attn + k * dense + (layers - k) * moe + h * cfg["vocab_size"]
    scores = layers * heads * seq * (qk + v)  # causal: half of seq per token, twice (QK, PV)
    return 6 * params + 6 * scores


def write_data(path: Path, lines: int, seed: int) -> None:
    import random

    rng = random.Random(seed)
    words = ["expert", "router", "token", "swarm", "agent", "page", "table", "search", "model", "layer", "balance", "the", "of", "and", "a", "to", "in", "is", "that", "for", "on", "with", "as", "by"]
    with path.open("w") as f:
        for _ in range(lines):
            f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(400))}) + "\n")


def peer_step(model, optimizer, ids, labels, autocast: bool) -> float:
    t = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = model(ids).logits
    loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), labels.view(-1),
                           ignore_index=-100)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per implementation")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/train.jsonl"))
    args = ap.parse_args()
    from transformers import DeepseekV3ForCausalLM

    torch.manual_seed(0)
    work = Path(tempfile.mkdtemp(prefix="swarmoe-train-bench-"))
    ckpt = make_tiny_checkpoint(work / "init", dtype=torch.float32, shards=1, **SHAPE)
    config = json.loads((ckpt / "config.json").read_text())
    config["model_type"] = "deepseek_v3"
    (ckpt / "config.json").write_text(json.dumps(config))
    data = work / "data.jsonl"
    write_data(data, 64, seed=0)
    opts = TrainOptions(data=data, out=work / "run", steps=10**6, init_from=ckpt,
                        batch_size=args.batch, seq_len=args.seq, lr=1e-4, warmup_steps=0,
                        save_every=10**6)
    ours = Trainer(opts)
    autocast = ours.autocast  # the Trainer's default here: the mode the ratio is taken for
    # swarmoe is timed in both modes too (same trainer, alternate steps), so the default can be
    # checked against the other mode on this CPU.
    own = {"swarmoe": autocast}
    if native_bf16("cpu"):
        own["swarmoe (other mode)"] = not autocast
    peers = {}
    for mode in ("float32", "bf16 autocast") if native_bf16("cpu") else ("float32",):
        model = DeepseekV3ForCausalLM.from_pretrained(ckpt, dtype=torch.float32).train()
        peers[mode] = (model, torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1))
    times: dict[str, list[float]] = {**{m: [] for m in own}, **{m: [] for m in peers}}
    tokens = []
    for i in range(args.warmup + args.steps):
        batch = ours.batches.next()
        step_times = {}
        for name, mode in own.items():
            ours.autocast = mode
            t = time.perf_counter()
            record = ours.train_step(batch)
            step_times[name] = time.perf_counter() - t
        ours.autocast = autocast
        step_times.update({m: peer_step(model, opt, batch.input_ids, batch.labels, m != "float32")
                           for m, (model, opt) in peers.items()})
        if i >= args.warmup:
            for m, v in step_times.items():
                times[m].append(v)
            tokens.append(record.tokens)
    med = {k: statistics.median(v) for k, v in times.items()}
    tok = statistics.median(tokens)
    best_peer = min((m for m in peers), key=lambda m: med[m])
    peak = {"float32": gemm_peak(torch.float32), "bfloat16": gemm_peak(torch.bfloat16)}
    cfg = config
    model_flops = flops_per_token(cfg, args.seq) * tok
    ours_fps = model_flops / med["swarmoe"]
    ours_peak = peak["bfloat16"] if autocast else peak["float32"]
    print(f"{'impl':<22}{'step ms':>10}{'tok/s':>10}{'GFLOP/s':>10}")
    for name, value in med.items():
        print(f"{name:<22}{value * 1e3:>10.1f}{tok / value:>10.0f}{model_flops / value / 1e9:>10.1f}")
    ratio = med[best_peer] / med["swarmoe"]
    print(f"swarmoe / best transformers ({best_peer}): {ratio:.2f}x tokens/s; "
          f"{ours_fps / ours_peak:.1%} of the {'bf16' if autocast else 'fp32'} GEMM peak "
          f"({ours_peak / 1e9:.0f} GFLOP/s probed)")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=ROOT).stdout.strip()
    report({
        "bench": "train", "date": dt.datetime.now().isoformat(timespec="seconds"),
        "commit": commit, "threads": torch.get_num_threads(), "batch": args.batch,
        "seq": args.seq, "tokens_per_step": tok, "shape": SHAPE, "swarmoe_autocast": autocast,
        "swarmoe_other_mode_ratio": (med[best_peer] / med["swarmoe (other mode)"]
                                     if "swarmoe (other mode)" in med else None),
        "step_s": med, "tokens_per_s": {k: tok / v for k, v in med.items()},
        "best_peer": best_peer, "ratio_vs_best_peer": ratio,
        "gemm_peak_flops": peak, "model_flops_per_step": model_flops,
        "fraction_of_peak": ours_fps / ours_peak,
    }, args.out)


if __name__ == "__main__":
    main()
