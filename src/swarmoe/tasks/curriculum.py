"""The curriculum: trajectories of the scripted teacher on freshly drawn tasks, as chat JSONL
that `swarmoe train` reads (`{"messages": [...], "tools": [...]}` per line).

Each run draws a task family and everything a held-out task may vary: entity and attribute
names (invented, so no answer can come from memory), value kinds, entity counts from 1 to 100,
attributes from 1 to 6, corpus and report seeds, report lengths and sub-agent caps. The teacher
(`teacher.py`) then drives the real `Swarm` over the real tools, and every agent conversation
that ends in an answer becomes one example: the orchestrator's (fan out, or do a small task
itself), its sub-agents', the single agent's, and the long-document recipe's.

    swarmoe curriculum --out data/curriculum.jsonl --runs 2000 --seed 1
"""

from __future__ import annotations

import asyncio
import json
import random
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from swarmoe.swarm import AssistantMessage, ChatBackend
from swarmoe.tasks.tables import Table, invent_word, name_key, random_table

#: Share of runs per family.
FAMILIES = (("widesearch", 0.62), ("single_agent", 0.13), ("report", 0.25))
#: Sub-agent conversations kept per run: a 100-entry run would otherwise fill the data with
#: near-copies of one skill.
SUBAGENTS_PER_RUN = 3


@dataclass
class Episode:
    """One agent conversation that ended in an answer, and where it came from."""

    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]]
    family: str
    role: str
    """'orchestrator', 'subagent' or 'single'."""

    def to_json(self) -> dict[str, Any]:
        return {"messages": self.messages, "tools": self.tools}


class Recorder:
    """A `ChatBackend` around a teacher that keeps every conversation the teacher ends with an
    answer (a reply without tool calls), as the messages the model saw plus that reply."""

    def __init__(self, inner: ChatBackend) -> None:
        self.inner = inner
        self.finished: list[tuple[list[dict[str, Any]], list[dict[str, Any]]]] = []

    async def chat(self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]],
                   sampling: Mapping[str, Any]) -> AssistantMessage:
        msg = await self.inner.chat(messages, tools, sampling)
        if not msg.tool_calls:
            self.finished.append(([dict(m) for m in messages] + [msg.to_message()],
                                  [dict(t) for t in tools]))
        return msg

    async def aclose(self) -> None:
        await self.inner.aclose()


def _entity_count(rng: random.Random) -> int:
    """1-100 entries, weighted to the small and middle counts, with the full 100 kept in."""
    r = rng.random()
    if r < 0.15:
        return rng.randint(1, 2)
    if r < 0.55:
        return rng.randint(3, 12)
    if r < 0.85:
        return rng.randint(13, 40)
    return rng.randint(41, 100)


def _renamed(rng: random.Random, table: Table) -> Table:
    """The table with some names redrawn in other shapes (two invented words, codes with
    digits, invented attribute names), so the model copies names instead of knowing them."""
    entities = list(table.rows)
    if rng.random() < 0.4:
        shapes: list[Callable[[], str]] = [
            lambda: f"{invent_word(rng).capitalize()} {invent_word(rng).capitalize()}",
            lambda: f"{invent_word(rng).upper()[:3]}-{rng.randint(10, 9999)}",
            lambda: f"{invent_word(rng).capitalize()} {rng.choice(('of', 'de', 'am'))} "
                    f"{invent_word(rng).capitalize()}",
            lambda: invent_word(rng, 3).capitalize(),
        ]
        shape = rng.choice(shapes)
        fresh: list[str] = []
        keys: set[str] = set()
        while len(fresh) < len(entities):
            name = shape()
            if name_key(name) not in keys:
                keys.add(name_key(name))
                fresh.append(name)
        entities = fresh
    attributes = list(table.attributes)
    if rng.random() < 0.3:
        suffixes = ("index", "code", "rating", "class", "total", "score", "figure", "mark")
        for i in range(len(attributes)):
            if rng.random() < 0.5:
                attributes[i] = f"{invent_word(rng)} {rng.choice(suffixes)}"
        if len({name_key(a) for a in attributes}) < len(attributes):
            attributes = list(table.attributes)
    column = table.entity_column if rng.random() < 0.8 else invent_word(rng)
    rows = {e: {a: row[old] for a, old in zip(attributes, table.attributes, strict=True)}
            for e, row in zip(entities, table.rows.values(), strict=True)}
    return Table(column, attributes, rows)


