"""The scripted teacher: a fixed policy, in code, that does the task families the way a good
agent would, so its trajectories can teach a small model (`curriculum.py`).

A `WideSearchTeacher` is a `ChatBackend` for one task. It drives the real `Swarm` over the real
`search` / `open_page` tools: as orchestrator it fans the entries out with one
`spawn_subagents` call when there are enough of them and does small tasks itself; as a
sub-agent (or single agent) it searches each name, opens the pages whose title is about exactly
that name, searches again for what is still missing, and answers with table rows copied from
the pages. Every decision follows from what the conversation shows (the prompt, search lines,
page text); the task's ground truth only spares the teacher from parsing prose, and values are
written as the page prints them.

A `ReportTeacher` does the long-document recipe: one sub-agent per plan line through
`spawn_subagents`, each reading its pages and reporting the planted lines with their page
citation, then one report that keeps every cited line.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from swarmoe.swarm import AssistantMessage, ToolCall
from swarmoe.swarm.swarm import ITEM_SLOT
from swarmoe.tasks.corpus import Page, _phrase
from swarmoe.tasks.widesearch import SINGLE_AGENT_PROMPT, WideSearchTask

#: Fewest entries the orchestrator fans out; below it, sub-agents cost more than they save.
FAN_OUT_MIN = 3


def subagent_template(task: WideSearchTask) -> str:
    """The prompt each wide-search sub-agent gets, `{{item}}` standing for its entry."""
    attrs = task.attributes
    wanted = attrs[0] if len(attrs) == 1 else f"{', '.join(attrs[:-1])} and {attrs[-1]}"
    return (f"Find the {wanted} of {ITEM_SLOT} ({task.entity_column}) with search and "
            f"open_page; use only pages about exactly {ITEM_SLOT}. Answer with one table row: "
            f"| {ITEM_SLOT} | {' | '.join(attrs)} |")


def _tool_names(tools: Sequence[Mapping[str, Any]]) -> set[str]:
    return {t.get("function", {}).get("name") for t in tools}


class _Conversation:
    """What one agent's messages show: its calls so far (with results) and the next call id."""

    def __init__(self, messages: Sequence[Mapping[str, Any]]) -> None:
        self.messages = messages
        self.calls: list[tuple[str, dict[str, Any], str]] = []  # (name, args, result)
        results = {m.get("tool_call_id"): m.get("content") or "" for m in messages
                   if m.get("role") == "tool"}
        for m in messages:
            for c in m.get("tool_calls") or () if m.get("role") == "assistant" else ():
                fn = c["function"]
                self.calls.append((fn["name"], json.loads(fn["arguments"] or "{}"),
                                   results.get(c["id"], "")))
        self.steps = sum(m.get("role") == "assistant" for m in messages)

    def reply(self, content: str | None = None, reasoning: str | None = None,
              calls: Sequence[tuple[str, dict[str, Any]]] = ()) -> AssistantMessage:
        """An assistant message; call ids are K2's `functions.NAME:IDX`, IDX counting every
        call of the conversation."""
        first = len(self.calls)
        return AssistantMessage(
            content=content, reasoning_content=reasoning,
            tool_calls=[ToolCall(f"functions.{name}:{first + i}", name,
                                 json.dumps(args, ensure_ascii=False))
                        for i, (name, args) in enumerate(calls)])


def _display_value(page: Page, attribute: str, value: str) -> str | None:
    """`value` as `page` prints it in its sentence about `attribute`, or None if it does not."""
    phrase = _phrase(attribute)
    spellings = (value, value.replace(",", ""), f"{int(value):,}" if value.isdigit() else value)
    for line in page.body.splitlines():
        if phrase in line:
            for s in spellings:
                if re.search(rf"(?<![\w,.]){re.escape(s)}(?![\w,]|\.\d)", line):
                    return s
    return None


