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
) -> None:
    """Make a tiny random checkpoint, serve it on 127.0.0.1 and chat with it via openai."""
    import openai

    from swarmoe import LLM
    from swarmoe.engine.async_engine import AsyncEngine
    from swarmoe.server import create_app
    from swarmoe.server.background import serve_in_thread
    from swarmoe.testing import make_tiny_checkpoint

    typer.echo(_NOISE + "\n")
    path = make_tiny_checkpoint(directory, int4=True)
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


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)
