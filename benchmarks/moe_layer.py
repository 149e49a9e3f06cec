"""One MoE layer: swarmoe against transformers' experts implementations, in the same run.

Builds swarmoe's `MoE` and transformers' `DeepseekV3MoE` with the same random weights (the routed
expert tensors are shared, router and shared expert copied), checks that their outputs agree, then
times every implementation on the same inputs, round-robin, and reports medians, the ratio of the
best transformers implementation to swarmoe (wall time; also process CPU time, which a busy shared
machine disturbs less), and the GB/s of expert weights read (distinct routed
experts touched + the shared expert, per call) next to the machine's read bandwidth measured in
this run.

Decode reads weights from DRAM, not cache: this machine's L3 can hold a large part of one layer, so
by default a 1 GiB buffer is summed (torch) before every timed call, for every implementation
alike; `--no-flush` times warm calls instead. The read bandwidth the table compares against is
measured apart, before and after the timed calls: one NumPy sum per thread over its share of a
1 GiB buffer, all at once. (The torch sums read ~15-20% slower here, so against them a bus-bound
layer would show over 100%; the probe's threads are not used as the flush because the calls
timed right after them ran up to 1.7x slower, every implementation alike.)

With `--stored int4` (or `fp8`), swarmoe's routed experts are stored as K2.5 (INT4, group 32)
or K2 (block FP8) ship them, and run so; the peer's hold the same values dequantised to the dtype
(what the peer loads). GB/s then counts the stored bytes and scales swarmoe reads.

    .venv/bin/python benchmarks/moe_layer.py                 # full run, ~3 minutes on 2 cores
    .venv/bin/python benchmarks/moe_layer.py --tokens 1,8 --dtypes bf16 --repeats 9
    .venv/bin/python benchmarks/moe_layer.py --stored int4

OMP_WAIT_POLICY defaults to PASSIVE here (see below). Prints a table and one JSON line, also appended to benchmarks/results/moe_layer.jsonl.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning. On a machine shared with other jobs, spinning
# threads of a 2-thread team stall every small GEMM for a scheduler slice (measured here: 2-thread
# GEMVs 40x slower than 1-thread ones), which would flatter swarmoe's worker threads against the
# peer's intra-op threads. Set OMP_WAIT_POLICY=ACTIVE to measure the default.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from record import report  # noqa: E402
from swarmoe.config import TextConfig  # noqa: E402
from swarmoe.model.moe import MoE  # noqa: E402
from swarmoe.model.quant import Fp8Experts, Int4Experts  # noqa: E402

HF_IMPLS = ("eager", "grouped_mm", "batched_mm")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TOLERANCE = {"fp32": 1e-4, "bf16": 3e-2}  # max|diff| / max|ref|


def build(args: argparse.Namespace) -> tuple[MoE, torch.nn.Module]:
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    common = dict(
        hidden_size=args.hidden,
        moe_intermediate_size=args.inter,
        n_routed_experts=args.experts,
        num_experts_per_tok=args.top_k,
        n_shared_experts=1,
        n_group=1,
        topk_group=1,
        norm_topk_prob=True,
        routed_scaling_factor=2.827,
    )
    ours = MoE(
        TextConfig(
            vocab_size=1024,
            intermediate_size=4 * args.hidden,
            num_hidden_layers=1,
            num_attention_heads=8,
            kv_lora_rank=64,
            qk_nope_head_dim=32,
            qk_rope_head_dim=16,
            v_head_dim=32,
            **common,
        ),
        layer_idx=0,
    )
    hf_cfg = DeepseekV3Config(vocab_size=1024, num_hidden_layers=1, **common)
    hf_cfg._experts_implementation = "eager"
    ref = DeepseekV3MoE(hf_cfg)

    g = torch.Generator().manual_seed(0)
    h, i = args.hidden, args.inter
    with torch.no_grad():
        ours.experts.gate_up.copy_(torch.randn(ours.experts.gate_up.shape, generator=g) * h**-0.5)
        ours.experts.down.copy_(torch.randn(ours.experts.down.shape, generator=g) * i**-0.5)
        ours.gate.weight.copy_(torch.randn(ours.gate.weight.shape, generator=g) * h**-0.5)
        ours.gate.e_score_correction_bias.copy_(torch.randn(args.experts, generator=g) * 0.02)
        for name, p in ours.shared_experts.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * p.shape[1] ** -0.5)
            ref.shared_experts.get_parameter(name).copy_(p)
        ref.gate.weight.copy_(ours.gate.weight)
        ref.gate.e_score_correction_bias.copy_(ours.gate.e_score_correction_bias)
    share_experts(ours, ref)
    return ours.eval(), ref.eval()


def share_experts(ours: MoE, ref: torch.nn.Module) -> None:
    """Both layers read the very same routed-expert tensors (one copy in memory)."""
    ref.experts.gate_up_proj = ours.experts.gate_up
    ref.experts.down_proj = ours.experts.down


def quantise(ours: MoE, dtype: torch.dtype, kind: str) -> None:
    """ours' routed experts as K2.5 (INT4, group 32) or K2 (block FP8) publish them, kept so;
    transformers' are set to the same values, dequantised, in `dtype` (what its user loads)."""
    dense = ours.experts
    stored = (Int4Experts if kind == "int4" else Fp8Experts).from_dense(dense.gate_up, dense.down)
    values = [stored.expert(e, torch.float32) for e in range(dense.num_experts)]
    for i, name in enumerate(("gate_up", "down")):
        getattr(dense, name).data = torch.stack([v[i] for v in values]).to(dtype)
    if kind == "int4":
        stored.to(dtype)  # the scales, in the dtype as the checkpoint loader keeps them (float8 would widen too)
    ours.experts = stored


