"""The engine against its peers, in the same run: issue 3's benchmark line.

(a) 64 requests sharing a 512-token prefix (plus a 16-token suffix of their own), 32 new tokens
    each, greedy, on a mid-size random K2-layout checkpoint (173M parameters: MLA with q_lora,
    16 heads, 64 routed experts top-8 + 1 shared, first layer dense): swarmoe's `LLM.generate`
    against transformers' batched `generate` (DeepseekV3ForCausalLM built as in
    tests/reference.py, left padding, its own DynamicCache, sdpa attention, its default experts
    implementation), both float32, same threads, same prompts. Throughput = generated tokens /
    wall time of the whole call (prefill included). The transformers run (minutes) is bracketed
    by swarmoe runs (one before, two after; median), each with a fresh prefix, so no run reuses
    another's prefix cache. Cache memory: bytes of the DynamicCache tensors after generation
    (transformers 5.24 caches MLA's compressed latent, not per-head K/V) against swarmoe's peak
    blocks in use x bytes per block. swarmoe runs with its cache in the model dtype (float32, the
    same bytes per value as the peer) and, once each, with `kv_cache_dtype="bfloat16"` and
    `kv_cache_dtype="fp8"` (float8_e4m3fn + two float32 scales per token and layer, counted in
    its bytes); both are lossy (the latents are rounded): their token agreement with the peer is
    reported.
(b) Decode at batch 1 on a checkpoint with >= 1 GB of active weights (float32, stored and computed):
    bytes of weights a decode step reads (every non-routed weight, the embedding row and the
    distinct routed experts it routes to) / step time, against the machine's read bandwidth
    measured in the same run: a 1 GiB buffer is summed before every timed step, which also
    evicts the weights from the (480 MiB) L3 so that they come from DRAM.
(c) Tokens/s and expert hit rate with `expert_memory_gb` at 100%, 50% and 25% of the checkpoint's
    expert weights (INT4, as K2.5 publishes them), against the same checkpoint fully resident;
    tokens must be identical. Misses are read from the checkpoint file with pread: from the
    page cache here, since the file is small and hot.

Checkpoints are written once under --cache-dir (default ~/.cache/swarmoe-bench) and reused.
OMP_WAIT_POLICY defaults to PASSIVE, as in benchmarks/moe_layer.py.

    .venv/bin/python benchmarks/engine.py                  # all parts, ~6 minutes on 2 cores
    .venv/bin/python benchmarks/engine.py --parts b,c      # skip the long transformers run

Prints one JSON line per part (also appended to benchmarks/results/engine.jsonl).
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

# Passive OpenMP waiting, as benchmarks/moe_layer.py: on a shared 2-core machine spinning
# threads stall small GEMMs; both sides run in this process under the same policy.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))

from record import report  # noqa: E402
from swarmoe import LLM, SamplingParams  # noqa: E402
from swarmoe.model.moe import MoE  # noqa: E402
from swarmoe.testing import make_tiny_checkpoint, tiny_config, write_tiny_tokenizer  # noqa: E402

# (a) and (c): a mid-size K2 layout (MLA with q_lora, 64 experts top-8, one shared, first layer
# dense, 4 layers); ~170M parameters, stored bf16.
MID = dict(hidden_size=1024, intermediate_size=2048, moe_intermediate_size=256, num_hidden_layers=4,
           num_attention_heads=16, num_key_value_heads=16, n_routed_experts=64, num_experts_per_tok=8,
           q_lora_rank=384, kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64)
# (b): >= 1 GB of float32 weights read per decode token (32 experts top-8, hidden 2048).
LARGE = dict(hidden_size=2048, intermediate_size=8192, moe_intermediate_size=1024, num_hidden_layers=4,
             num_attention_heads=16, num_key_value_heads=16, n_routed_experts=32, num_experts_per_tok=8,
             q_lora_rank=768, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128)


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def checkpoint(cache_dir: Path, name: str, overrides: dict[str, Any], dtype: torch.dtype, stream: bool,
               int4: bool = False) -> Path:
    """The random checkpoint for `overrides`, written once and reused while its config matches."""
    path = cache_dir / name
    probe = cache_dir / f".{name}-vocab"
    probe.mkdir(parents=True, exist_ok=True)
    want = tiny_config(write_tiny_tokenizer(probe), int4=int4, **overrides)
    done = path / ".complete"
    if done.is_file() and json.loads((path / "config.json").read_text()) == want and done.read_text() == str(dtype):
        return path
    print(f"writing {path} ...", file=sys.stderr, flush=True)
    if path.exists():
        for f in path.iterdir():
            f.unlink()
    make_tiny_checkpoint(path, config=want, dtype=dtype, stream=stream, seed=0, int4=int4)
    done.write_text(str(dtype))
    return path


class Bandwidth:
    """Sums a 1 GiB float32 buffer: the machine's read bandwidth, and an L3 flush."""

    def __init__(self) -> None:
        self.buf = torch.ones(2**28)
        self.gbps: list[float] = []

    def __call__(self) -> float:
        t0 = time.perf_counter()
        self.buf.sum()
        self.gbps.append(self.buf.numel() * 4 / (time.perf_counter() - t0) / 1e9)
        return self.gbps[-1]


