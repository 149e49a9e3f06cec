"""100 concurrent streaming chats through `swarmoe serve` against `LLM.generate` on the same
prompts, in the same run.

The server runs in a subprocess (as users run it) on a tiny random checkpoint; every chat is
sent at once, by two clients in turn: a lean aiohttp load generator that parses each SSE chunk's
JSON and nothing more (as vLLM's serving benchmark does; it shares the 2 cores with the server
it measures, so its own CPU must stay small), and the official openai client, as an application
sees the server (about 10x the client CPU, which on this machine slows the server too).
`overhead` is the lean client's; `openai_client` has the same figures for the official one.
CPU seconds of the server process, of this process (the client) and of the direct run say
where the time goes. The peer is the offline engine in this process with
identical prompt ids and sampling settings, stepped from a worker thread (torch's intra-op pool
behaves very differently in the main thread on a busy machine), with the same torch thread
count (the server runs its engine in a process of its own); both are warmed up, prefix cache included. The
sides alternate; `overhead` is the median over rounds of server wall / direct wall - 1 (rounds
are adjacent in time, which matters on a shared machine), and the `best_*` fields compare the
best run of each side. Prints one JSON line.

    .venv/bin/python benchmarks/server.py [--size tiny|small] [--requests 100] [--max-tokens 32]
                                          [--rounds 5] [--out benchmarks/results/server.jsonl]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import aiohttp
import httpx
import openai
import psutil

# Before torch starts its OpenMP pool: idle workers sleep instead of spinning, so neither side
# burns the other's cores between steps on a shared machine (the server inherits the setting).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from record import report  # noqa: E402
from swarmoe import LLM, SamplingParams  # noqa: E402
from swarmoe.testing import make_tiny_checkpoint  # noqa: E402
from swarmoe.text import encode_chat  # noqa: E402

MODEL = "tiny"
# --size small: the same random layout with wider, deeper layers, so that an engine step costs
# closer to what real serving sees; the per-token HTTP cost stays the same.
SIZES = {
    "tiny": {},
    "small": {"hidden_size": 512, "num_hidden_layers": 6, "intermediate_size": 1024,
              "moe_intermediate_size": 256, "num_attention_heads": 8, "num_key_value_heads": 8},
}


def chats(n: int) -> list[list[dict[str, str]]]:
    return [[{"role": "system", "content": "Be brief."},
             {"role": "user", "content": f"Question {i}: how does a swarm split its work?"}]
            for i in range(n)]


def run_direct(llm: LLM, messages: list, max_tokens: int) -> dict[str, float]:
    """The peer: the same prompt ids and settings the server uses, straight into the engine."""
    tok = llm.tokenizer
    prompts = [{"prompt_token_ids": encode_chat(tok, m)} for m in messages]
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True,
                            stop_token_ids=[tok.special("<|im_end|>")])
    outs: list = []
    worker = threading.Thread(target=lambda: outs.extend(llm.generate(prompts, params)))
    cpu = _rusage_cpu(resource.getrusage(resource.RUSAGE_SELF))
    start = time.perf_counter()
    worker.start()
    worker.join()
    wall = time.perf_counter() - start
    cpu = _rusage_cpu(resource.getrusage(resource.RUSAGE_SELF)) - cpu
    ttft = sorted(o.metrics["time_to_first_token"] for o in outs)
    return {"wall_s": wall, "cpu_s": cpu, "tokens": sum(len(o.outputs[0].token_ids) for o in outs),
            "ttft_p50_s": statistics.median(ttft)}


async def run_openai(client: openai.AsyncOpenAI, messages: list, max_tokens: int) -> dict[str, float]:
    """End to end, as an application sees it: the official client parses every chunk."""

    async def one(m: list) -> tuple[float, int, int]:
        sent = time.perf_counter()
        first = None
        tokens = chunks = 0
        stream = await client.chat.completions.create(
            model=MODEL, messages=m, max_tokens=max_tokens, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        async for chunk in stream:
            chunks += 1
            if first is None and any(c.delta.content or getattr(c.delta, "reasoning_content", None)
                                     for c in chunk.choices):
                first = time.perf_counter() - sent
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
        return (first if first is not None else time.perf_counter() - sent), tokens, chunks

    return await _timed([one(m) for m in messages])


async def run_lean(session: aiohttp.ClientSession, base: str, messages: list,
                   max_tokens: int) -> dict[str, float]:
    """The same requests from a load generator that costs the machine little: raw SSE lines,
    one json.loads per chunk."""

    async def one(m: list) -> tuple[float, int, int]:
        body = {"model": MODEL, "messages": m, "max_tokens": max_tokens, "temperature": 0,
                "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}
        sent = time.perf_counter()
        first = None
        tokens = chunks = 0
        async with session.post(f"{base}/chat/completions", json=body) as response:
            if response.status != 200:
                raise RuntimeError(f"HTTP {response.status}: {await response.text()}")
            async for line in response.content:
                if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                    continue
                chunk = json.loads(line[6:])
                chunks += 1
                if "error" in chunk:
                    raise RuntimeError(chunk["error"])
                if first is None and any(c["delta"].get("content") or c["delta"].get("reasoning_content")
                                         for c in chunk["choices"]):
                    first = time.perf_counter() - sent
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
        return (first if first is not None else time.perf_counter() - sent), tokens, chunks

    return await _timed([one(m) for m in messages])


async def _timed(calls: list) -> dict[str, float]:
    start = time.perf_counter()
    results = await asyncio.gather(*calls, return_exceptions=True)
    wall = time.perf_counter() - start
    errors = [r for r in results if isinstance(r, BaseException)]
    done = [r for r in results if not isinstance(r, BaseException)]
    ttft = sorted(t for t, *_ in done)
    return {"wall_s": wall, "tokens": sum(n for _, n, _ in done), "errors": len(errors),
            "chunks_per_stream": sum(c for *_, c in done) / max(len(done), 1),
            "first_error": repr(errors[0]) if errors else None,
            "ttft_p50_s": statistics.median(ttft) if ttft else float("nan"),
            "ttft_p99_s": ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))] if ttft else float("nan")}


def start_server(path: Path, port: int, max_num_seqs: int, threads: int,
                 stream_interval: float | None) -> subprocess.Popen:
    swarmoe = str(Path(sys.executable).with_name("swarmoe"))
    proc = subprocess.Popen([swarmoe, "serve", "--model", str(path), "--port", str(port),
                             "--served-model-name", MODEL, "--max-num-seqs", str(max_num_seqs),
                             "--log-level", "warning",
                             *([] if stream_interval is None
                               else ["--stream-interval", str(stream_interval)])],
                            env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    deadline = time.monotonic() + 120
    while True:
        if proc.poll() is not None:
            raise SystemExit("server exited during startup")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise SystemExit("server did not start")
        time.sleep(0.2)


async def rounds(
    base: str, llm: LLM, server: psutil.Process, messages: list, args: argparse.Namespace
) -> tuple[list, dict[str, list]]:
    """Alternate the sides; each client keeps its connections, as a real client would."""
    client = openai.AsyncOpenAI(base_url=base, api_key="unused", max_retries=0, timeout=600)
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                    timeout=aiohttp.ClientTimeout(total=600))
    clients = {
        "lean": lambda n: run_lean(session, base, messages, n),
        "openai": lambda n: run_openai(client, messages, n),
    }
    for run in clients.values():
        await run(2)  # warm-up: opens the connections
    direct: list = []
    served: dict[str, list] = {name: [] for name in clients}
    for _ in range(args.rounds):
        direct.append(run_direct(llm, messages, args.max_tokens))
        for name, run in clients.items():
            before = (_tree_cpu(server), resource.getrusage(resource.RUSAGE_SELF))
            result = await run(args.max_tokens)
            after = (_tree_cpu(server), resource.getrusage(resource.RUSAGE_SELF))
            result["server_cpu_s"] = after[0] - before[0]
            result["client_cpu_s"] = _rusage_cpu(after[1]) - _rusage_cpu(before[1])
            served[name].append(result)
    await client.close()
    await session.close()
    return direct, served


def _tree_cpu(server: psutil.Process) -> float:
    """CPU seconds of the server and its engine process."""
    return sum(t.user + t.system for t in (p.cpu_times() for p in [server, *server.children(recursive=True)]))


def _rusage_cpu(usage) -> float:
    return usage.ru_utime + usage.ru_stime


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=100)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5, help="alternating runs of each side")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(),
                    help="torch intra-op threads, the same on both sides")
    ap.add_argument("--size", choices=sorted(SIZES), default="tiny",
                    help="random checkpoint to make (ignored with --checkpoint)")
    ap.add_argument("--checkpoint", type=Path, default=None, help="serve this one instead")
    ap.add_argument("--out", type=Path, default=None, help="append the JSON line to this file")
    ap.add_argument("--stream-interval", type=float, default=None,
                    help="the server's --stream-interval (default: the server's default)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        path = args.checkpoint or make_tiny_checkpoint(Path(tmp) / "ckpt", seed=0, **SIZES[args.size])
        messages = chats(args.requests)
        llm = LLM(path, max_num_seqs=args.requests)
        run_direct(llm, messages, 2)  # warm-up, as the server gets (the prefix cache included)
        port = free_port()
        proc = start_server(path, port, args.requests, args.threads, args.stream_interval)
        base = f"http://127.0.0.1:{port}/v1"
        try:
            direct, served = asyncio.run(rounds(base, llm, psutil.Process(proc.pid), messages, args))
        finally:
            proc.terminate()
            proc.wait(timeout=30)

    best_direct = min(direct, key=lambda r: r["wall_s"])
    sides = {name: _summary(runs, direct) for name, runs in served.items()}
    result = {
        "benchmark": "server",
        "checkpoint": str(args.checkpoint) if args.checkpoint else args.size,
        "stream_interval": args.stream_interval,
        "requests": args.requests,
        "max_tokens": args.max_tokens,
        "torch_threads": args.threads,
        "omp_wait_policy": os.environ["OMP_WAIT_POLICY"],
        "loadavg_1m": round(os.getloadavg()[0], 2),
        "best_direct_wall_s": round(best_direct["wall_s"], 3),
        "direct_tokens": best_direct["tokens"],
        "direct_tokens_per_s": round(best_direct["tokens"] / best_direct["wall_s"], 1),
        "direct_ttft_p50_s": round(best_direct["ttft_p50_s"], 3),
        "direct_cpu_s": _median(direct, "cpu_s"),
        **sides.pop("lean"),
        "openai_client": sides.pop("openai"),
    }
    report(result, args.out)


def _summary(served: list[dict], direct: list[dict]) -> dict:
    best = min(served, key=lambda r: r["wall_s"])
    return {
        "errors": sum(r["errors"] for r in served),
        # every stream finished with all its tokens, in every round
        "complete": all(r["errors"] == 0 and r["tokens"] == d["tokens"]
                        for r, d in zip(served, direct, strict=True)),
        "first_error": next((r["first_error"] for r in served if r["first_error"]), None),
        "overhead": _median_ratio(served, direct),
        "rounds_overhead": [round(s["wall_s"] / d["wall_s"] - 1, 3)
                            for s, d in zip(served, direct, strict=True)],
        "best_overhead": round(best["wall_s"] / min(d["wall_s"] for d in direct) - 1, 3),
        "best_server_wall_s": round(best["wall_s"], 3),
        "server_tokens": best["tokens"],
        "server_tokens_per_s": round(best["tokens"] / best["wall_s"], 1),
        "ttft_p50_s": round(best["ttft_p50_s"], 3),
        "ttft_p99_s": round(best["ttft_p99_s"], 3),
        "chunks_per_stream": _median(served, "chunks_per_stream"),
        "median_cpu_s": {"server_process": _median(served, "server_cpu_s"),
                         "client_process": _median(served, "client_cpu_s")},
    }


def _median(runs: list[dict], key: str) -> float:
    return round(statistics.median(r[key] for r in runs), 3)


def _median_ratio(side: list[dict], direct: list[dict]) -> float:
    return round(statistics.median(s["wall_s"] / d["wall_s"] for s, d in zip(side, direct, strict=True)) - 1, 3)


if __name__ == "__main__":
    main()
