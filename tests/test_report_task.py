"""The long-report task: citations parse in the forms models write, planted facts are matched by
value, every error costs exactly what the grading rules say, and `swarmoe analyze --json
--grade` reports the same grade as `grade_report` on its answer."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from swarmoe.cli import app
from swarmoe.docs.synthetic import PlantedFact
from swarmoe.tasks.report import (
    Citation,
    ReportTask,
    grade_report,
    load_facts,
    make_report_task,
    parse_findings,
)
from swarmoe.testing import FakeModel
from swarmoe.testing.fake_model import reply


@pytest.fixture(scope="module")
def task(tmp_path_factory: pytest.TempPathFactory) -> ReportTask:
    return make_report_task(seed=11, pages=60, directory=tmp_path_factory.mktemp("report"))


def cited(fact: PlantedFact, doc: str = "report-11-60.pdf") -> str:
    """The fact's printed line with the citation the recipe asks for."""
    return f"- {fact.text} [{doc} p.{fact.page + 1}]"


def perfect(task: ReportTask) -> list[str]:
    return [cited(f, task.path.name) for f in task.facts]


def grade(task: ReportTask, lines: list[str]):
    return grade_report(task.facts, parse_findings("\n".join(lines)), doc=task.path.name)


# -- parsing ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "citations"),
    [
        ("- FIGURE: capex rose [report.pdf p.12]", [("report.pdf", 12, 12)]),
        ("capex rose [report.pdf p12]", [("report.pdf", 12, 12)]),
        ("capex rose [Report.pdf P. 12]", [("Report.pdf", 12, 12)]),
        ("capex rose [report.pdf, page 12]", [("report.pdf", 12, 12)]),
        ("capex rose (p. 12)", [(None, 12, 12)]),
        ("capex rose (page 12)", [(None, 12, 12)]),
        ("capex rose (see report.pdf p. 4)", [("report.pdf", 4, 4)]),
        ("capex rose, p. 12.", [(None, 12, 12)]),
        ("capex rose on page 12", [(None, 12, 12)]),
        ("capex rose [report.pdf pp.12-14]", [("report.pdf", 12, 14)]),
        ("capex rose [report.pdf pp. 12–14]", [("report.pdf", 12, 14)]),
        ("capex rose, pages 12 to 14", [(None, 12, 14)]),
        ("capex rose [report.pdf p.3, 5]", [("report.pdf", 3, 3), ("report.pdf", 5, 5)]),
        ("capex rose [a.pdf p.3 and p.5]", [("a.pdf", 3, 3), ("a.pdf", 5, 5)]),
        ("capex rose [a.pdf p.3; b.pdf p.5]", [("a.pdf", 3, 3), ("b.pdf", 5, 5)]),
        ("| Aurora | 5,433 | [r.pdf p.9] |", [("r.pdf", 9, 9)]),
        ("the group grew 12% (in $ millions), top 5 in FY2024 [1]", []),
    ],
)
def test_citation_forms(line: str, citations: list[tuple]) -> None:
    (finding,) = parse_findings(line)
    assert finding.citations == tuple(Citation(*c) for c in citations)
    if citations:  # the statement keeps no trace of its citations
        assert not re.search(r"\bp(?:p|age)?\.? ?\d", finding.text, re.I), finding.text


def test_findings_are_content_lines() -> None:
    report = (
        "# Report p.1\n\n## Key figures\n\n| a | b |\n|---|---|\n"
        "- Capex was $5.1 million, and R&D $3m [x.pdf p.4], [x.pdf p.5].\n[x.pdf p.6]\n---\n"
    )
    findings = parse_findings(report)
    assert [f.text for f in findings] == ["a b", "Capex was $5.1 million, and R&D $3m."]
    assert [c.first for c in findings[1].citations] == [4, 5, 6]  # the citation-only line joins


# -- matching planted facts -------------------------------------------------------------------

