"""WideSearch-style tasks: find many attributes of many entities and return the whole table.

This is the task family where Kimi K2.5's agent swarm gains most: the work is wide (entities x
attributes lookups) and each lookup is independent, so sub-agents can take entities in parallel.
A task is built from any table (`read_table` a CSV, or `random_table` for unseen ones): a local
corpus states the facts in prose among distractor pages, `search` / `open_page` tools read it,
and the returned table is graded item-, row- and table-wise (`grading.py`).

    task = make_task(random_table(seed=1, entities=20, attributes=4), entities=10, seed=1)
    result = await run_task(task, {"model": "kimi-k2.5"})              # the swarm
    baseline = await run_task(task, {"model": "kimi-k2.5"}, single_agent=True)
    result.grade.item_f1, result.grade.row_f1, result.grade.exact, result.stats.critical_steps

The same model runs both ways; `single_agent=True` only takes the sub-agent tools away.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from swarmoe.swarm import AssistantMessage, ChatBackend, RunStopped, Swarm, SwarmStats, Tool
from swarmoe.tasks.corpus import Corpus, build_corpus
from swarmoe.tasks.grading import Grade, grade_table
from swarmoe.tasks.tables import Table, TableError, name_key

SINGLE_AGENT_PROMPT = """\
You are a research agent. Use the tools to find everything the task asks for, then give the \
final answer in the format it asks for. Tool calls in one message run in parallel."""


@dataclass
class WideSearchTask:
    """One task: the entities and attributes asked, the corpus to find them in, the prompt, and
    the expected cells (`expected[entity][attribute]`)."""

    table: Table
    entities: list[str]
    attributes: list[str]
    seed: int
    corpus: Corpus
    prompt: str
    expected: dict[str, dict[str, str]]

    @property
    def entity_column(self) -> str:
        return self.table.entity_column

    def tools(self) -> list[Tool]:
        """`search` and `open_page` over this task's corpus."""
        return self.corpus.tools()


def _prompt(entity_column: str, entities: Sequence[str], attributes: Sequence[str]) -> str:
    columns = [entity_column, *attributes]
    listing = "\n".join(f"- {e}" for e in entities)
    return (
        f"Find {len(attributes)} attributes of each of these {len(entities)} entries "
        f"({entity_column}), using the tools search (find pages) and open_page (read a page). "
        f"Facts about one entry may be spread over several pages, and some pages are about "
        f"entries with similar names: use only pages about exactly the entry named.\n\n"
        f"Entries:\n{listing}\n\n"
        f"Attributes: {', '.join(attributes)}\n\n"
        f"Answer with one Markdown table with exactly these columns:\n"
        f"| {' | '.join(columns)} |\n|{'---|' * len(columns)}\n"
        f"One row per entry, names exactly as listed, values as the pages state them. "
        f"Write unknown for a value you could not find."
    )


def make_task(table: Table, entities: int | Sequence[str] | None = None,
              attributes: Sequence[str] | None = None, seed: int = 0) -> WideSearchTask:
    """A task over `table`. `attributes`: column names (default all). `entities`: a number of
    rows to pick (seeded, among rows that have every chosen attribute), a list of names, or
    None for every row. The corpus and the pick depend only on the table and `seed`."""
    attrs = list(table.attributes if attributes is None else attributes)
    known = {name_key(a): a for a in table.attributes}
    unknown = [a for a in attrs if name_key(a) not in known]
    if unknown:
        raise TableError(f"unknown attributes {unknown}; the table has {table.attributes}")
    attrs = list(dict.fromkeys(known[name_key(a)] for a in attrs))
    if not attrs:
        raise TableError("no attributes chosen")
    complete = [e for e, row in table.rows.items() if all(row.get(a) for a in attrs)]
    if entities is None or isinstance(entities, int):
        n = len(complete) if entities is None else entities
        if not 1 <= n <= len(complete):
            raise TableError(f"cannot pick {n} entities: {len(complete)} of the table's "
                             f"{len(table.rows)} rows have all of {attrs}")
        picked = set(random.Random(f"widesearch-pick:{seed}").sample(complete, n))
        chosen = [e for e in complete if e in picked]
    else:
        by_key = {name_key(e): e for e in table.rows}
        missing = [e for e in entities if name_key(e) not in by_key]
        if missing:
            raise TableError(f"entities {missing} are not in the table")
        chosen = list(dict.fromkeys(by_key[name_key(e)] for e in entities))
        gaps = [e for e in chosen if e not in complete]
        if gaps:
            raise TableError(f"entities {gaps} lack a value for some of {attrs}")
    expected = {e: {a: table.rows[e][a] for a in attrs} for e in chosen}
    return WideSearchTask(table, chosen, attrs, seed, build_corpus(table, chosen, seed),
                          _prompt(table.entity_column, chosen, attrs), expected)


