"""Dense linear layers at decode sizes: swarmoe's `Linear` (native kernel) against F.linear.

K2.5's non-expert projections (hidden 7168: q_a, kv_a, q_b, o_proj, the shared expert's gate and
down) and the engine benchmark's dense MLP, at 1 and 4 rows, float32 and bfloat16. Both sides run
on the same weights and inputs, round-robin, each call after a 1 GiB sum that evicts the weights
from the caches (decode reads them from DRAM); medians, the ratio F.linear / swarmoe, and the GB/s
of weights read next to the machine's read bandwidth (moe_layer.py's NumPy probe, before and
after). Outputs are checked against F.linear before timing.

    .venv/bin/python benchmarks/linear.py          # ~1 minute on 2 cores

OMP_WAIT_POLICY defaults to PASSIVE (see moe_layer.py). Prints a table and one JSON line, also
appended to benchmarks/results/linear.jsonl.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from moe_layer import ROOT, git_commit, read_bandwidth  # noqa: E402
from record import report  # noqa: E402
from swarmoe.model import kernels  # noqa: E402
from swarmoe.model.linear import Linear  # noqa: E402

SHAPES = {  # name: (in, out)
    "q_a_proj": (7168, 1536),
    "kv_a_proj": (7168, 576),
    "q_b_proj": (1536, 12288),
    "o_proj": (8192, 7168),
    "shared_gate": (7168, 2048),
    "shared_down": (2048, 7168),
    "dense_up": (2048, 8192),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TOLERANCE = {"fp32": 1e-5, "bf16": 1e-2}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="1,4")
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=11)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "linear.jsonl"))
    args = p.parse_args()
    if kernels.expert_kernels() is None:
        raise SystemExit("the native kernels are not available on this machine (see model/kernels.py)")

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    probe = read_bandwidth(args.threads)
    flush_buf = torch.ones(2**28)
    rows_out = []
    with torch.inference_mode():
        for dname in args.dtypes.split(","):
            dtype = DTYPES[dname]
            for name, (n_in, n_out) in SHAPES.items():
                lin = Linear(n_in, n_out, bias=False)
                lin.weight.normal_(0, n_in**-0.5)
                lin.to(dtype)
                nbytes = lin.weight.numel() * lin.weight.element_size()
                for rows in (int(r) for r in args.rows.split(",")):
                    x = torch.randn(rows, n_in).to(dtype)
                    want = F.linear(x, lin.weight)
                    err = ((lin(x).float() - want.float()).abs().max() / want.float().abs().max()).item()
                    if err > TOLERANCE[dname]:
                        raise SystemExit(f"{name} {dname} {rows} rows differs from F.linear: {err:.3g}")
                    times: dict[str, list[float]] = {"swarmoe": [], "torch": []}
                    for r in range(args.repeats):
                        for side in ("swarmoe", "torch") if r % 2 else ("torch", "swarmoe"):
                            flush_buf.sum()
                            t0 = time.perf_counter()
                            lin(x) if side == "swarmoe" else F.linear(x, lin.weight)
                            times[side].append(time.perf_counter() - t0)
                    ms = {side: statistics.median(t) * 1e3 for side, t in times.items()}
                    row = {
                        "dtype": dname, "layer": name, "shape": [n_out, n_in], "rows": rows,
                        "weight_mb": round(nbytes / 1e6, 1),
                        "ms": {side: round(v, 3) for side, v in ms.items()},
                        "gbps": {side: round(nbytes / v / 1e6, 2) for side, v in ms.items()},
                        "speedup_vs_torch": round(ms["torch"] / ms["swarmoe"], 2),
                    }
                    rows_out.append(row)
                    print(f"  {dname} {name:<12} {rows} rows: swarmoe {ms['swarmoe']:.3f} ms, "
                          f"F.linear {ms['torch']:.3f} ms", flush=True)
    bw = statistics.median(probe + read_bandwidth(args.threads))
    print(f"\nread bandwidth (NumPy probe, before and after): {bw:.1f} GB/s; 1-min load {os.getloadavg()[0]:.1f}")
    print(f"{'dtype':<5} {'layer':<12} {'rows':>4} {'MB':>6} {'swarmoe ms':>10} {'F.linear ms':>11} "
          f"{'ratio':>6} {'ours GB/s':>9} {'% BW':>5} {'torch % BW':>10}")
    for r in rows_out:
        print(f"{r['dtype']:<5} {r['layer']:<12} {r['rows']:>4} {r['weight_mb']:>6.1f} {r['ms']['swarmoe']:>10.3f} "
              f"{r['ms']['torch']:>11.3f} {r['speedup_vs_torch']:>5.2f}x {r['gbps']['swarmoe']:>9.1f} "
              f"{100 * r['gbps']['swarmoe'] / bw:>4.0f}% {100 * r['gbps']['torch'] / bw:>9.0f}%")
    report({
        "bench": "linear",
        "time": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "torch": torch.__version__,
        "threads": args.threads,
        "omp_wait_policy": os.environ["OMP_WAIT_POLICY"],
        "read_gbps": round(bw, 2),
        "loadavg_1m_end": round(os.getloadavg()[0], 2),
        "rows": rows_out,
    }, args.out)


if __name__ == "__main__":
    main()
