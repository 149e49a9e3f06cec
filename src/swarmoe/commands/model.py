"""`swarmoe init-tiny` and `swarmoe inspect`: make a small checkpoint, look at its routing.

Also the one place the commands decide what `--model SPEC` means (`model_checkpoint`,
`require_checkpoint`): a local checkpoint directory, a checkpoint shipped in the package
(`swarmoe-mini`), or, where a command also talks to endpoints, a model name for the API.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from swarmoe.checkpoints import (
    MissingCheckpointError,
    local_checkpoint,
    resolve_checkpoint,
    shipped_names,
)

#: `--model` help for commands that only run checkpoints.
CHECKPOINT_HELP = "checkpoint directory, or the name of a shipped one (swarmoe-mini)"
#: `--model` help for commands that run a checkpoint in-process or a model on an endpoint.
MODEL_HELP = ("Model name on the endpoint (env SWARMOE_MODEL; default kimi-k2.5), or a local "
              "checkpoint directory or shipped checkpoint (swarmoe-mini) to run in-process.")


def model_checkpoint(spec: str | None) -> Path | None:
    """The checkpoint directory `--model SPEC` names, or None when SPEC is a model name for an
    OpenAI-compatible endpoint (or not given). An existing local path and a shipped name are
    checkpoints; a shipped name with files missing is a usage error that names them."""
    try:
        return local_checkpoint(spec)
    except MissingCheckpointError as exc:
        raise typer.BadParameter(str(exc), param_hint="--model") from None


def require_checkpoint(spec: str) -> Path:
    """The checkpoint directory `--model SPEC` names, for commands that only run checkpoints;
    a usage error that says what is wrong when there is none."""
    try:
        path = resolve_checkpoint(spec)
    except MissingCheckpointError as exc:
        raise typer.BadParameter(str(exc), param_hint="--model") from None
    if not (path / "config.json").is_file():
        what = "is not a checkpoint directory (no config.json)" if path.exists() else "does not exist"
        raise typer.BadParameter(
            f"{spec} {what}; give a checkpoint directory or a shipped name "
            f"({', '.join(shipped_names())})", param_hint="--model")
    return path


def init_tiny(
    directory: Annotated[Path, typer.Argument(help="where to write the checkpoint")],
    int4: Annotated[bool, typer.Option("--int4", help="INT4 pack-quantized experts")] = False,
    fp8: Annotated[bool, typer.Option("--fp8", help="block-FP8 experts")] = False,
    multimodal: Annotated[bool, typer.Option("--multimodal", help="K2.5 with a vision tower")] = False,
    seed: Annotated[int, typer.Option(help="random seed")] = 0,
) -> None:
    """Write a small random checkpoint in the release layout, with tokenizer files."""
    from swarmoe.testing import make_tiny_checkpoint

    if int4 and fp8:
        raise typer.BadParameter("choose --int4 or --fp8, not both")
    path = make_tiny_checkpoint(directory, int4=int4, fp8=fp8, multimodal=multimodal, seed=seed)
    kind = "K2.5 (text + vision)" if multimodal else "K2 (text)"
    experts = "INT4" if int4 else "FP8" if fp8 else "bf16"
    typer.echo(f"wrote a random {kind} checkpoint with {experts} experts to {path}")


def inspect(
    model: Annotated[str, typer.Option("--model", help=CHECKPOINT_HELP)],
    prompt: Annotated[str, typer.Option(help="text to route")] = "The swarm splits the work.",
    dtype: Annotated[str, typer.Option(help="float32 or bfloat16")] = "float32",
) -> None:
    """Print the model's shape and per-layer routing statistics for a prompt."""
    import torch
    from rich.console import Console
    from rich.table import Table

    from swarmoe.config import load_config
    from swarmoe.model import RoutingStats, load_model
    from swarmoe.text import Tokenizer

    path = require_checkpoint(model)
    console = Console(width=None if sys.stdout.isatty() else 120)
    cfg = load_config(path)
    net = load_model(path, dtype=dtype)
    tokenizer = Tokenizer.from_pretrained(path)
    ids = tokenizer.encode(prompt)
    params = sum(t.numel() for t in net.state_dict().values())
    text = cfg.text
    console.print(
        f"[bold]{cfg.model_type}[/] · {text.num_hidden_layers} layers · hidden {text.hidden_size} · "
        f"{text.n_routed_experts} experts, top-{text.num_experts_per_tok} · "
        f"{'vision tower · ' if cfg.is_multimodal else ''}{params:,} stored values"
    )
    with torch.no_grad(), RoutingStats.attach(net) as stats:
        net(torch.tensor([ids]))
    table = Table(title=f"Routing of {len(ids)} prompt tokens")
    rows = stats.rows()
    for column in rows[0] if rows else ():
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(*(str(v) for v in row.values()))
    console.print(table)


def register(app: typer.Typer) -> None:
    app.command("init-tiny")(init_tiny)
    app.command("inspect")(inspect)