async def _widesearch_run(rng: random.Random, seed: int, single: bool,
                          runs_dir: Path) -> tuple[Recorder, float]:
    from swarmoe.tasks.teacher import WideSearchTeacher
    from swarmoe.tasks.widesearch import make_task, run_task

    n = rng.randint(1, 8) if single else _entity_count(rng)
    k = rng.randint(1, 6)
    table = _renamed(rng, random_table(seed, entities=n + rng.randint(0, 10), attributes=k))
    task = make_task(table, entities=n, seed=seed)
    recorder = Recorder(WideSearchTeacher(task))
    result = await run_task(task, {"model": recorder, "runs_dir": runs_dir}, single_agent=single)
    return recorder, result.grade.item_f1


async def _report_run(rng: random.Random, seed: int, runs_dir: Path) -> tuple[Recorder, float]:
    from swarmoe.docs.recipe import analyze
    from swarmoe.docs.tools import DocumentTools
    from swarmoe.tasks.report import make_report_task
    from swarmoe.tasks.teacher import ReportTeacher

    pages = rng.choice((rng.randint(30, 60), rng.randint(60, 150)))
    task = make_report_task(seed, pages, runs_dir)
    recorder = Recorder(ReportTeacher(task))
    # At most ~3 pages a sub-agent: longer reads do not fit the contexts trained on.
    subagents = rng.choice((100, 100, rng.randint(max(4, -(-pages // 3)), 60)))
    analysis = await analyze(DocumentTools([task.path], cache_dir=runs_dir / "cache"),
                             task.question, recorder, max_subagents=subagents, runs_dir=runs_dir)
    return recorder, task.grade(analysis.report).cited_recall


def _role(messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]]) -> str:
    from swarmoe.tasks.widesearch import SINGLE_AGENT_PROMPT

    if any(t.get("function", {}).get("name") == "spawn_subagents" for t in tools):
        return "orchestrator"
    return "single" if messages[0].get("content") == SINGLE_AGENT_PROMPT else "subagent"


def episodes(runs: int, seed: int) -> Iterator[Episode]:
    """The curriculum's episodes for `runs` teacher runs drawn from `seed`. A run the teacher
    does not solve perfectly is an error: its trajectory would teach mistakes."""
    rng = random.Random(f"swarmoe-curriculum:{seed}")
    names, weights = zip(*FAMILIES, strict=True)
    for i in range(runs):
        family = rng.choices(names, weights)[0]
        task_seed = rng.randrange(1 << 30)
        with tempfile.TemporaryDirectory(prefix="swarmoe-curriculum-") as tmp:
            if family == "report":
                recorder, score = asyncio.run(_report_run(rng, task_seed, Path(tmp)))
            else:
                recorder, score = asyncio.run(_widesearch_run(
                    rng, task_seed, family == "single_agent", Path(tmp)))
        if score < 1.0:
            raise RuntimeError(f"the teacher scored {score} on run {i} ({family}, task seed "
                               f"{task_seed}); fix the teacher before training on it")
        # Sub-agents finish in whatever order their calls complete: sort, so a seed gives
        # the same episodes every time.
        found = sorted((Episode(m, t, family, _role(m, t)) for m, t in recorder.finished),
                       key=lambda e: json.dumps(e.messages[:2]))
        kept = [e for e in found if e.role != "subagent"]
        # Sub-agents that found something first (a report's are mostly empty-handed), then one
        # of the others.
        subs = [e for e in found if e.role == "subagent"]
        hits = [e for e in subs if "[" in (e.messages[-1].get("content") or "")]
        misses = [e for e in subs if e not in hits]
        picked = rng.sample(hits, min(SUBAGENTS_PER_RUN - 1, len(hits)))
        picked += rng.sample(misses, min(SUBAGENTS_PER_RUN - len(picked), len(misses)))
        kept += picked
        yield from kept


def write_curriculum(out: str | Path, runs: int, seed: int,
                     on_run: Callable[[int, Episode], None] | None = None) -> dict[str, int]:
    """Write the episodes of `runs` teacher runs to `out` (JSONL); counts by family/role."""
    counts: dict[str, int] = {}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as f:
        for n, ep in enumerate(episodes(runs, seed)):
            f.write(json.dumps(ep.to_json(), ensure_ascii=False) + "\n")
            key = f"{ep.family}/{ep.role}"
            counts[key] = counts.get(key, 0) + 1
            if on_run is not None:
                on_run(n, ep)
    return counts