def random_ids(n: int, vocab: int, g: torch.Generator) -> list[int]:
    return torch.randint(0, vocab - 256, (n,), generator=g).tolist()  # below the specials


# -- (a) ------------------------------------------------------------------------------------


def hf_cache_bytes(cache: Any) -> int:
    """Bytes of every tensor a transformers cache holds."""
    seen: set[int] = set()
    total = 0

    def walk(obj: Any, depth: int = 0) -> None:
        nonlocal total
        if depth > 4 or id(obj) in seen:
            return
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            total += obj.numel() * obj.element_size()
        elif isinstance(obj, list | tuple):
            for x in obj:
                walk(x, depth + 1)
        elif hasattr(obj, "__dict__"):
            for x in vars(obj).values():
                walk(x, depth + 1)

    walk(cache)
    return total


def hf_generate(model: Any, prompts: list[list[int]], new: int, pad_id: int) -> tuple[list[list[int]], int]:
    longest = max(map(len, prompts))
    ids = torch.full((len(prompts), longest), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):  # left padding
        ids[i, longest - len(p):] = torch.tensor(p)
        mask[i, longest - len(p):] = 1
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
                             return_dict_in_generate=True, pad_token_id=pad_id)
    return out.sequences[:, longest:].tolist(), hf_cache_bytes(out.past_key_values)


def ours_generate(llm: LLM, prompts: list[list[int]], new: int) -> tuple[list[list[int]], int]:
    llm.blocks.peak_used = llm.blocks.num_used
    params = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    return [o.outputs[0].token_ids for o in outs], llm.blocks.peak_used * llm.cache.block_bytes


