"""`swarmoe analyze`: the long-document recipe from the command line."""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any

import typer

from swarmoe.commands.model import MODEL_HELP, model_checkpoint


def register(app: typer.Typer) -> None:
    app.command("analyze")(analyze)


def analyze(
    files: Annotated[
        list[Path], typer.Argument(help="Documents: PDF, HTML, DOCX, Markdown or text.")
    ],
    question: Annotated[str, typer.Option("--question", "-q", help="What the report must answer.")],
    out: Annotated[
        Path | None, typer.Option(help="Write the report here (.md or .html); default: print it.")
    ] = None,
    max_subagents: Annotated[int, typer.Option(help="Sub-agents, one per page range.")] = 100,
    model: Annotated[str | None, typer.Option(help=MODEL_HELP)] = None,
    base_url: Annotated[
        str | None,
        typer.Option(
            help="OpenAI-compatible endpoint (env SWARMOE_BASE_URL; default Moonshot API)."
        ),
    ] = None,
    api_key: Annotated[
        str | None, typer.Option(help="API key (env MOONSHOT_API_KEY or OPENAI_API_KEY).")
    ] = None,
    deadline: Annotated[float | None, typer.Option(help="Wall-clock limit in seconds.")] = None,
    runs_dir: Annotated[
        Path | None,
        typer.Option(help="Where run journals go (env SWARMOE_RUNS_DIR; default ./runs)."),
    ] = None,
    cache_dir: Annotated[
        Path | None,
        typer.Option(help="Document cache (env SWARMOE_CACHE_DIR; default ~/.cache/swarmoe)."),
    ] = None,
    quiet: Annotated[bool, typer.Option(help="No progress lines on stderr.")] = False,
    as_json: Annotated[
        bool,
        typer.Option(
            "--json", help="Print one JSON object: answer, findings, swarm stats (and grade)."
        ),
    ] = False,
    grade: Annotated[
        bool,
        typer.Option(
            help="Grade the report against FILE's planted facts, read from the sidecar beside "
            "it (report.pdf -> report.facts.json, as swarmoe.tasks.report.make_report_task "
            "writes it); one FILE only."
        ),
    ] = False,
) -> None:
    """Answer a question over long documents with a swarm: the documents are split by section
    and page range across sub-agents, and one report cites the pages of every figure and claim."""
    import asyncio

    from swarmoe.docs import DocumentError
    from swarmoe.docs.recipe import analyze as run_recipe
    from swarmoe.docs.recipe import to_html
    from swarmoe.docs.tools import DocumentTools
    from swarmoe.swarm import RunStopped
    from swarmoe.tasks.report import grade_report, load_facts, parse_findings

    def say(line: str) -> None:
        if not quiet:
            typer.echo(line, err=True)

    if out is not None and out.suffix.lower() not in (".md", ".markdown", ".html", ".htm"):
        typer.echo(f"error: --out must end in .md or .html, got {out.name}", err=True)
        raise typer.Exit(2)
    facts = None
    if grade:
        try:
            if len(files) != 1:
                raise ValueError(f"--grade grades one document, got {len(files)}")
            facts = load_facts(files[0])
        except (FileNotFoundError, ValueError) as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from None
    options: dict[str, Any] = {"runs_dir": runs_dir, "deadline": deadline}
    chosen: Any = model or os.environ.get("SWARMOE_MODEL") or "kimi-k2.5"
    options["base_url"] = base_url or os.environ.get("SWARMOE_BASE_URL")
    options["api_key"] = api_key
    try:
        checkpoint = model_checkpoint(chosen)
        if checkpoint is not None:
            from swarmoe import LLM  # a checkpoint: the swarm runs on the in-process engine

            say(f"model: local checkpoint {checkpoint} (its answers are only as good as its weights)")
            chosen = LLM(checkpoint)
            options.pop("base_url")
            options.pop("api_key")
        say(f"opening {len(files)} document(s)")
        tools = DocumentTools(files, cache_dir=cache_dir)
        for d in tools.list_documents():
            say(f"  {d['doc']}: {d['pages']} pages, {d['outline_entries']} outline entries")
        analysis = asyncio.run(
            run_recipe(
                tools, question, chosen, max_subagents=max_subagents, on_progress=say, **options
            )
        )
    except (DocumentError, ValueError, TypeError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    except RunStopped as e:
        typer.echo(f"stopped: {e.reason} (run {e.result.run_id})", err=True)
        if as_json:
            typer.echo(
                json.dumps(
                    {
                        "run_id": e.result.run_id,
                        "question": question,
                        "answer": None,
                        "stopped": e.reason,
                        "stats": asdict(e.result.stats),
                    }
                )
            )
        raise typer.Exit(1) from None
    stats = analysis.result.stats
    covered = len(analysis.coverage.covered())
    total = sum(d["pages"] for d in tools.list_documents())
    say(
        f"[{analysis.result.run_id}] {stats.subagents} sub-agents read {covered}/{total} pages; {stats.tool_calls} tool calls, critical steps {stats.critical_steps}, {stats.wall_seconds:.1f} s"
    )
    if analysis.uncited:
        say(
            f"warning: {len(analysis.uncited)} report line(s) state figures without a page citation"
        )
    findings = parse_findings(analysis.report)
    graded = None
    if facts is not None:
        graded = grade_report(facts, findings, doc=tools.list_documents()[0]["doc"])
        g = graded.to_dict()
        say(
            f"grade: {g['cited']}/{g['facts_total']} planted facts cited on their page, "
            f"{g['found']} stated; citations right in {g['precise']}/{g['checkable']} findings; "
            f"score {g['score']:.3f}"
        )
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "run_id": analysis.result.run_id,
                    "question": question,
                    "answer": analysis.report,
                    "stopped": None,
                    "documents": tools.list_documents(),
                    "pages_read": covered,
                    "findings": [f.to_dict() for f in findings],
                    "uncited_lines": analysis.uncited,
                    "stats": asdict(stats),
                    "grade": graded.to_dict() if graded else None,
                }
            )
        )
    elif out is None:
        typer.echo(analysis.report)
    if out is None:
        return
    text = (
        to_html(analysis.report, question)
        if out.suffix.lower() in (".html", ".htm")
        else analysis.report
    )
    out.write_text(text, encoding="utf-8")
    say(f"report written to {out}")
