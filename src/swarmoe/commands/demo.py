"""`swarmoe demo`: the whole path in one command — a tiny checkpoint, the server, and the
official openai client talking to it — so a new user sees every piece work on a laptop."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

_NOISE = ("NOTE: this checkpoint has RANDOM weights. Everything the model 'says' below is noise;\n"
          "      the point is the plumbing (server, streaming, tool-call parsing), not the words.")
_WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}


def demo(
    directory: Annotated[Path, typer.Option("--dir", help="where to write the tiny checkpoint")] = Path(
        "/tmp/swarmoe-demo"),
    max_tokens: Annotated[int, typer.Option(help="tokens per reply")] = 24,
    report_pages: Annotated[int, typer.Option(help="pages of the generated annual report")] = 120,
) -> None:
    """Make a tiny random checkpoint, serve it on 127.0.0.1, chat with it via openai, run a
    swarm on it over HTTP, and run the long-document recipe on a generated annual report."""
    import openai

    from swarmoe import LLM
    from swarmoe.engine.async_engine import AsyncEngine
    from swarmoe.server import create_app
    from swarmoe.server.background import serve_in_thread
    from swarmoe.testing import make_tiny_checkpoint

    typer.echo(_NOISE + "\n")
    # A long context, so the document recipe's outline fits in the orchestrator's prompt.
    path = make_tiny_checkpoint(directory, int4=True, max_position_embeddings=16384)
    typer.echo(f"1. wrote a tiny random K2 checkpoint (INT4 experts) to {path}")
    engine = AsyncEngine(LLM(path, max_num_seqs=8))
    try:
        with serve_in_thread(create_app(engine, "swarmoe-tiny")) as url:
            typer.echo(f"2. serving it at {url}/v1 (127.0.0.1 only)")
            client = openai.OpenAI(base_url=url + "/v1", api_key="not-needed")
            typer.echo(f"3. models: {[m.id for m in client.models.list()]}")
            _chat(client, max_tokens)
            _stream(client, max_tokens)
            _tool_call(client, max_tokens)
            _swarm(url, directory, max_tokens)
            _report(url, directory, report_pages, max_tokens)
    finally:
        engine.shutdown()
    typer.echo("\n" + _NOISE)
    typer.echo(f"Serve it yourself: swarmoe serve --model {path}")


def _chat(client, max_tokens: int) -> None:
    r = client.chat.completions.create(
        model="swarmoe-tiny", max_tokens=max_tokens, temperature=0,
        messages=[{"role": "user", "content": "What is a mixture of experts?"}])
    msg = r.choices[0].message
    typer.echo("\n4. chat (thinking on, so the noise lands in reasoning_content):")
    typer.echo(f"   reasoning_content: {getattr(msg, 'reasoning_content', None)!r}")
    typer.echo(f"   content:           {msg.content!r}")
    typer.echo(f"   finish_reason={r.choices[0].finish_reason}  usage={r.usage.model_dump()}")


def _stream(client, max_tokens: int) -> None:
    typer.echo("\n5. streaming chat (thinking off), chunk by chunk:\n   ", nl=False)
    stream = client.chat.completions.create(
        model="swarmoe-tiny", max_tokens=max_tokens, temperature=0, stream=True,
        messages=[{"role": "user", "content": "Count to five."}],
        extra_body={"chat_template_kwargs": {"thinking": False}})
    for chunk in stream:
        for choice in chunk.choices:
            if choice.delta.content:
                typer.echo(repr(choice.delta.content), nl=False)
                typer.echo(" ", nl=False)
    typer.echo("")


def _tool_call(client, max_tokens: int) -> None:
    r = client.chat.completions.create(
        model="swarmoe-tiny", max_tokens=max_tokens, temperature=0, tools=[_WEATHER],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        messages=[{"role": "user", "content": "Weather in Paris?"}])
    typer.echo("\n6. tool call (tool_choice names get_weather; the server opens the call and")
    typer.echo("   the model writes the arguments, which from random weights are not JSON):")
    for call in r.choices[0].message.tool_calls or []:
        typer.echo(f"   id={call.id} name={call.function.name} arguments={call.function.arguments!r}")
    typer.echo(f"   finish_reason={r.choices[0].finish_reason}")


def _swarm(url: str, directory: Path, max_tokens: int) -> None:
    from swarmoe import Swarm

    typer.echo("\n7. an agent swarm on the same server (OpenAI backend over HTTP):")
    swarm = Swarm(model="swarmoe-tiny", base_url=url + "/v1", api_key="not-needed",
                  runs_dir=directory / "runs", sampling={"max_tokens": max_tokens, "temperature": 0})
    result = swarm.run_sync("Compare three ways to shard a trillion-parameter MoE.")
    s = result.stats
    typer.echo(f"   run {result.run_id}: {s.total_steps} model calls, {s.subagents} sub-agents, "
               f"critical steps {s.critical_steps}, {s.prompt_tokens + s.completion_tokens} tokens")
    typer.echo(f"   answer: {result.answer!r}")
    typer.echo(f"   timeline: swarmoe trace {result.run_id} --runs-dir {directory / 'runs'}")


def _report(url: str, directory: Path, pages: int, max_tokens: int) -> None:
    import asyncio

    from swarmoe.docs.recipe import analyze
    from swarmoe.docs.synthetic import generate_report
    from swarmoe.docs.tools import DocumentTools

    pdf = directory / "annual-report.pdf"
    report = generate_report(pdf, pages=pages)
    typer.echo(f"\n8. the long-document recipe on a generated {pages}-page annual report ({pdf},"
               f" {len(report.facts)} planted facts):")
    tools = DocumentTools([pdf], cache_dir=directory / "cache")
    doc = next(iter(tools.docs.values()))
    hit = doc.search("capital expenditure", k=1)[0]
    typer.echo(f"   search 'capital expenditure' -> page {hit.page + 1}: {hit.text[:70]!r}")
    from swarmoe.swarm import RunStopped

    try:
        analysis = asyncio.run(analyze(
            tools, "What were the main figures, segment results and risks?", "swarmoe-tiny",
            max_subagents=10, base_url=url + "/v1", api_key="not-needed", runs_dir=directory / "runs",
            sampling={"max_tokens": max_tokens, "temperature": 0}))
    except RunStopped as exc:  # noise can end a run early; the demo goes on
        typer.echo(f"   the run stopped: {exc.reason}")
        return
    typer.echo(f"   plan: {len(analysis.plan)} sub-agents over page ranges, e.g. {analysis.plan[0].line()}")
    typer.echo(f"   report from the random-weight model (noise): {analysis.report[:120]!r}")
    typer.echo("   with a real model: swarmoe analyze REPORT.pdf --question '...' --model kimi-k2.5")


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)