def part_a(args: argparse.Namespace, bw: Bandwidth) -> dict[str, Any]:
    from reference import hf_text_model

    path = checkpoint(args.cache_dir, "engine-mid", MID, torch.bfloat16, stream=False)
    hf = hf_text_model(path)
    hf.generation_config.eos_token_id = None  # exactly `new` tokens, as ignore_eos does for us
    vocab = hf.config.vocab_size
    n, prefix_len, suffix_len, new = args.a_requests, args.a_prefix, args.a_suffix, args.a_new
    kw = dict(max_num_seqs=n, max_num_batched_tokens=2048, max_model_len=2 * (prefix_len + suffix_len + new),
              cache_memory_gb=0.5)
    ours = LLM(path, dtype="float32", **kw)
    ours_bf16 = LLM(path, dtype="float32", kv_cache_dtype="bfloat16", **kw)
    ours_fp8 = LLM(path, dtype="float32", kv_cache_dtype="fp8", **kw)
    g = torch.Generator().manual_seed(1)

    def prompts() -> list[list[int]]:  # a fresh prefix each time: no run reuses another's cache
        prefix = random_ids(prefix_len, vocab, g)
        return [prefix + random_ids(suffix_len, vocab, g) for _ in range(n)]

    for llm in (ours, ours_bf16, ours_fp8):  # one full-size batch: the allocator and caches settle
        ours_generate(llm, prompts(), new)
    warm = prompts()
    hf_generate(hf, [p[:8] for p in warm[:2]], 2, pad_id=0)  # a tiny one: its runs take minutes
    times: dict[str, list[float]] = {"transformers": [], "float32": [], "bf16-cache": [], "fp8-cache": []}
    mem: dict[str, int] = {}
    agree: dict[str, float] = {}

    def timed(name: str, fn: Any) -> Any:
        gc.collect()
        t0 = time.perf_counter()
        result = fn()
        times[name].append(time.perf_counter() - t0)
        print(json.dumps({"a_run": name, "wall_s": round(times[name][-1], 2)}), file=sys.stderr, flush=True)
        return result

    # Each transformers run (minutes) is bracketed by swarmoe runs, so that a change of load on
    # the shared machine reaches both sides; the run just before it has the same prompts.
    for _ in range(args.a_reps):
        batch = prompts()
        got, mem["float32"] = timed("float32", lambda b=batch: ours_generate(ours, b, new))
        ref, mem["transformers"] = timed("transformers", lambda b=batch: hf_generate(hf, b, new, pad_id=0))
        agree["float32"] = sum(a == b for a, b in zip(got, ref, strict=True)) / n
        if not times["bf16-cache"]:
            got16, mem["bf16-cache"] = timed("bf16-cache", lambda b=batch: ours_generate(ours_bf16, b, new))
            agree["bf16-cache"] = sum(a == b for a, b in zip(got16, ref, strict=True)) / n
            got8, mem["fp8-cache"] = timed("fp8-cache", lambda b=batch: ours_generate(ours_fp8, b, new))
            agree["fp8-cache"] = sum(a == b for a, b in zip(got8, ref, strict=True)) / n
            # Tokens in place, position by position: a request that parts from the peer at a near-tie
            # still keeps the tokens before it.
            same = sum(x == y for a, b in zip(got8, ref, strict=True) for x, y in zip(a, b, strict=True))
            agree["fp8-cache_positions"] = same / (n * new)
    for _ in range(2):
        batch = prompts()
        timed("float32", lambda b=batch: ours_generate(ours, b, new))
    generated = n * new
    tps = {k: generated / median(v) for k, v in times.items()}
    return {
        "part": "a",
        "workload": f"{n} requests, {prefix_len}-token shared prefix + {suffix_len}-token suffix, {new} new tokens",
        "model_params_m": round(sum(p.numel() for p in hf.parameters()) / 1e6, 1),
        "hf_impl": {"attn": hf.config._attn_implementation,
                    "experts": getattr(hf.config, "_experts_implementation", None)},
        "tokens_per_s": {k: round(v, 2) for k, v in tps.items()},
        "wall_s": {k: [round(t, 2) for t in v] for k, v in times.items()},
        "throughput_ratio": round(tps["float32"] / tps["transformers"], 2),
        "throughput_ratio_bf16_cache": round(tps["bf16-cache"] / tps["transformers"], 2),
        "throughput_ratio_fp8_cache": round(tps["fp8-cache"] / tps["transformers"], 2),
        "cache_bytes": mem,
        "cache_ratio": round(mem["transformers"] / mem["float32"], 2),
        "cache_ratio_bf16_cache": round(mem["transformers"] / mem["bf16-cache"], 2),
        "cache_ratio_fp8_cache": round(mem["transformers"] / mem["fp8-cache"], 2),
        "token_agreement_with_transformers": agree,
        "targets": {"throughput_ratio": 20, "cache_ratio": 20},
    }


# -- (b) ------------------------------------------------------------------------------------


def active_bytes_counter(llm: LLM) -> tuple[int, int, list[int]]:
    """(bytes every decode step reads outside the routed experts, bytes per routed expert, and a
    list the routing hooks fill with the distinct experts of each MoE layer call)."""
    lm = getattr(llm.model, "language_model", llm.model)
    touched: list[int] = []
    per_expert = 0
    routed = set()
    for m in lm.modules():
        if isinstance(m, MoE):
            m.routing_hooks.append(lambda layer, idx: touched.append(int(idx.unique().numel())))
            ex = m.experts
            routed |= {id(p) for p in ex.parameters()}
            per_expert = sum(p[0].numel() * p.element_size() for p in ex.parameters())
    embed = lm.model.embed_tokens.weight
    fixed = sum(p.numel() * p.element_size() for p in lm.parameters()
                if id(p) not in routed and p is not embed)
    fixed += embed[0].numel() * embed.element_size()
    return fixed, per_expert, touched


