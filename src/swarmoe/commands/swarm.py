"""`swarmoe run` (a task through the agent swarm, with a live view) and `swarmoe trace`
(a journaled run's timeline and HTML Gantt chart). Heavy imports stay in the command bodies."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any

import typer

from swarmoe.commands.model import MODEL_HELP, model_checkpoint


def register(app: typer.Typer) -> None:
    app.command("run")(run)
    app.command("trace")(trace)


def run(
    task: Annotated[str | None, typer.Argument(help="The task; omit with --resume.")] = None,
    model: Annotated[str | None, typer.Option(help=MODEL_HELP)] = None,
    base_url: Annotated[str | None, typer.Option(
        help="OpenAI-compatible endpoint (env SWARMOE_BASE_URL; default Moonshot API).")] = None,
    api_key: Annotated[str | None, typer.Option(
        help="API key (env MOONSHOT_API_KEY or OPENAI_API_KEY).")] = None,
    max_subagents: Annotated[int | None, typer.Option(help="Sub-agents per run (default 100).")] = None,
    tool: Annotated[list[str] | None, typer.Option(
        "--tool", help="A tool as module:function or path/file.py:function (repeatable).")] = None,
    mcp: Annotated[list[str] | None, typer.Option(
        "--mcp", help="An MCP server: a URL (streamable HTTP) or a command (stdio); repeatable.")
    ] = None,
    file: Annotated[list[Path] | None, typer.Option(
        "--file", help="A document (PDF, HTML, DOCX, Markdown, text) the agents may read; repeatable.")
    ] = None,
    deadline: Annotated[float | None, typer.Option(help="Wall-clock limit in seconds.")] = None,
    resume: Annotated[str | None, typer.Option(
        help="Continue this run from its journal, redoing no finished call.")] = None,
    run_id: Annotated[str | None, typer.Option(help="Id for a new run (default: generated).")] = None,
    runs_dir: Annotated[Path | None, typer.Option(
        help="Where journals go (env SWARMOE_RUNS_DIR; default ./runs).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    live: Annotated[bool, typer.Option(help="Live view of agents (on a terminal).")] = True,
) -> None:
    """Run a task through the agent swarm."""
    from swarmoe.swarm import MCPTools, RunStopped, Swarm, import_tool
    from swarmoe.swarm.store import new_run_id

    view = LiveView() if live and not as_json and sys.stdout.isatty() else None
    options: dict[str, Any] = {"on_event": view.on_event if view else None}
    if not resume:  # a resumed run keeps its recorded settings unless a flag overrides one
        base_url = base_url or os.environ.get("SWARMOE_BASE_URL")
        model = model or os.environ.get("SWARMOE_MODEL")
    for key, value in (("base_url", base_url), ("api_key", api_key), ("model", model),
                       ("max_subagents", max_subagents), ("deadline", deadline)):
        if value is not None:
            options[key] = value
    try:
        checkpoint = model_checkpoint(model)
        if checkpoint is not None:
            from swarmoe import LLM  # a checkpoint: the swarm runs on the in-process engine

            options["model"] = LLM(checkpoint)
        if tool:
            options["tools"] = [import_tool(ref) for ref in tool]
        if file:
            from swarmoe.docs.tools import DocumentTools

            documents = DocumentTools(file)
            options["tools"] = [*options.get("tools", []), *documents.tools()]
            if task:
                listing = "\n".join(f"* {d['doc']} ({d['kind']}, {d['pages']} pages)"
                                     for d in documents.list_documents())
                task = f"{task}\n\nDocuments (read them with the document tools):\n{listing}"
        if mcp:
            options["mcp_servers"] = [MCPTools(spec) for spec in mcp]
        if resume:
            if task:
                raise ValueError("give either a task or --resume RUN_ID, not both")
            swarm = Swarm.from_run(resume, runs_dir=runs_dir, **options)
            the_run = swarm.resume(resume)
            typer.echo(f"resuming run {resume}", err=True)
        else:
            if not task:
                raise ValueError("give a task, or --resume RUN_ID")
            swarm = Swarm(**options, runs_dir=runs_dir)
            run_id = run_id or new_run_id()
            the_run = swarm.run(task, run_id=run_id)
            typer.echo(f"run {run_id} (resume with: swarmoe run --resume {run_id})", err=True)
    except (ValueError, TypeError, FileNotFoundError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    try:
        result = _drive(the_run, view)
    except RunStopped as e:
        _report(e.result, as_json, stopped=e.reason)
        raise typer.Exit(1) from None
    except (ValueError, FileNotFoundError) as e:  # e.g. a run id that is already taken
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    _report(result, as_json)


def _drive(coro: Any, view: LiveView | None) -> Any:
    import asyncio

    if view is None:
        return asyncio.run(coro)
    from rich.live import Live

    with Live(view, refresh_per_second=4, transient=False):
        return asyncio.run(coro)


def _report(result: Any, as_json: bool, stopped: str | None = None) -> None:
    stats = asdict(result.stats)
    if as_json:
        typer.echo(json.dumps({"run_id": result.run_id, "answer": result.answer,
                               "stopped": stopped, "stats": stats}))
        return
    if stopped:
        typer.echo(f"stopped: {stopped}", err=True)
    else:
        typer.echo(result.answer or "")
    typer.echo(
        f"[{result.run_id}] {stats['subagents']} sub-agents, {stats['total_steps']} steps "
        f"(critical {stats['critical_steps']}), {stats['tool_calls']} tool calls, "
        f"{stats['prompt_tokens'] + stats['completion_tokens']} tokens"
        + (f", cost {stats['cost']:.4f}" if stats["cost"] is not None else "")
        + f", {stats['wall_seconds']:.1f} s", err=True)


class LiveView:
    """Counts from the event stream, rendered by rich's Live on each refresh."""

    def __init__(self) -> None:
        self.agents: dict[str, dict[str, Any]] = {}
        self.tokens = 0
        self.retries = 0

    def on_event(self, event: Any) -> None:
        d = event.data
        if event.kind == "agent_start":
            self.agents[event.agent] = {"name": d["name"], "steps": 0, "tools": 0,
                                        "state": "running"}
        a = self.agents.get(event.agent)
        if event.kind == "llm_retry":
            self.retries += 1
        if a is None:
            return
        if event.kind == "llm_response":
            a["steps"] += 1
            self.tokens += sum(d.get("usage") or (0, 0))
        elif event.kind == "tool_result" and "started" in d:
            a["tools"] += 1
        elif event.kind == "agent_finish":
            a["state"] = "error" if d.get("error") else "done"

    def __rich__(self) -> Any:
        from rich.table import Table

        agents = list(self.agents.values())
        running = sum(a["state"] == "running" for a in agents)
        table = Table(title=f"{len(agents)} agent runs, {running} running, "
                            f"{sum(a['tools'] for a in agents)} tool calls, "
                            f"{self.tokens} tokens, {self.retries} retries")
        for col in ("agent", "state", "steps", "tool calls"):
            table.add_column(col)
        shown = sorted(agents, key=lambda a: a["state"] != "running")[:20]
        for a in shown:
            table.add_row(a["name"], a["state"], str(a["steps"]), str(a["tools"]))
        if len(agents) > len(shown):
            table.add_row(f"... {len(agents) - len(shown)} more", "", "", "")
        return table