CAPEX = PlantedFact(
    "capex-2024",
    "figure",
    4,
    "In fiscal 2024: Capital expenditures totaled $1,234.5 million, mainly for new hubs.",
    "How much was capex?",
    "1,234.5",
)
STAFF = PlantedFact(
    "headcount-2024",
    "figure",
    5,
    "In fiscal 2024: The group employed 12,340 people at the end of the financial year.",
    "How many people?",
    "12,340",
)
SEGMENTS = PlantedFact(
    "segments-2024",
    "segment_table",
    6,
    "Segment results for fiscal 2024 (in $ millions): Kestrel revenue 5,433, operating income "
    "467; Aurora revenue 4,730, operating income 553; Corporate revenue 900, operating income 81",
    "Compare Kestrel and Aurora",
    "5,433",
)
RISK = PlantedFact(
    "risk-pension-0",
    "risk",
    7,
    "Risk: A deficit in the Kestrel pension scheme could require additional cash contributions.",
    "What is the pension risk (Kestrel)?",
    "Kestrel",
)


@pytest.mark.parametrize(
    ("fact", "stated", "not_stated"),
    [
        (
            CAPEX,
            [
                "Capex: $1,234.5 million",
                "capex 1234.5",
                "capex $1,234.50m",
                "capex of $1.2345 billion",
                "capex $1.2345bn",
            ],
            ["capex $1.2 billion", "capex 1,234", "capex 11,234.5", "capex 1,234.56", "p1234.5"],
        ),
        (
            STAFF,
            ["12,340 employees", "12340 staff", "12.34 thousand people"],
            ["12,341 employees", "12.3 thousand people", "123,40 staff"],
        ),
        (
            SEGMENTS,
            ["Kestrel revenue 5,433", "Kestrel: $5.433 billion revenue", "Kestrel 5433"],
            ["Aurora revenue 5,433", "Kestrel revenue 4,730", "revenue 5,433"],
        ),
        (
            RISK,
            ["Kestrel pension deficit", "a deficit at Kestrel's scheme", "KESTREL PENSIONS"],
            ["Kestrel revenue 5,433", "Kestrel 2 pension deficit", "pension deficit"],
        ),
    ],
)
def test_key_content(fact: PlantedFact, stated: list[str], not_stated: list[str]) -> None:
    for text in stated + not_stated:
        found = grade_report([fact], parse_findings(f"- {text} [x.pdf p.{fact.page + 1}]"))
        assert found.facts[0].found is (text in stated), text
        assert found.facts[0].cited is (text in stated), text


def test_a_segment_row_does_not_state_the_risk_of_its_namesake() -> None:
    lines = ["- Kestrel revenue 5,433, operating income 467 (p. 7)"]
    graded = grade_report([SEGMENTS, RISK], parse_findings("\n".join(lines)))
    assert [(f.found, f.cited) for f in graded.facts] == [(True, True), (False, False)]


# -- the grade --------------------------------------------------------------------------------


def test_perfect_answers_score_one(task: ReportTask) -> None:
    assert {f.kind for f in task.facts} == {"figure", "segment_table", "risk"}
    paraphrased = []  # the same facts in other words and number formats
    for f in task.facts:
        page = f"(page {f.page + 1})"
        if f.kind == "figure":
            paraphrased.append(f"* {f.label}: {f.value.replace(',', '')} {page}")
        elif f.kind == "segment_table":
            owner = re.search(rf"(\w+) revenue {re.escape(f.value)}", f.text)[1]
            paraphrased.append(f"| {owner} | {f.value} | {page} |")
        else:
            paraphrased.append(f"1. {f.value}: {f.query} {page}")
    for lines in (perfect(task), paraphrased):
        graded = grade(task, ["# Answer", "", *lines])
        assert (graded.score, graded.recall, graded.cited_recall, graded.precision) == (1, 1, 1, 1)
        assert graded.checkable == graded.precise == len(task.facts) and graded.uncited == 0
    assert task.grade("\n".join(perfect(task))) == grade(task, perfect(task))