def part_b(args: argparse.Namespace, bw: Bandwidth) -> dict[str, Any]:
    path = checkpoint(args.cache_dir, "engine-large", LARGE, torch.float32, stream=True)
    llm = LLM(path, dtype="float32", max_num_seqs=1, max_model_len=1024, cache_memory_gb=0.1)
    fixed, per_expert, touched = active_bytes_counter(llm)
    g = torch.Generator().manual_seed(2)
    vocab = llm.config.text.vocab_size
    params = SamplingParams(temperature=0, max_tokens=args.b_steps + 2, ignore_eos=True)
    llm.add_request({"prompt_token_ids": random_ids(args.b_prompt, vocab, g)}, params)
    llm.step()  # prefill
    llm.step()  # first decode, warm
    rates, step_s, read = [], [], []
    cache_bytes = []
    while llm.has_unfinished:
        read.append(bw())
        touched.clear()
        seq = llm.scheduler.running[0]
        ctx = seq.num_tokens
        t0 = time.perf_counter()
        llm.step()
        dt_s = time.perf_counter() - t0
        nbytes = fixed + sum(touched) * per_expert
        step_s.append(dt_s)
        rates.append(nbytes / dt_s / 1e9)
        cache_bytes.append(ctx * llm.cache.block_bytes // llm.cache.block_size)
    active = fixed + llm.config.text.num_experts_per_tok * per_expert * len(
        [m for m in llm.model.modules() if isinstance(m, MoE)])
    achieved, machine, best = median(rates), median(read), max(read)
    return {
        "part": "b",
        "workload": f"batch 1, {args.b_prompt}-token prompt, {len(step_s)} timed decode steps, float32",
        "active_weight_gb": round(active / 1e9, 3),
        "decode_ms": round(1e3 * median(step_s), 2),
        "tokens_per_s": round(1 / median(step_s), 2),
        "weights_gbps": round(achieved, 2),
        "machine_read_gbps": round(machine, 2),
        "read_bw_fraction": round(achieved / machine, 3),
        # Against the best probe of the run: conservative when other jobs share the memory bus
        # (the probe and the step then see different shares of it).
        "machine_read_gbps_best": round(best, 2),
        "read_bw_fraction_of_best": round(achieved / best, 3),
        "latent_cache_bytes_per_step": int(median(cache_bytes)),
        "target": {"read_bw_fraction": 0.5},
    }


# -- (c) ------------------------------------------------------------------------------------


def expert_weight_bytes(path: Path) -> int:
    from swarmoe.engine.experts import TensorReader
    from swarmoe.model.loader import Checkpoint

    ckpt = Checkpoint(path)
    reader = TensorReader(ckpt.files)
    return sum(reader.info(n)[3] for n in ckpt.names() if ".mlp.experts." in n)


def part_c(args: argparse.Namespace, bw: Bandwidth) -> dict[str, Any]:
    # INT4 experts as K2.5 publishes them: resident or budgeted, they stay packed and are
    # dequantised when routed to, so the two differ only in where the packed bytes live.
    path = checkpoint(args.cache_dir, "engine-mid-int4", MID, torch.bfloat16, stream=False, int4=True)
    total = expert_weight_bytes(path)
    vocab = json.loads((path / "config.json").read_text())["vocab_size"]
    g = torch.Generator().manual_seed(3)
    # Batches of distinct random prompts: the first warms the expert caches, the others are
    # timed, round-robin over the budgets. Seeded sampling, so that routing does not settle into
    # a greedy loop on this random model; the seeds make tokens comparable across budgets.
    batches = [[{"prompt_token_ids": random_ids(args.c_prompt, vocab, g)} for _ in range(args.c_batch)]
               for _ in range(1 + args.c_reps)]
    params = [SamplingParams(temperature=1.0, max_tokens=args.c_new, ignore_eos=True, seed=i)
              for i in range(args.c_batch)]
    fractions = (None, 1.0, 0.5, 0.25)
    llms = []
    for fraction in fractions:
        budget = None if fraction is None else (fraction * total + 4096) / 1e9
        llm = LLM(path, dtype="float32", expert_memory_gb=budget, max_num_seqs=args.c_batch, cache_memory_gb=0.2)
        llm.generate(batches[0], params)
        if llm.expert_cache is not None:
            c = llm.expert_cache
            c.hits = c.misses = c.bytes_loaded = 0
        llms.append(llm)
    walls: list[list[float]] = [[] for _ in fractions]
    tokens: list[list[list[int]]] = [[] for _ in fractions]
    for batch in batches[1:]:
        for i, llm in enumerate(llms):
            gc.collect()
            t0 = time.perf_counter()
            outs = llm.generate(batch, params)
            walls[i].append(time.perf_counter() - t0)
            tokens[i] += [o.outputs[0].token_ids for o in outs]
    rows = []
    for fraction, llm, wall, toks in zip(fractions, llms, walls, tokens, strict=True):
        stats = llm.stats()
        rows.append({
            "budget": "resident" if fraction is None else f"{int(fraction * 100)}%",
            "expert_memory_gb": None if fraction is None else round(stats["expert_budget_bytes"] / 1e9, 4),
            "tokens_per_s": round(args.c_batch * args.c_new / median(wall), 2),
            "hit_rate": None if fraction is None else round(stats["expert_hit_rate"], 3),
            "gb_loaded": None if fraction is None else round(stats["expert_bytes_loaded"] / 1e9, 3),
            "resident_gb": None if fraction is None else round(stats["expert_resident_bytes"] / 1e9, 4),
            "tokens_identical": toks == tokens[0],
        })
    base = rows[0]["tokens_per_s"]
    for r in rows:
        r["vs_resident"] = round(r["tokens_per_s"] / base, 3)
    return {
        "part": "c",
        "workload": f"batch {args.c_batch}, {args.c_prompt}-token random prompts, {args.c_new} new tokens "
                    f"(seeded sampling), float32 compute, INT4 experts; a warm-up batch, then {args.c_reps} "
                    "timed batches round-robin over the budgets",
        "expert_weight_gb": round(total / 1e9, 3),
        "rows": rows,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="a,b,c")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cache-dir", type=Path,
                   default=Path(os.environ.get("SWARMOE_BENCH_CACHE", Path.home() / ".cache" / "swarmoe-bench")))
    p.add_argument("--a-requests", type=int, default=64)
    p.add_argument("--a-prefix", type=int, default=512)
    p.add_argument("--a-suffix", type=int, default=16)
    p.add_argument("--a-new", type=int, default=32)
    p.add_argument("--a-reps", type=int, default=1, help="transformers runs (each takes minutes)")
    p.add_argument("--b-prompt", type=int, default=64)
    p.add_argument("--b-steps", type=int, default=32)
    p.add_argument("--c-batch", type=int, default=4)
    p.add_argument("--c-prompt", type=int, default=32)
    p.add_argument("--c-new", type=int, default=48)
    p.add_argument("--c-reps", type=int, default=3)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "engine.jsonl")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    bw = Bandwidth()
    for _ in range(3):
        bw()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    parts = {"a": part_a, "b": part_b, "c": part_c}
    for name in args.parts.split(","):
        start = time.perf_counter()
        load = os.getloadavg()[0]
        result = parts[name](args, bw)
        result.update({
            "seconds": round(time.perf_counter() - start, 1),
            "machine_read_gbps_run": round(median(bw.gbps), 2),
            "threads": args.threads,
            "omp_wait_policy": os.environ["OMP_WAIT_POLICY"],
            "loadavg_1m_start": round(load, 2),
            "commit": commit,
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        })
        report(result, args.out)
        gc.collect()


if __name__ == "__main__":
    main()