def grade(task: WideSearchTask, answer_text: str | None) -> Grade:
    """Score an answer to `task` (see `grading.grade_table`)."""
    return grade_table(task.expected, task.entity_column, task.attributes, answer_text)


@dataclass
class WideSearchResult:
    """One run of a task: the answer, its grade and the swarm's statistics (`to_json()` is the
    record benchmarks write)."""

    task: WideSearchTask
    answer: str | None
    """The final answer as returned; None when the run stopped without one."""
    grade: Grade
    stats: SwarmStats
    run_id: str
    model: str
    single_agent: bool
    stopped: str | None = None
    """Why the run ended without an answer (budget, deadline, step limit), if it did."""

    def to_json(self) -> dict[str, Any]:
        """One JSON-able record: what was asked, the answer (raw and parsed), grade, stats."""
        stats = asdict(self.stats)
        return {
            "model": self.model,
            "mode": "single-agent" if self.single_agent else "swarm",
            "seed": self.task.seed,
            "entity_column": self.task.entity_column,
            "entities": self.task.entities,
            "attributes": self.task.attributes,
            "pages": len(self.task.corpus.pages),
            "answer": self.answer,
            "parsed": {"format": self.grade.parsed.format, "columns": self.grade.parsed.columns,
                       "rows": self.grade.parsed.rows},
            "grade": self.grade.to_json(),
            "stats": {**stats, "wall_s": round(self.stats.wall_seconds, 3)},
            "run_id": self.run_id,
            "stopped": self.stopped,
        }


class _WithoutSubagents:
    """A `ChatBackend` that never shows the model the swarm's create_subagent / assign_task:
    the single-agent baseline keeps the swarm's loop (limits, retries, journal, stats) and only
    loses the sub-agents."""

    def __init__(self, inner: ChatBackend, owned: bool) -> None:
        self.inner = inner
        self.owned = owned

    async def chat(self, messages: Sequence[dict[str, Any]], tools: Sequence[Mapping[str, Any]],
                   sampling: Mapping[str, Any]) -> AssistantMessage:
        from swarmoe.swarm.swarm import SWARM_TOOL_NAMES

        kept = [t for t in tools if t.get("function", {}).get("name") not in SWARM_TOOL_NAMES]
        return await self.inner.chat(messages, kept, sampling)

    async def aclose(self) -> None:
        if self.owned:
            await self.inner.aclose()


def model_label(model: Any) -> str:
    """How a result names its model: the name, a checkpoint's path, or the backend's type."""
    if isinstance(model, str):
        return model
    path = getattr(model, "path", None)
    return str(path) if path is not None else type(model).__name__


async def run_task(task: WideSearchTask, swarm_options: Mapping[str, Any] | None = None,
                   single_agent: bool = False) -> WideSearchResult:
    """Run `task` through a `Swarm(**swarm_options)` with the task's tools added and grade the
    answer. A run that stops (budget, deadline, step limit) is graded on no answer, with
    `stopped` saying why. `single_agent=True` runs the same model and tools without sub-agents."""
    from swarmoe.swarm.backends import DEFAULT_MODEL, resolve_backend

    options = dict(swarm_options or {})
    options["tools"] = [*task.tools(), *options.get("tools", ())]
    model = options.get("model", DEFAULT_MODEL)
    wrapper = None
    if single_agent:
        inner = resolve_backend(model, base_url=options.pop("base_url", None),
                                api_key=options.pop("api_key", None),
                                timeout=options.get("request_timeout", 600.0))
        wrapper = _WithoutSubagents(inner, owned=not isinstance(model, ChatBackend))
        options.update(model=wrapper, max_subagents=0, system_prompt=SINGLE_AGENT_PROMPT)
    stopped = None
    try:
        swarm = Swarm(**options)
        try:
            result = await swarm.run(task.prompt)
        except RunStopped as e:
            result, stopped = e.result, e.reason
    finally:
        if wrapper is not None:
            await wrapper.aclose()
    return WideSearchResult(task, result.answer, grade(task, result.answer), result.stats,
                            result.run_id, model_label(model), single_agent, stopped)