def test_each_error_costs_what_the_rules_say(task: ReportTask) -> None:
    n = len(task.facts)
    first = task.facts[0]
    page = first.page + 1
    rest = perfect(task)[1:]
    text = first.text

    # a neighbouring page: stated, not cited, and the finding's citation is wrong
    wrong = grade(task, [f"- {text} [report-11-60.pdf p.{page + 1}]", *rest])
    assert (wrong.recall, wrong.cited_recall, wrong.precision) == (1, (n - 1) / n, (n - 1) / n)
    assert wrong.score == pytest.approx(((n - 1) / n) ** 2)
    assert wrong.facts[0].found and not wrong.facts[0].cited
    assert wrong.facts[0].cited_pages == (page + 1,)
    # a range over the page, or an extra page that holds nothing stated, costs the same
    for citation in (f"pp.{page}-{page + 1}", f"p.{page}, {page + 1}"):
        other = grade(task, [f"- {text} [report-11-60.pdf {citation}]", *rest])
        assert other.to_dict() | {"facts": None} == wrong.to_dict() | {"facts": None}
        assert other.facts[1:] == wrong.facts[1:] and other.facts[0].cited_pages == (page, page + 1)
    # no citation (or one of another document): stated, not cited; precision unaffected
    for citation in ("", "[annual.pdf p.{page}]"):
        uncited = grade(task, [f"- {text} {citation.format(page=page)}", *rest])
        assert (uncited.recall, uncited.cited_recall, uncited.precision) == (1, (n - 1) / n, 1)
        assert uncited.score == (n - 1) / n and uncited.uncited == 1
    # missing: neither stated nor cited
    missing = grade(task, rest)
    assert (missing.recall, missing.cited_recall, missing.precision) == ((n - 1) / n,) * 2 + (1,)
    assert missing.score == (n - 1) / n and missing.facts[0].finding is None
    # a citation without a document name is taken for the graded document
    assert grade(task, [f"- {text} (p. {page})", *rest]).score == 1
    # all three at once: the first on a wrong page, the second uncited, the third missing
    second = task.facts[1].text
    combined = grade(task, [f"- {text} [report-11-60.pdf p.{page + 1}]", f"- {second}", *rest[2:]])
    assert [(f.found, f.cited) for f in combined.facts[:3]] == [(1, 0), (1, 0), (0, 0)]
    assert (combined.checkable, combined.precise, combined.uncited) == (n - 2, n - 3, 1)
    assert (combined.recall, combined.cited_recall) == ((n - 1) / n, (n - 3) / n)
    assert combined.score == pytest.approx((n - 3) / n * (n - 3) / (n - 2))


def test_one_finding_may_cite_two_facts(task: ReportTask) -> None:
    a, b = task.facts[:2]
    line = (
        f"- {a.text}; {b.text} [report-11-60.pdf p.{a.page + 1}; report-11-60.pdf p.{b.page + 1}]"
    )
    graded = grade(task, [line, *perfect(task)[2:]])
    assert graded.score == 1 and graded.facts[0].finding == graded.facts[1].finding == 0
    with pytest.raises(ValueError, match="no planted facts"):
        grade_report([], parse_findings(line))


# -- tasks and sidecars ------------------------------------------------------------------------


def test_tasks_are_seeded_and_keep_their_facts(task: ReportTask, tmp_path: Path) -> None:
    again = make_report_task(seed=11, pages=60, directory=tmp_path / "again")
    other = make_report_task(seed=12, pages=60, directory=tmp_path / "other")
    assert again.facts == task.facts and other.facts != task.facts
    assert again.path.name == task.path.name and task.path.is_file()
    assert load_facts(task.path) == task.facts and load_facts(other.path) == other.facts
    assert "page" in task.question
    with pytest.raises(FileNotFoundError, match=r"nothing\.facts\.json"):
        load_facts(tmp_path / "nothing.pdf")
    (tmp_path / "bad.facts.json").write_text('{"facts": [{"label": 1}]}')
    with pytest.raises(ValueError, match="not a planted-facts file"):
        load_facts(tmp_path / "bad.pdf")


# -- swarmoe analyze --json --grade ------------------------------------------------------------

