"""The long-document recipe: one question over long documents, split across sub-agents.

The orchestrator is shown each document's size and outline and a suggested plan: page ranges
cut along sections, at most one per sub-agent, each with the themes its section calls for
(figures, comparisons, risks). It creates the sub-agents, which read their pages in parallel
with the document tools and report findings that cite pages; it then writes one integrated
report in which every figure and claim keeps its `[doc p.N]` citation. `Coverage` follows the
run's events and tells which pages each sub-agent has read.
"""

from __future__ import annotations

import heapq
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from swarmoe.docs.tools import DocumentTools, cite

THEMES = ("figures", "comparisons", "risks")
_SECTION_THEMES = (
    (re.compile(r"risk|uncertaint|contingen|legal|litigation", re.I), ("risks",)),
    (
        re.compile(r"segment|geograph|region|business review|operating review", re.I),
        ("comparisons", "figures"),
    ),
    (
        re.compile(r"statement|financial|balance|cash flow|income|result|note|account", re.I),
        ("figures", "comparisons"),
    ),
)

ORCHESTRATOR_PROMPT = """\
You lead an analysis of long documents with a swarm of sub-agents. You see each document's size \
and outline and a suggested plan of page ranges. Run one sub-agent per plan line: call \
spawn_subagents once, with the question and {{item}} as prompt_template, the plan lines as items \
and the sub-agent system prompt below (or create_subagent and assign_task per line, all in one \
message, to merge or split lines). Sub-agents read their pages \
with the document tools and return findings with citations like [report.pdf p.12]. When all have \
reported, write one integrated report in Markdown that answers the question: a short answer \
first, then sections for key figures, comparisons and risks. Every figure and every claim must \
keep the citation of the page it came from; drop nothing a sub-agent cited that bears on the \
question, and do not invent figures."""

SUBAGENT_PROMPT = """\
You analyse an assigned page range of a document with the document tools. Read every page of \
your range with read_pages (at most 10 pages per call; several calls in one message run in \
parallel); use tables(doc, page) for tabular pages and search(doc, query) to check a fact \
elsewhere. Report only what the pages say, as Markdown bullet lines of the form \
"- THEME: finding [doc p.N]" where THEME is FIGURE, COMPARISON or RISK and [doc p.N] is the \
citation printed above the page. Every line must carry its citation."""


@dataclass(frozen=True)
class Assignment:
    """One sub-agent's share of the work: a page range (1-based, inclusive) of one document."""

    agent: str
    doc: str
    first: int
    last: int
    section: str
    themes: tuple[str, ...]

    def line(self) -> str:
        """The plan line the orchestrator sees (and a scripted model can parse)."""
        return f"- {self.agent}: {self.doc} pages {self.first}-{self.last} | section: {self.section} | themes: {', '.join(self.themes)}"


def _themes(section: str) -> tuple[str, ...]:
    for pattern, themes in _SECTION_THEMES:
        if pattern.search(section):
            return themes
    return THEMES


def _sections(tools: DocumentTools, name: str) -> list[tuple[str, int, int]]:
    """Top-level sections of a document as (title, first, last), 1-based, covering every page;
    pages before the first heading and gaps become 'front matter' and 'pages N-M'."""
    outline = tools.outline(name)
    pages = outline["pages"]
    top = min((s["level"] for s in outline["sections"]), default=1)
    starts: dict[int, str] = {}
    for s in outline["sections"]:
        if s["level"] == top:
            starts.setdefault(s["first_page"], s["title"])
    if 1 not in starts:
        starts[1] = "front matter"
    firsts = sorted(starts)
    return [
        (starts[f], f, (firsts[i + 1] - 1) if i + 1 < len(firsts) else pages)
        for i, f in enumerate(firsts)
    ]


def plan(tools: DocumentTools, max_subagents: int) -> list[Assignment]:
    """Page ranges along sections, together covering every page of every document: one
    sub-agent per range, `max_subagents` of them when there are that many pages. Each further
    sub-agent goes to the section whose ranges are currently the longest, so ranges come out
    as even as the sections allow."""
    if len(tools.docs) > max_subagents:
        raise ValueError(
            f"{len(tools.docs)} documents need at least as many sub-agents (max_subagents={max_subagents})"
        )
    sections = [(name, *s) for name in tools.docs for s in _sections(tools, name)]
    if len(sections) > max_subagents:  # too many sections to respect: cut by pages alone
        sections = [(name, "whole document", 1, d.num_pages) for name, d in tools.docs.items()]
    sizes = [last - first + 1 for _, _, first, last in sections]
    shares = [1] * len(sections)
    heap = [(-size, i) for i, size in enumerate(sizes) if size > 1]
    heapq.heapify(heap)
    for _ in range(max_subagents - len(sections)):
        if not heap:
            break
        _, i = heapq.heappop(heap)
        shares[i] += 1
        if shares[i] < sizes[i]:
            heapq.heappush(heap, (-sizes[i] / shares[i], i))
    chunks = []
    for (name, title, first, _), size, n in zip(sections, sizes, shares, strict=True):
        bounds = [first + round(j * size / n) for j in range(n + 1)]
        chunks += [(name, title, bounds[j], bounds[j + 1] - 1) for j in range(n)]
    width = len(str(len(chunks)))
    return [
        Assignment(f"a{i + 1:0{width}d}", name, a, b, title, _themes(title))
        for i, (name, title, a, b) in enumerate(chunks)
    ]


