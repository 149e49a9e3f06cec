"""The long-document recipe over the synthetic report with 100 sub-agents, driven by a scripted
model: every planted fact reaches the integrated report with its page citation, every page is
read by the sub-agent planned for it, and the run takes about its critical path."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from swarmoe.docs.recipe import analyze, plan, uncited_lines
from swarmoe.docs.synthetic import generate_report
from swarmoe.docs.tools import READ_MAX_PAGES, DocumentTools, cite
from swarmoe.testing import FakeModel
from swarmoe.testing.fake_model import reply

LATENCY = 1.0
PLAN_LINE = re.compile(
    r"^- (\S+): (\S+) pages (\d+)-(\d+) \| section: (.*?) \| themes: (.*)$", re.M
)
PAGE_BLOCK = re.compile(r"^=== (\[(\S+) p\.(\d+)\]) ===\n(.*?)(?=^=== \[|\Z)", re.M | re.S)


def _steps(messages: list[dict]) -> int:
    return sum(m["role"] == "assistant" for m in messages)


def orchestrator(messages: list[dict]) -> dict | str:
    """Create one sub-agent per plan line, assign them all at once, then integrate."""
    task = messages[1]["content"]
    lines = PLAN_LINE.findall(task)
    system = task.split("Sub-agent system prompt to use:\n", 1)[1]
    step = _steps(messages)
    if step == 0:
        return reply(
            tool_calls=[
                ("create_subagent", {"name": a, "system_prompt": system}) for a, *_ in lines
            ]
        )
    if step == 1:
        question = task.splitlines()[0]
        return reply(
            tool_calls=[
                (
                    "assign_task",
                    {"agent": a, "prompt": f"{question}\nYour pages: {doc} pages {f}-{last}"},
                )
                for a, doc, f, last, *_ in lines
            ]
        )
    findings = [
        ln
        for m in messages
        if m["role"] == "tool"
        for ln in m["content"].splitlines()
        if ln.startswith("- ")
    ]
    out = ["# Report", "", "Answer: the findings below, each with its page."]
    for theme, title in (
        ("FIGURE", "Key figures"),
        ("COMPARISON", "Comparisons"),
        ("RISK", "Risks"),
    ):
        out += ["", f"## {title}", *[f for f in findings if f.startswith(f"- {theme}:")]]
    return "\n".join(out)


def subagent(messages: list[dict]) -> dict | str:
    """Read the assigned pages (10 per call, in parallel), fetch tables of tabular pages, and
    report what the pages print, citing each."""
    doc, first, last = re.search(
        r"Your pages: (\S+) pages (\d+)-(\d+)", messages[1]["content"]
    ).groups()
    first, last = int(first), int(last)
    step = _steps(messages)
    if step == 0:
        return reply(
            tool_calls=[
                ("read_pages", {"doc": doc, "first": a, "last": min(last, a + READ_MAX_PAGES - 1)})
                for a in range(first, last + 1, READ_MAX_PAGES)
            ]
        )
    pages = [
        b
        for m in messages
        if m["role"] == "tool" and m["content"].startswith("===")
        for b in PAGE_BLOCK.findall(m["content"])
    ]
    tabular = [int(p) for _, _, p, text in pages if "Segment results" in text]
    if step == 1 and tabular:
        return reply(tool_calls=[("tables", {"doc": doc, "page": p}) for p in tabular])
    found = []
    for citation, _, _, text in pages:
        for line in text.splitlines():
            if line.startswith("In fiscal"):
                found.append(f"- FIGURE: {line} {citation}")
            elif line.startswith("Risk:"):
                found.append(f"- RISK: {line.removeprefix('Risk: ')} {citation}")
    for m in messages:
        if m["role"] == "tool" and m["content"].startswith("[{"):
            for t in json.loads(m["content"]):
                rows = [r.strip("| ").split(" | ") for r in t["table"].splitlines()[2:]]
                found.append(
                    "- COMPARISON: "
                    + "; ".join(f"{r[0]} revenue {r[1]}, operating income {r[2]}" for r in rows)
                    + f" {t['cite']}"
                )
    return "\n".join(found) or "Nothing relevant on these pages."


def script(body: dict) -> dict | str:
    names = {t["function"]["name"] for t in body.get("tools") or []}
    return (
        orchestrator(body["messages"]) if "create_subagent" in names else subagent(body["messages"])
    )


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("recipe")
    rep = generate_report(folder / "annual.pdf", pages=300, seed=5)
    return rep, DocumentTools([rep.path], cache_dir=folder / "cache"), folder


def test_plan_follows_sections_and_covers_every_page(report) -> None:
    rep, tools, _ = report
    for n in (100, 37, 3):
        assignments = plan(tools, n)
        assert len(assignments) == n
        assert sorted(p for a in assignments for p in range(a.first, a.last + 1)) == list(
            range(1, rep.num_pages + 1)
        )
    risky = [a for a in plan(tools, 100) if a.section == "Risk Factors"]
    assert risky and all(a.themes == ("risks",) for a in risky)
    bounds = {title: (first + 1, last + 1) for title, first, last in rep.sections} | {
        "Cover": (1, 2)
    }
    for a in plan(tools, 100):  # a range never spans two sections
        assert bounds[a.section][0] <= a.first <= a.last <= bounds[a.section][1], a


async def test_hundred_subagents_integrate_every_fact_with_citations(report) -> None:
    rep, tools, folder = report
    fake = FakeModel(script, latency=LATENCY)
    progress: list[str] = []
    started = time.monotonic()
    analysis = await analyze(
        tools,
        "What are the key figures, segment results and risks?",
        fake.backend(),
        max_subagents=100,
        on_progress=progress.append,
        runs_dir=folder / "runs",
    )
    wall = time.monotonic() - started
    print(f"recipe wall {wall:.2f} s")
    stats = analysis.result.stats
    assert stats.subagents == 100 and len(analysis.plan) == 100
    lines = analysis.report.splitlines()
    for fact in rep.facts:
        citation = cite("annual.pdf", fact.page + 1)
        assert any(fact.value in ln and citation in ln for ln in lines), (fact, citation)
    assert analysis.uncited == []
    # every page read, each by the sub-agent planned for it, and the progress view says so
    assert analysis.coverage.covered() == {("annual.pdf", p) for p in range(1, rep.num_pages + 1)}
    for a in analysis.plan:
        assert analysis.coverage.pages[a.agent] == {
            ("annual.pdf", p) for p in range(a.first, a.last + 1)
        }
    assert any(line.startswith(f"{analysis.plan[0].agent}: [annual.pdf pp.") for line in progress)
    # create, assign (+ the slowest sub-agent's read, tables, report), integrate
    assert stats.critical_steps == 6
    critical_path = stats.critical_steps * LATENCY
    assert wall <= 1.5 * critical_path, f"wall {wall:.2f} s vs critical path {critical_path} s"


def test_uncited_lines() -> None:
    report = "# Results 2024\n\n- Revenue rose to $5.1 billion [a.pdf p.3]\n- Costs were 2.0 billion\n- Strong year overall"
    assert uncited_lines(report) == ["- Costs were 2.0 billion"]


def test_html_output(tmp_path: Path) -> None:
    from swarmoe.docs.recipe import to_html

    page = to_html("# Title\n\n| a | b |\n|---|---|\n| 1 | 2 [x.pdf p.1] |\n", "R & D")
    assert (
        "<h1>Title</h1>" in page
        and "<td>2 [x.pdf p.1]</td>" in page
        and "<title>R &amp; D</title>" in page
    )


def test_analyze_command(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from swarmoe.cli import app

    rep = generate_report(tmp_path / "small.pdf", pages=40, seed=2)
    fake = FakeModel(script)
    runner = CliRunner()
    common = [
        "--cache-dir",
        str(tmp_path / "cache"),
        "--runs-dir",
        str(tmp_path / "runs"),
        "--model",
        "fake",
        "--api-key",
        "x",
    ]
    with fake.serve() as url:
        res = runner.invoke(
            app,
            [
                "analyze",
                str(rep.path),
                "-q",
                "Figures and risks?",
                "--max-subagents",
                "8",
                "--out",
                str(tmp_path / "r.html"),
                "--base-url",
                url,
                *common,
            ],
        )
    assert res.exit_code == 0, res.output
    page = (tmp_path / "r.html").read_text()
    assert page.startswith("<!doctype html>") and "<h2>Risks</h2>" in page
    for fact in rep.facts:
        assert fact.value in page and cite("small.pdf", fact.page + 1) in page
    assert "8 sub-agents read 40/40 pages" in res.output
    (tmp_path / "broken.pdf").write_bytes(b"%PDF-1.4 junk")
    res = runner.invoke(
        app,
        [
            "analyze",
            str(tmp_path / "broken.pdf"),
            "-q",
            "x",
            "--base-url",
            "http://127.0.0.1:9",
            *common,
        ],
    )
    assert res.exit_code == 2 and "broken.pdf" in res.output
    res = runner.invoke(
        app, ["analyze", str(rep.path), "-q", "x", "--out", str(tmp_path / "r.txt"), *common]
    )
    assert res.exit_code == 2 and "--out must end in .md or .html" in res.output
