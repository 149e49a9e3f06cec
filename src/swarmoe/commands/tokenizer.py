"""`swarmoe train-tokenizer`: learn a byte-level BPE from data, in the K2.5 release layout."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def train_tokenizer(
    data: Annotated[
        Path,
        typer.Option(
            "--data", help='JSONL: {"text": ...} or {"messages": [...], "tools": [...]} per line'
        ),
    ],
    vocab_size: Annotated[
        int,
        typer.Option("--vocab-size", help="the model's vocab_size: BPE tokens + 256 special slots"),
    ],
    out: Annotated[Path, typer.Option("--out", help="directory for the tokenizer files")],
    min_frequency: Annotated[
        int, typer.Option("--min-frequency", min=1, help="fewest occurrences of a merged pair")
    ] = 2,
) -> None:
    """Learn a tokenizer for a new model from its training data."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
    )

    from swarmoe.text.release_files import TOKENIZER_FILES
    from swarmoe.train.tokenizer import TrainingDataError, check_vocab_size
    from swarmoe.train.tokenizer import train_tokenizer as train

    try:
        check_vocab_size(vocab_size)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--vocab-size") from None
    if not data.is_file():
        raise typer.BadParameter(f"no such file: {data}", param_hint="--data")
    console = Console(stderr=True)
    total = data.stat().st_size
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as progress:
        task = progress.add_task("reading data", total=total)

        def on_bytes(n: int) -> None:
            progress.advance(task, n)
            if progress.tasks[task].completed >= total:  # all read: merging has no known end
                progress.remove_task(task)
                progress.add_task("learning merges", total=None)

        try:
            learned = train(data, out, vocab_size, min_frequency=min_frequency, on_bytes=on_bytes)
        except TrainingDataError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
    typer.echo(
        f"vocab size {learned.vocab_size} ({len(learned.vocab)} BPE tokens: 256 bytes + "
        f"{learned.num_merges} merges, then 256 special slots)"
    )
    for name in TOKENIZER_FILES:
        typer.echo(f"wrote {out / name}")
    if learned.vocab_size < vocab_size:
        typer.secho(
            f"the data has no more pairs seen {min_frequency}+ times: the vocabulary is "
            f"{learned.vocab_size}, not {vocab_size}; set vocab_size: {learned.vocab_size} "
            "in the model config",
            fg="yellow",
            err=True,
        )


def register(app: typer.Typer) -> None:
    app.command("train-tokenizer")(train_tokenizer)