def orchestrator_task(
    tools: DocumentTools, question: str, assignments: Sequence[Assignment]
) -> str:
    """The orchestrator's task: the question, the documents' sizes and outlines, the plan."""
    parts = [f"Question: {question}", "", "Documents:"]
    for doc in tools.list_documents():
        parts.append(f"* {doc['doc']} ({doc['kind']}, {doc['pages']} pages)")
        for s in tools.outline(doc["doc"])["sections"][:60]:
            parts.append(
                f"  {'  ' * (s['level'] - 1)}- {s['title']} (pp. {s['first_page']}-{s['last_page']})"
            )
    parts += [
        "",
        f"Suggested plan ({len(assignments)} sub-agents):",
        *(a.line() for a in assignments),
    ]
    parts += ["", "Sub-agent system prompt to use:", SUBAGENT_PROMPT]
    return "\n".join(parts)


@dataclass
class Coverage:
    """Which pages each sub-agent has read, from the run's events; `on_line` (if given) hears
    a line per read, for a progress view."""

    on_line: Callable[[str], None] | None = None
    names: dict[str, str] = field(default_factory=dict)  # agent id -> name
    pages: dict[str, set[tuple[str, int]]] = field(default_factory=dict)  # name -> {(doc, page)}

    def __call__(self, event: Any) -> None:
        if event.kind == "agent_start":
            self.names[event.agent] = event.data.get("name", event.agent)
        elif (
            event.kind == "tool_result"
            and event.data.get("name") == "read_pages"
            and not event.data.get("error")
        ):
            args = event.data.get("arguments") or {}
            doc, first, last = args.get("doc"), int(args.get("first", 0)), int(args.get("last", 0))
            # what read_pages returned: the pages it printed a citation for
            read = [
                int(m)
                for m in re.findall(
                    r"^=== \[.*? p\.(\d+)\] ===$", event.data.get("content", ""), re.M
                )
            ]
            name = self.names.get(event.agent, event.agent)
            self.pages.setdefault(name, set()).update((doc, p) for p in read)
            if self.on_line and read:
                self.on_line(
                    f"{name}: {cite(doc, min(read), max(read))} read (asked {first}-{last})"
                )

    def covered(self) -> set[tuple[str, int]]:
        return set().union(*self.pages.values()) if self.pages else set()


_CITATION = re.compile(r"\[[^\[\]]+? pp?\.\d+(?:-\d+)?\]")


def uncited_lines(report: str) -> list[str]:
    """Report lines that state a figure (a digit outside headings) but cite no page."""
    out = []
    for line in report.splitlines():
        s = line.strip()
        if (
            s
            and not s.startswith("#")
            and re.search(r"\d", _CITATION.sub("", s))
            and not _CITATION.search(s)
        ):
            out.append(s)
    return out


@dataclass
class Analysis:
    """The recipe's outcome: the integrated report, the plan, the swarm's result, what each
    sub-agent read, and any report lines with figures but no citation."""

    report: str
    plan: list[Assignment]
    result: Any
    coverage: Coverage
    uncited: list[str]


async def analyze(
    tools: DocumentTools,
    question: str,
    model: Any,
    *,
    max_subagents: int = 100,
    on_progress: Callable[[str], None] | None = None,
    **swarm_options: Any,
) -> Analysis:
    """Run the recipe: plan, orchestrate sub-agents over the document tools, integrate.

    `model` and `swarm_options` go to `swarmoe.Swarm` (a model name with base_url/api_key, a
    ChatBackend, ...). Raises `swarmoe.swarm.RunStopped` when the run ends without a report."""
    from swarmoe.swarm import Swarm

    if not question.strip():
        raise ValueError("the question is empty")
    assignments = plan(tools, max_subagents)
    coverage = Coverage(on_progress)
    if on_progress:
        for a in assignments:
            on_progress(
                f"plan {a.agent}: {cite(a.doc, a.first, a.last)} {a.section} ({', '.join(a.themes)})"
            )
    swarm = Swarm(
        model,
        tools=tools.tools(),
        max_subagents=max(max_subagents, 1),
        system_prompt=ORCHESTRATOR_PROMPT,
        on_event=coverage,
        **swarm_options,
    )
    result = await swarm.run(orchestrator_task(tools, question, assignments))
    report = result.answer or ""
    return Analysis(report, assignments, result, coverage, uncited_lines(report))


def to_html(report: str, title: str) -> str:
    """A standalone HTML page for a Markdown report."""
    import html

    from markdown_it import MarkdownIt

    body = MarkdownIt("commonmark").enable("table").render(report)
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        "<style>body{font-family:system-ui,sans-serif;max-width:54rem;margin:2rem auto;line-height:1.5}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.2rem .5rem}</style>"
        f"</head><body>{body}</body></html>"
    )