class WideSearchTeacher:
    """The policy for every agent of one wide-search run (see the module docstring)."""

    def __init__(self, task: WideSearchTask) -> None:
        self.task = task
        self.template = subagent_template(task)
        self.entity_of_prompt = {self.template.replace(ITEM_SLOT, e): e for e in task.entities}

    async def chat(self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]],
                   sampling: Mapping[str, Any]) -> AssistantMessage:
        conv = _Conversation(messages)
        prompt = messages[1]["content"]
        if "spawn_subagents" in _tool_names(tools):
            return self._orchestrate(conv)
        if messages[0]["content"] == SINGLE_AGENT_PROMPT and prompt == self.task.prompt:
            return self._look_up(conv, self.task.entities, table=True)
        entity = self.entity_of_prompt.get(prompt)
        if entity is None:
            raise ValueError(f"the teacher does not know this prompt: {prompt[:120]!r}")
        return self._look_up(conv, [entity], table=False)

    async def aclose(self) -> None:
        pass

    # -- the orchestrator --------------------------------------------------------------------

    def _orchestrate(self, conv: _Conversation) -> AssistantMessage:
        entities = self.task.entities
        if len(entities) < FAN_OUT_MIN:
            if conv.steps == 0:
                return self._look_up(conv, entities, table=True, reasoning=(
                    f"Only {len(entities)} {'entry' if len(entities) == 1 else 'entries'}: "
                    f"I look {'it' if len(entities) == 1 else 'them'} up myself."))
            return self._look_up(conv, entities, table=True)
        if conv.steps == 0:
            return conv.reply(
                reasoning=f"{len(entities)} entries, each looked up on its own: one sub-agent "
                          f"per entry.",
                calls=[("spawn_subagents", {"prompt_template": self.template,
                                            "items": list(entities)})])
        rows = {}
        for block in conv.calls[-1][2].split("\n\n### "):
            head, _, body = block.removeprefix("### ").partition("\n")
            row = body.strip()
            if row.startswith("|"):
                rows[head] = row
        return conv.reply(self._table([rows.get(e) or self._unknown_row(e) for e in entities]),
                          reasoning="All rows are in: the table.")

    def _table(self, rows: Sequence[str]) -> str:
        columns = [self.task.entity_column, *self.task.attributes]
        return "\n".join([f"| {' | '.join(columns)} |", f"|{'---|' * len(columns)}", *rows])

    def _unknown_row(self, entity: str) -> str:
        return f"| {entity} | {' | '.join('unknown' for _ in self.task.attributes)} |"

    # -- looking up (sub-agents, the single agent, small tasks) --------------------------------

    def _look_up(self, conv: _Conversation, entities: Sequence[str], table: bool,
                 reasoning: str | None = None) -> AssistantMessage:
        corpus = self.task.corpus
        searched = {args.get("query", "") for name, args, _ in conv.calls if name == "search"}
        opened = {args.get("page_id", "") for name, args, _ in conv.calls if name == "open_page"}
        listed = [line.split(" | ", 1)[0] for name, _, result in conv.calls if name == "search"
                  for line in result.splitlines()]
        if conv.steps == 0:
            return conv.reply(reasoning=reasoning,
                              calls=[("search", {"query": e}) for e in entities])
        to_open = [p for p in dict.fromkeys(listed) if p in corpus.by_id and p not in opened
                   and corpus.by_id[p].about in entities]
        if to_open:
            return conv.reply(calls=[("open_page", {"page_id": p}) for p in to_open])
        found = self._values(entities, opened)
        missing = [(e, a) for e in entities for a in self.task.attributes
                   if a not in found[e] and f"{e} {_phrase(a)}" not in searched]
        if missing:
            return conv.reply(calls=[("search", {"query": f"{e} {_phrase(a)}"})
                                     for e, a in missing])
        rows = [f"| {e} | {' | '.join(found[e].get(a, 'unknown') for a in self.task.attributes)} |"
                for e in entities]
        return conv.reply(self._table(rows) if table else rows[0])

    def _values(self, entities: Sequence[str], opened: set[str]) -> dict[str, dict[str, str]]:
        """What the opened pages state for each entity's asked attributes, as printed."""
        found: dict[str, dict[str, str]] = {e: {} for e in entities}
        for pid in opened:
            page = self.task.corpus.by_id.get(pid)
            if page is None or page.about not in found:
                continue
            truth = self.task.table.rows[page.about]
            for a in self.task.attributes:
                shown = _display_value(page, a, truth[a])
                if shown is not None:
                    found[page.about].setdefault(a, shown)
        return found


# -- the long report ---------------------------------------------------------------------------

