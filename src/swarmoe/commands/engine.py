"""`swarmoe generate` (streams tokens) and `swarmoe bench engine` (batch throughput)."""

from __future__ import annotations

import time
from typing import Annotated

import typer

from swarmoe.commands.model import CHECKPOINT_HELP, require_checkpoint

bench_app = typer.Typer(help="Measure parts of swarmoe on this machine.", no_args_is_help=True)


def generate(
    prompt: Annotated[str, typer.Argument(help="text to continue")],
    model: Annotated[str, typer.Option("--model", help=CHECKPOINT_HELP)],
    max_tokens: Annotated[int, typer.Option(help="tokens to generate")] = 64,
    temperature: Annotated[float, typer.Option(help="0 is greedy")] = 0.0,
    top_p: Annotated[float, typer.Option()] = 1.0,
    seed: Annotated[int | None, typer.Option()] = None,
    dtype: Annotated[str, typer.Option(help="float32 or bfloat16")] = "float32",
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
    expert_memory_gb: Annotated[float | None, typer.Option(help="resident expert budget")] = None,
    chat: Annotated[bool, typer.Option("--chat", help="wrap the prompt in the chat template")] = False,
) -> None:
    """Generate from a prompt, printing text as it is produced."""
    from swarmoe import LLM, SamplingParams

    llm = LLM(require_checkpoint(model), dtype=dtype, device=device, expert_memory_gb=expert_memory_gb)
    params = SamplingParams(temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed)
    request = prompt
    if chat:
        from swarmoe.text import encode_chat

        request = {"prompt_token_ids": encode_chat(llm.tokenizer, [{"role": "user", "content": prompt}])}
    try:
        rid = llm.add_request(request, params)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    shown = ""
    while llm.has_unfinished:
        for out in llm.step():
            if out.request_id != rid:
                continue
            text = out.outputs[0].text
            typer.echo(text[len(shown):], nl=False)
            shown = text
            if out.finished:
                typer.echo(f"\n[{out.outputs[0].finish_reason}: {len(out.outputs[0].token_ids)} tokens]")


@bench_app.command("engine")
def bench_engine(
    model: Annotated[str, typer.Option("--model", help=CHECKPOINT_HELP)],
    num_prompts: Annotated[int, typer.Option(help="requests in the batch")] = 16,
    prompt_len: Annotated[int, typer.Option(help="tokens per prompt")] = 128,
    shared_prefix: Annotated[int, typer.Option(help="leading tokens all prompts share")] = 0,
    max_tokens: Annotated[int, typer.Option(help="tokens generated per request")] = 32,
    dtype: Annotated[str, typer.Option()] = "float32",
    expert_memory_gb: Annotated[float | None, typer.Option()] = None,
) -> None:
    """Throughput of one batch of random-token requests through the engine."""
    import json

    import torch

    from swarmoe import LLM, SamplingParams

    llm = LLM(require_checkpoint(model), dtype=dtype, expert_memory_gb=expert_memory_gb,
              max_num_seqs=max(num_prompts, 1))
    vocab = llm.config.text.vocab_size
    g = torch.Generator().manual_seed(0)
    prefix = torch.randint(0, vocab, (shared_prefix,), generator=g).tolist()
    prompts = [
        {"prompt_token_ids": prefix + torch.randint(0, vocab, (prompt_len - shared_prefix,), generator=g).tolist()}
        for _ in range(num_prompts)
    ]
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    wall = time.perf_counter() - start
    generated = sum(len(o.outputs[0].token_ids) for o in outs)
    ttft = sorted(o.metrics["time_to_first_token"] for o in outs)
    result = {
        "requests": num_prompts,
        "generated_tokens": generated,
        "wall_s": round(wall, 3),
        "output_tokens_per_s": round(generated / wall, 2),
        "ttft_p50_s": round(ttft[len(ttft) // 2], 3),
        **{k: v for k, v in llm.stats().items() if k.startswith(("prefix", "expert", "preempt"))},
    }
    typer.echo(json.dumps(result))


def register(app: typer.Typer) -> None:
    app.command("generate")(generate)
    app.add_typer(bench_app, name="bench")
