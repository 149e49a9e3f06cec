"""`swarmoe curriculum`: the scripted teacher's trajectories on fresh tasks, as chat JSONL for
`swarmoe train` (see `swarmoe.tasks.curriculum`)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer


def curriculum(
    out: Annotated[Path, typer.Option("--out", help="JSONL file to write")],
    runs: Annotated[int, typer.Option("--runs", min=1, help="teacher runs (one task each)")],
    seed: Annotated[int, typer.Option("--seed", help="draws every task of the curriculum")] = 0,
) -> None:
    """Write training data: the teacher solving wide-search, single-agent and report tasks."""
    import logging

    from swarmoe.tasks.curriculum import write_curriculum

    logging.getLogger("bm25s").setLevel(logging.WARNING)
    tty = sys.stderr.isatty()

    def progress(n: int, episode) -> None:
        if tty or n % 100 == 0:
            typer.echo(f"\r{n + 1} episodes ({episode.family}/{episode.role})",
                       err=True, nl=not tty)

    try:
        counts = write_curriculum(out, runs, seed, on_run=progress)
    except RuntimeError as exc:
        typer.echo(f"\nerror: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(("\n" if tty else "") + f"wrote {sum(counts.values())} episodes to {out}: "
               + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))


def register(app: typer.Typer) -> None:
    app.command("curriculum")(curriculum)
