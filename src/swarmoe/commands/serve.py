"""`swarmoe serve`: the OpenAI-compatible HTTP server over one checkpoint."""

from __future__ import annotations

import gc
import ipaddress
from typing import Annotated

import typer

from swarmoe.commands.model import CHECKPOINT_HELP, require_checkpoint


def serve(
    model: Annotated[str, typer.Option("--model", help=CHECKPOINT_HELP)],
    host: Annotated[str, typer.Option(help="address to bind; loopback unless you mean otherwise")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 8000,
    api_key: Annotated[str | None, typer.Option(
        "--api-key", envvar="SWARMOE_API_KEY",
        help="require 'Authorization: Bearer KEY' on /v1 (or set SWARMOE_API_KEY)")] = None,
    served_model_name: Annotated[str | None, typer.Option(
        help="model id clients send (default: the checkpoint directory's name)")] = None,
    dtype: Annotated[str, typer.Option(help="float32 or bfloat16")] = "float32",
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
    expert_memory_gb: Annotated[float | None, typer.Option(
        help="resident routed-expert budget in GB (the rest is read from disk)")] = None,
    max_model_len: Annotated[int | None, typer.Option(help="context length cap")] = None,
    max_num_seqs: Annotated[int, typer.Option(help="sequences batched together")] = 64,
    max_request_mb: Annotated[float, typer.Option(help="largest request body accepted")] = 32.0,
    stream_interval: Annotated[float | None, typer.Option(
        help="least seconds between two chunks of one stream; the tokens in between go "
             "together (default 0.05; 0 sends a chunk per engine step)", min=0)] = None,
    log_level: Annotated[str, typer.Option(help="uvicorn log level")] = "info",
) -> None:
    """Serve a checkpoint over the OpenAI API (/v1/chat/completions, /v1/completions, ...)."""
    import uvicorn

    from swarmoe.engine.engine_process import EngineProcess
    from swarmoe.server import create_app

    path = require_checkpoint(model)
    if not api_key and not _is_loopback(host):
        typer.secho(f"warning: serving on {host} without --api-key; anyone who can reach it "
                    "can use the model", fg="yellow", err=True)
    # The model runs in a process of its own, so stepping it and serving HTTP use two cores
    # instead of taking turns on one GIL (engine/engine_process.py).
    try:
        engine = EngineProcess(path, dtype=dtype, device=device, expert_memory_gb=expert_memory_gb,
                               max_model_len=max_model_len, max_num_seqs=max_num_seqs)
    except (OSError, ValueError, RuntimeError) as exc:
        raise typer.BadParameter(str(exc), param_hint="--model") from exc
    if engine.tokenizer is None:
        engine.shutdown()
        raise typer.BadParameter("the checkpoint has no tokenizer (tiktoken.model)",
                                 param_hint="--model")
    name = served_model_name or path.resolve().name
    try:
        app = create_app(engine, name, api_key=api_key,
                         max_request_bytes=int(max_request_mb * 1024 * 1024),
                         **({} if stream_interval is None else {"stream_interval": stream_interval}))
        # Everything alive now (modules: torch, FastAPI, pydantic...) lives as long as the
        # server: keep it out of the collector's scans, so that a burst of requests does not stall
        # on a full collection (55 ms over ~210,000 objects when the model was in this process).
        gc.collect()
        gc.freeze()
        typer.echo(f"serving {path} as {name!r} on http://{host}:{port}/v1")
        # Idle connections outlive the clients' own pools (httpx drops them after 5 s), so a
        # client never reuses a connection the server is closing at that moment.
        uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_keep_alive=65,
                    timeout_graceful_shutdown=5)
    finally:
        engine.shutdown()


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)
