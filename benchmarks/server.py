"""100 concurrent streaming chats through `swarmoe serve` against `LLM.generate` on the same
prompts, in the same run.

The server runs in a subprocess (as users run it) on a tiny random checkpoint; the official
openai client streams every chat at once. The peer is the offline engine in this process with
identical prompt ids and sampling settings, stepped from a worker thread as the server's engine
thread steps it (torch's intra-op pool behaves very differently in the main thread on a busy
machine), with the same torch thread count. Runs alternate and the best wall time of each side
is kept, since the machine is shared. Prints one JSON line.

    .venv/bin/python benchmarks/server.py [--requests 100] [--max-tokens 32] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import openai
import torch

from swarmoe import LLM, SamplingParams
from swarmoe.testing import make_tiny_checkpoint
from swarmoe.text import encode_chat

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
    start = time.perf_counter()
    worker.start()
    worker.join()
    wall = time.perf_counter() - start
    ttft = sorted(o.metrics["time_to_first_token"] for o in outs)
    return {"wall_s": wall, "tokens": sum(len(o.outputs[0].token_ids) for o in outs),
            "ttft_p50_s": statistics.median(ttft)}


async def run_server(client: openai.AsyncOpenAI, messages: list, max_tokens: int) -> dict[str, float]:
    async def one(m: list) -> tuple[float, int]:
        sent = time.perf_counter()
        first = None
        tokens = 0
        stream = await client.chat.completions.create(
            model=MODEL, messages=m, max_tokens=max_tokens, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        async for chunk in stream:
            if first is None and any(c.delta.content or getattr(c.delta, "reasoning_content", None)
                                     for c in chunk.choices):
                first = time.perf_counter() - sent
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
        return (first if first is not None else time.perf_counter() - sent), tokens

    start = time.perf_counter()
    results = await asyncio.gather(*(one(m) for m in messages), return_exceptions=True)
    wall = time.perf_counter() - start
    errors = [r for r in results if isinstance(r, BaseException)]
    done = [r for r in results if not isinstance(r, BaseException)]
    ttft = sorted(t for t, _ in done)
    return {"wall_s": wall, "tokens": sum(n for _, n in done), "errors": len(errors),
            "first_error": repr(errors[0]) if errors else None,
            "ttft_p50_s": statistics.median(ttft) if ttft else float("nan"),
            "ttft_p99_s": ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))] if ttft else float("nan")}


def start_server(path: Path, port: int, max_num_seqs: int, threads: int) -> subprocess.Popen:
    swarmoe = str(Path(sys.executable).with_name("swarmoe"))
    proc = subprocess.Popen([swarmoe, "serve", "--model", str(path), "--port", str(port),
                             "--served-model-name", MODEL, "--max-num-seqs", str(max_num_seqs),
                             "--log-level", "warning"],
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


async def rounds(base: str, llm: LLM, messages: list, args: argparse.Namespace) -> tuple[list, list]:
    """Alternate the two sides; one client keeps its connections, as a real client would."""
    client = openai.AsyncOpenAI(base_url=base, api_key="unused", max_retries=0, timeout=600)
    await run_server(client, messages, 2)  # warm-up: opens the connections
    direct, served = [], []
    for _ in range(args.rounds):
        direct.append(run_direct(llm, messages, args.max_tokens))
        served.append(await run_server(client, messages, args.max_tokens))
    await client.close()
    return direct, served


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=100)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3, help="alternating runs of each side")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(),
                    help="torch intra-op threads, the same on both sides")
    ap.add_argument("--size", choices=sorted(SIZES), default="tiny",
                    help="random checkpoint to make (ignored with --checkpoint)")
    ap.add_argument("--checkpoint", type=Path, default=None, help="serve this one instead")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        path = args.checkpoint or make_tiny_checkpoint(Path(tmp) / "ckpt", seed=0, **SIZES[args.size])
        messages = chats(args.requests)
        llm = LLM(path, max_num_seqs=args.requests)
        run_direct(llm, messages[:4], 4)  # warm-up
        port = free_port()
        proc = start_server(path, port, args.requests, args.threads)
        base = f"http://127.0.0.1:{port}/v1"
        try:
            direct, served = asyncio.run(rounds(base, llm, messages, args))
        finally:
            proc.terminate()
            proc.wait(timeout=30)

    best_direct = min(direct, key=lambda r: r["wall_s"])
    best_served = min(served, key=lambda r: r["wall_s"])
    result = {
        "benchmark": "server",
        "checkpoint": str(args.checkpoint) if args.checkpoint else args.size,
        "requests": args.requests,
        "max_tokens": args.max_tokens,
        "torch_threads": args.threads,
        "errors": sum(r["errors"] for r in served),
        "first_error": next((r["first_error"] for r in served if r["first_error"]), None),
        "server_wall_s": round(best_served["wall_s"], 3),
        "direct_wall_s": round(best_direct["wall_s"], 3),
        "server_tokens": best_served["tokens"],
        "direct_tokens": best_direct["tokens"],
        "server_tokens_per_s": round(best_served["tokens"] / best_served["wall_s"], 1),
        "direct_tokens_per_s": round(best_direct["tokens"] / best_direct["wall_s"], 1),
        "ttft_p50_s": round(best_served["ttft_p50_s"], 3),
        "ttft_p99_s": round(best_served["ttft_p99_s"], 3),
        "direct_ttft_p50_s": round(best_direct["ttft_p50_s"], 3),
        "overhead": round(best_served["wall_s"] / best_direct["wall_s"] - 1, 3),
        "all_rounds_overhead": [round(s["wall_s"] / d["wall_s"] - 1, 3)
                                for s, d in zip(served, direct, strict=True)],
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