_PAGES = re.compile(r"(\S+) pages (\d+)-(\d+)")
_REST = re.compile(r"call read_pages\('(.+?)', (\d+), (\d+)\) for the rest")
#: Pages per read_pages call: five report pages stay inside its 24,000 characters.
READ_PAGES = 5
_THEME_OF_KIND = {"figure": "FIGURE", "segment_table": "COMPARISON", "risk": "RISK"}
_SECTION_OF_THEME = (("FIGURE", "Key figures"), ("COMPARISON", "Comparisons"), ("RISK", "Risks"))


def report_template(question: str) -> str:
    """The prompt each report sub-agent gets, its plan line standing in for `{{item}}`."""
    return f"{question}\nYour pages: {ITEM_SLOT}"


class ReportTeacher:
    """The policy for every agent of one run of the long-document recipe over `task`'s report
    (a `tasks.report.ReportTask`): spawn one sub-agent per plan line, read every page of the
    range, report each planted line with its page, keep every cited line in the report."""

    def __init__(self, task: Any) -> None:
        self.task = task
        self.doc = task.path.name
        self.by_page: dict[int, list[Any]] = {}
        for fact in task.facts:
            self.by_page.setdefault(fact.page + 1, []).append(fact)

    async def chat(self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]],
                   sampling: Mapping[str, Any]) -> AssistantMessage:
        from swarmoe.docs.recipe import SUBAGENT_PROMPT

        conv = _Conversation(messages)
        if "spawn_subagents" in _tool_names(tools):
            return self._orchestrate(conv, messages[1]["content"], SUBAGENT_PROMPT)
        return self._read(conv, messages[1]["content"])

    async def aclose(self) -> None:
        pass

    def _orchestrate(self, conv: _Conversation, task: str, subagent_prompt: str) -> AssistantMessage:
        if conv.steps == 0:
            question = task.partition("\n")[0].removeprefix("Question: ")
            items = [line.removeprefix("- ") for line in task.splitlines()
                     if re.match(r"- \w+: \S+ pages \d+-\d+ \|", line)]
            return conv.reply(
                reasoning=f"{len(items)} plan lines: one sub-agent each, all at once.",
                calls=[("spawn_subagents", {"prompt_template": report_template(question),
                                            "items": items, "system_prompt": subagent_prompt})])
        findings = [line for line in conv.calls[-1][2].splitlines()
                    if re.match(r"- (FIGURE|COMPARISON|RISK): ", line)]
        parts = ["The report's key figures, segment results and risks, each with the page that "
                 "prints it:"]
        for theme, title in _SECTION_OF_THEME:
            lines = [f"- {f.split(': ', 1)[1]}" for f in findings if f.startswith(f"- {theme}: ")]
            if lines:
                parts += ["", f"## {title}", *lines]
        if not findings:
            parts = ["The sub-agents found no figures, segment results or risks to report."]
        return conv.reply("\n".join(parts), reasoning="All sub-agents have reported: the report.")

    def _read(self, conv: _Conversation, prompt: str) -> AssistantMessage:
        from swarmoe.docs.tools import cite

        m = _PAGES.search(prompt)
        if m is None:
            raise ValueError(f"the teacher does not know this prompt: {prompt[:120]!r}")
        doc, first, last = m.group(1), int(m.group(2)), int(m.group(3))
        if conv.steps == 0:
            return conv.reply(calls=[
                ("read_pages", {"doc": doc, "first": a, "last": min(a + READ_PAGES - 1, last)})
                for a in range(first, last + 1, READ_PAGES)])
        shown = "\n".join(result for name, _, result in conv.calls if name == "read_pages")
        asked = {(a["doc"], a["first"], a["last"]) for name, a, _ in conv.calls
                 if name == "read_pages"}
        rest = [(d, int(a), int(b)) for d, a, b in _REST.findall(shown)]
        rest = [r for r in dict.fromkeys(rest) if r not in asked]
        if rest:  # a call was cut short: read on where it says
            return conv.reply(calls=[("read_pages", {"doc": d, "first": a, "last": b})
                                     for d, a, b in rest])
        lines = []
        for page in range(first, last + 1):
            if f"=== {cite(doc, page)} ===" not in shown:
                continue
            for fact in self.by_page.get(page, ()):
                lines.append(f"- {_THEME_OF_KIND[fact.kind]}: {fact.text} {cite(doc, page)}")
        span = f"page {first}" if first == last else f"pages {first}-{last}"
        return conv.reply("\n".join(lines) or f"No figures, segment results or risks on {span}.")