def to_dtype(ours: MoE, ref: torch.nn.Module, dtype: torch.dtype) -> None:
    """Experts and shared expert in `dtype`; both routers stay float32, as the reference keeps them."""
    with torch.no_grad():
        for p in (ours.experts.gate_up, ours.experts.down):
            p.data = p.data.to(dtype)
        ours.shared_experts.to(dtype)
        ref.shared_experts.to(dtype)
    share_experts(ours, ref)


def call(impl: str, ours: MoE, ref: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    if impl == "swarmoe":
        return ours(x)
    ref.config._experts_implementation = impl
    return ref(x)


def expert_bytes(ours: MoE, x: torch.Tensor, dtype: torch.dtype) -> int:
    """Bytes of the distinct routed experts this input routes to, plus the shared expert."""
    idx, _ = ours.gate(x.reshape(-1, x.shape[-1]))
    elt = torch.empty((), dtype=dtype).element_size()
    ex = ours.experts
    if isinstance(ex, Int4Experts | Fp8Experts):  # stored values and their scales
        per_expert = sum(t[0].numel() * t.element_size() for t in ex.buffers())
    else:
        per_expert = (ex.gate_up[0].numel() + ex.down[0].numel()) * elt
    shared = sum(p.numel() for p in ours.shared_experts.parameters()) * elt
    return int(idx.unique().numel()) * per_expert + shared


def gathered_gib(tokens: int, args: argparse.Namespace, dtype: torch.dtype) -> float:
    """What `batched_mm` materialises: one copy of an expert's weights per (token, expert) pair."""
    elt = torch.empty((), dtype=dtype).element_size()
    return tokens * args.top_k * 3 * args.hidden * args.inter * elt / 2**30


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experts", type=int, default=384)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--inter", type=int, default=256)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--tokens", default="1,8,100,512")
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--impls", default="swarmoe," + ",".join(HF_IMPLS))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=15, help="timed calls per implementation (at most)")
    p.add_argument("--budget", type=float, default=20.0, help="seconds per implementation and size, caps repeats")
    p.add_argument("--max-gather-gib", type=float, default=3.0, help="skip batched_mm above this gather size")
    p.add_argument("--no-flush", action="store_true", help="time warm calls (no cache flush before each)")
    p.add_argument("--stored", choices=("dense", "int4", "fp8"), default="dense",
                   help="how swarmoe's routed experts are stored: in the dtype, INT4 (K2.5) or block FP8 (K2); "
                        "the peer's hold the same values dequantised")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "moe_layer.jsonl"))
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    load_start = round(os.getloadavg()[0], 2)
    impls = args.impls.split(",")
    sizes = [int(t) for t in args.tokens.split(",")]
    flush_buf = torch.ones(2**28)  # 1 GiB of float32
    read_gbps: list[float] = []

    def flush() -> None:
        t0 = time.perf_counter()
        flush_buf.sum()
        read_gbps.append(flush_buf.numel() * 4 / (time.perf_counter() - t0) / 1e9)

    probe = read_bandwidth(args.threads)
    for _ in range(3):
        flush()
    ours, ref = build(args)
    rows = []
    with torch.inference_mode():
        dense = ours.experts
        for dname in args.dtypes.split(","):
            dtype = DTYPES[dname]
            ours.experts = dense
            to_dtype(ours, ref, dtype)
            if args.stored != "dense":
                quantise(ours, dtype, args.stored)
            for tokens in sizes:
                active = [
                    m for m in impls
                    if not (m == "batched_mm" and gathered_gib(tokens, args, dtype) > args.max_gather_gib)
                ]
                # Distinct inputs per repeat (so routing differs), the same ones for every impl.
                xs = [torch.randn(1, tokens, args.hidden).to(dtype) for _ in range(args.repeats)]
                nbytes = [expert_bytes(ours, x, dtype) for x in xs]
                want = call("eager", ours, ref, xs[0]).float()
                for m in active:
                    got = call(m, ours, ref, xs[0]).float()
                    err = ((got - want).abs().max() / want.abs().max()).item()
                    if err > TOLERANCE[dname]:
                        raise SystemExit(f"{m} differs from eager at {dname}/{tokens}: {err:.3g}")
                times: dict[str, list[float]] = {m: [] for m in active}
                cpu: dict[str, list[float]] = {m: [] for m in active}
                rates: dict[str, list[float]] = {m: [] for m in active}
                spent = dict.fromkeys(active, 0.0)
                for r, x in enumerate(xs):
                    # Rotate the order so no implementation always follows the flush or another one.
                    for m in active[r % len(active):] + active[: r % len(active)]:
                        if len(times[m]) >= 3 and spent[m] > args.budget:
                            continue
                        if not args.no_flush:
                            flush()
                        c0, t0 = time.process_time(), time.perf_counter()
                        call(m, ours, ref, x)
                        t = time.perf_counter() - t0
                        cpu[m].append(time.process_time() - c0)
                        spent[m] += t
                        times[m].append(t)
                        rates[m].append(nbytes[r] / t / 1e9)
                ms = {m: round(median(times[m]) * 1e3, 3) for m in active}
                gbps = {m: round(median(rates[m]), 2) for m in active}
                hf = {m: ms[m] for m in active if m in HF_IMPLS}
                best = min(hf, key=hf.get) if hf else None
                row = {
                    "dtype": dname,
                    "tokens": tokens,
                    "ms": ms,
                    "cpu_ms": {m: round(median(cpu[m]) * 1e3, 3) for m in active},
                    "gbps": gbps,
                    "calls": {m: len(times[m]) for m in active},
                    "expert_mb": round(statistics.mean(nbytes) / 1e6, 2),
                    "best_hf": best,
                }
                if best and "swarmoe" in ms:
                    row["speedup_vs_best_hf"] = round(hf[best] / ms["swarmoe"], 2)
                    cpu_hf = min(row["cpu_ms"][m] for m in hf)
                    row["cpu_ratio_vs_best_hf"] = round(cpu_hf / row["cpu_ms"]["swarmoe"], 2)
                rows.append(row)
                print(f"  {dname} {tokens:>4} tokens: " + ", ".join(f"{m} {ms[m]:.2f} ms" for m in active), flush=True)

    bw = median(probe + read_bandwidth(args.threads))
    print_table(rows, impls, bw, median(read_gbps))
    one_token = [r for r in rows if r["tokens"] == 1 and "swarmoe" in r["gbps"]]
    result = {
        "bench": "moe_layer",
        "time": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "torch": torch.__version__,
        "shape": {"experts": args.experts, "hidden": args.hidden, "inter": args.inter, "top_k": args.top_k, "shared": 1},
        "threads": args.threads,
        "omp_wait_policy": os.environ["OMP_WAIT_POLICY"],
        "flush": not args.no_flush,
        "experts_stored": args.stored,
        "read_gbps": round(bw, 2),
        "flush_read_gbps": round(median(read_gbps), 2),
        "loadavg_1m": {"start": load_start, "end": round(os.getloadavg()[0], 2)},
        "rows": rows,
        "targets": {
            "speedup_ge_2x_everywhere": all(r.get("speedup_vs_best_hf", 0) >= 2 for r in rows),
            "one_token_ge_50pct_read_bw": bool(one_token) and all(r["gbps"]["swarmoe"] >= 0.5 * bw for r in one_token),
        },
    }
    report(result, args.out)