def trace(
    run_id: Annotated[str, typer.Argument(help="The run to show.")],
    runs_dir: Annotated[Path | None, typer.Option(
        help="Where journals are (env SWARMOE_RUNS_DIR; default ./runs).")] = None,
    html: Annotated[Path | None, typer.Option(
        help="Where to write the Gantt chart (default RUNS_DIR/RUN_ID.html).")] = None,
) -> None:
    """Print a run's timeline and write an HTML Gantt chart of its agents and tool calls."""
    from rich.console import Console
    from rich.table import Table

    from swarmoe.swarm.store import Journal
    from swarmoe.swarm.timeline import build_timeline, render_html

    try:
        journal = Journal.open(run_id, runs_dir)
    except (FileNotFoundError, ValueError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    tl = build_timeline(journal.events())
    journal.close()
    table = Table(title=f"run {run_id}: {tl.status}, {tl.end - tl.origin:.2f} s")
    for col in ("agent", "start s", "end s", "steps", "model calls", "tool calls", "error"):
        table.add_column(col)
    for row in tl.rows:
        tools = [b for b in row.bars if b.kind == "tool"]
        table.add_row(row.name, f"{row.start - tl.origin:.2f}",
                      "-" if row.end is None else f"{row.end - tl.origin:.2f}", str(row.steps),
                      str(sum(b.kind == "llm" for b in row.bars)),
                      f"{len(tools)}" + (f" ({sum(b.error for b in tools)} failed)"
                                         if any(b.error for b in tools) else ""),
                      row.error or "")
    Console().print(table)
    out = html or journal.path.with_suffix(".html")
    out.write_text(render_html(tl, f"swarmoe run {run_id}"))
    typer.echo(f"Gantt chart: {out}")