PLAN_LINE = re.compile(r"^- (\S+): (\S+) pages (\d+)-(\d+) \|", re.M)
PAGE_BLOCK = re.compile(r"^=== (\[\S+ p\.\d+\]) ===\n(.*?)(?=^=== \[|\Z)", re.M | re.S)


def _script(body: dict) -> dict | str:
    """Orchestrator: one sub-agent per plan line, then the findings, the first figure's without
    its citation. Sub-agents: read the pages, report figure, segment and risk lines."""
    messages = body["messages"]
    step = sum(m["role"] == "assistant" for m in messages)
    task = messages[1]["content"]
    if "create_subagent" in {t["function"]["name"] for t in body.get("tools") or []}:
        lines = PLAN_LINE.findall(task)
        if step == 0:
            return reply(
                tool_calls=[
                    ("create_subagent", {"name": a, "system_prompt": "Read your pages."})
                    for a, *_ in lines
                ]
            )
        if step == 1:
            return reply(
                tool_calls=[
                    ("assign_task", {"agent": a, "prompt": f"Your pages: {d} pages {f}-{last}"})
                    for a, d, f, last in lines
                ]
            )
        found = [ln for m in messages if m["role"] == "tool" for ln in m["content"].splitlines()]
        found = [ln for ln in found if ln.startswith("- ")]
        figure = next(i for i, ln in enumerate(found) if ln.startswith("- FIGURE"))
        found[figure] = found[figure].rsplit(" [", 1)[0]
        return "\n".join(["# Report", "", "Answer: see below.", "", *found])
    doc, first, last = re.search(r"Your pages: (\S+) pages (\d+)-(\d+)", task).groups()
    if step == 0:
        return reply(
            tool_calls=[
                ("read_pages", {"doc": doc, "first": a, "last": min(int(last), a + 4)})
                for a in range(int(first), int(last) + 1, 5)  # 5 pages stay under the size cap
            ]
        )
    out = []
    for m in messages:
        for citation, text in PAGE_BLOCK.findall(m["content"] if m["role"] == "tool" else ""):
            lines = text.splitlines()
            for i, line in enumerate(lines):
                if line.startswith(("In fiscal", "Risk:")):
                    out.append(f"- {'FIGURE' if line[0] == 'I' else 'RISK'}: {line} {citation}")
                elif line.startswith("Segment results"):
                    out.append(
                        f"- COMPARISON: {line}: {'; '.join(lines[i + 2 : i + 5])} {citation}"
                    )
    return "\n".join(out) or "Nothing relevant."


def test_analyze_json_reports_the_grade(task: ReportTask, tmp_path: Path) -> None:
    runner = CliRunner()
    common = ["--cache-dir", str(tmp_path / "cache"), "--runs-dir", str(tmp_path / "runs")]
    common += ["--model", "fake", "--api-key", "x", "--max-subagents", "4"]
    with FakeModel(_script).serve() as url:
        res = runner.invoke(
            app,
            ["analyze", str(task.path), "-q", task.question, "--json", "--grade", "--base-url", url]
            + common,
        )
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert {"answer", "findings", "stats", "grade", "run_id", "documents"} <= set(out)
    stats = out["stats"]
    assert stats["subagents"] == 4 and stats["tool_calls"] >= 4
    assert {"critical_steps", "total_steps", "wall_seconds"} <= set(stats)
    findings = parse_findings(out["answer"])
    assert out["findings"] == [f.to_dict() for f in findings]
    expected = grade_report(load_facts(task.path), findings, doc=task.path.name)
    assert out["grade"] == json.loads(json.dumps(expected.to_dict()))
    n = len(task.facts)  # every fact reported, one figure without its page
    assert (out["grade"]["found"], out["grade"]["cited"], out["grade"]["uncited"]) == (n, n - 1, 1)
    assert out["grade"]["score"] == pytest.approx((n - 1) / n)
    assert "grade: " in res.stderr

    for files, message in (
        ([task.path, task.path], "one document"),
        ([tmp_path / "x.pdf"], "x.facts.json"),
    ):
        res = runner.invoke(app, ["analyze", *map(str, files), "-q", "x", "--grade", *common])
        assert res.exit_code == 2 and message in res.output, res.output