def read_bandwidth(threads: int, rounds: int = 5) -> list[float]:
    """GB/s of `rounds` reads of a 1 GiB buffer, each thread summing its share at once."""
    buf = np.ones(2**28, dtype=np.float32)
    shares = np.array_split(buf, threads)
    rates = []
    with ThreadPoolExecutor(threads) as pool:  # NumPy's sum lets go of the GIL
        for _ in range(rounds):
            t0 = time.perf_counter()
            list(pool.map(np.add.reduce, shares))
            rates.append(buf.nbytes / (time.perf_counter() - t0) / 1e9)
    return rates


def print_table(rows: list[dict], impls: list[str], bw: float, flush_bw: float) -> None:
    print(f"\nread bandwidth (1 GiB, a NumPy sum per thread, before and after): {bw:.1f} GB/s "
          f"(the torch-sum flushes: {flush_bw:.1f}); 1-min load {os.getloadavg()[0]:.1f}")
    head = f"{'dtype':<5} {'tokens':>6} " + " ".join(f"{m + ' ms':>14}" for m in impls)
    head += f" {'best HF/ours':>12} {'(CPU time)':>10} {'ours GB/s':>9} {'% read BW':>9}"
    print(head)
    for r in rows:
        cells = " ".join(f"{r['ms'].get(m, float('nan')):>14.2f}" for m in impls)
        speed, cpu = r.get("speedup_vs_best_hf"), r.get("cpu_ratio_vs_best_hf")
        ours = r["gbps"].get("swarmoe", float("nan"))
        print(
            f"{r['dtype']:<5} {r['tokens']:>6} {cells} "
            f"{(f'{speed:.2f}x' if speed else '-'):>12} {(f'{cpu:.2f}x' if cpu else '-'):>10} "
            f"{ours:>9.1f} {100 * ours / bw:>8.0f}%"
        )


def git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


if __name__ == "__main__":
    main()
