"""`swarmoe widesearch`: a WideSearch-style benchmark of a model, swarm or single agent, on any
table (see `swarmoe.tasks.widesearch`). Heavy imports stay in the command body."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any

import typer

from swarmoe.commands.model import MODEL_HELP, model_checkpoint


def register(app: typer.Typer) -> None:
    app.command("widesearch")(widesearch)


def widesearch(
    table: Annotated[Path, typer.Argument(
        help="CSV: column 1 names the entities, the header names the attributes.")],
    entities: Annotated[int | None, typer.Option(
        help="How many rows to ask for, picked with --seed (default all).")] = None,
    attributes: Annotated[str | None, typer.Option(
        help="Comma-separated columns to ask for (default all).")] = None,
    model: Annotated[str | None, typer.Option(help=MODEL_HELP)] = None,
    base_url: Annotated[str | None, typer.Option(
        help="OpenAI-compatible endpoint (env SWARMOE_BASE_URL; default Moonshot API).")] = None,
    api_key: Annotated[str | None, typer.Option(
        help="API key (env MOONSHOT_API_KEY or OPENAI_API_KEY).")] = None,
    single_agent: Annotated[bool, typer.Option(
        "--single-agent", help="The baseline: same model and tools, no sub-agents.")] = False,
    seed: Annotated[int, typer.Option(help="Seeds the row pick and the corpus.")] = 0,
    max_subagents: Annotated[int | None, typer.Option(
        help="Sub-agents per run (default 100).")] = None,
    deadline: Annotated[float | None, typer.Option(help="Wall-clock limit in seconds.")] = None,
    runs_dir: Annotated[Path | None, typer.Option(
        help="Where journals go (env SWARMOE_RUNS_DIR; default ./runs).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Benchmark a model on finding many attributes of many entities (WideSearch)."""
    import asyncio

    from swarmoe.tasks import TableError, make_task, read_table, run_task

    model = model or os.environ.get("SWARMOE_MODEL")
    options: dict[str, Any] = {"runs_dir": runs_dir}
    for key, value in (("model", model), ("api_key", api_key), ("max_subagents", max_subagents),
                       ("deadline", deadline),
                       ("base_url", base_url or os.environ.get("SWARMOE_BASE_URL"))):
        if value is not None:
            options[key] = value
    try:
        columns = None if attributes is None else [a.strip() for a in attributes.split(",")
                                                   if a.strip()]
        task = make_task(read_table(table), entities=entities, attributes=columns, seed=seed)
        checkpoint = model_checkpoint(model)
        if checkpoint is not None:
            from swarmoe import LLM  # a checkpoint: the agents run on the in-process engine

            options["model"] = LLM(checkpoint)
        result = asyncio.run(run_task(task, options, single_agent=single_agent))
    except (TableError, ValueError, TypeError, FileNotFoundError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    if as_json:
        typer.echo(json.dumps(result.to_json()))
    else:
        _summary(result)
    if result.stopped:
        raise typer.Exit(1)


def _summary(result: Any) -> None:
    """The graded table (right cells green, wrong red with the expected value, missing yellow)
    and one line each of scores and swarm statistics."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    task, grade, stats = result.task, result.grade, result.stats
    console = Console()
    mode = "single agent" if result.single_agent else "swarm"
    view = Table(title=f"WideSearch: {len(task.entities)} x {len(task.attributes)}, {mode}, "
                       f"{result.model}, seed {task.seed}")
    for column in (task.entity_column, *task.attributes):
        view.add_column(column)
    by_cell = {(c.entity, c.attribute): c for c in grade.cells}
    for entity in task.entities:
        cells: list[Text | str] = [entity]
        for attribute in task.attributes:
            c = by_cell[(entity, attribute)]
            if c.correct:
                cells.append(Text(c.got or "", style="green"))
            elif c.got:
                cells.append(Text(f"{c.got} (want {c.expected})", style="red"))
            else:
                cells.append(Text(f"- (want {c.expected})", style="yellow"))
        view.add_row(*cells)
    console.print(view)
    if grade.extra_rows:
        console.print(Text(f"extra rows: {', '.join(grade.extra_rows)}", style="red"))
    if grade.parsed.error:
        console.print(Text(f"answer not graded: {grade.parsed.error}", style="red"))
        if result.answer:
            console.print(result.answer[:2000], markup=False)
    if result.stopped:
        console.print(Text(f"run stopped: {result.stopped}", style="red"))
    right = sum(c.correct for c in grade.cells)
    console.print(
        f"item P/R/F1 {grade.item_precision:.3f}/{grade.item_recall:.3f}/{grade.item_f1:.3f} "
        f"({right}/{len(grade.cells)} cells), row F1 {grade.row_f1:.3f}, "
        f"exact {'yes' if grade.exact else 'no'}", markup=False)
    console.print(
        f"{stats.subagents} sub-agents, {stats.tool_calls} tool calls, "
        f"{stats.critical_steps} critical steps, {stats.total_steps} total steps, "
        f"{stats.prompt_tokens + stats.completion_tokens} tokens, {stats.wall_seconds:.1f} s "
        f"[run {result.run_id}]", markup=False)
