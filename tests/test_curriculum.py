"""The scripted teacher and the curriculum it writes: the teacher solves held-out tasks of
every family perfectly through the real Swarm and tools, fans out only when the task is wide,
and its episodes render through the K2.5 template into calls the K2 parser reads back."""

from __future__ import annotations

import asyncio
import json

import pytest

from swarmoe.docs.recipe import analyze
from swarmoe.docs.tools import DocumentTools
from swarmoe.tasks.curriculum import Recorder, episodes, write_curriculum
from swarmoe.tasks.report import make_report_task
from swarmoe.tasks.tables import random_table
from swarmoe.tasks.teacher import FAN_OUT_MIN, ReportTeacher, WideSearchTeacher
from swarmoe.tasks.widesearch import make_task, run_task
from swarmoe.text import ChatTemplate
from swarmoe.text.tool_parser import parse_assistant


@pytest.mark.parametrize("entities,single", [(1, False), (2, False), (7, False), (30, False),
                                             (4, True)])
def test_teacher_solves_unseen_wide_search_tasks(tmp_path, entities, single):
    task = make_task(random_table(seed=9000 + entities, entities=entities + 5, attributes=4),
                     entities=entities, seed=9000 + entities)
    recorder = Recorder(WideSearchTeacher(task))
    result = asyncio.run(run_task(task, {"model": recorder, "runs_dir": tmp_path},
                                  single_agent=single))
    assert result.grade.item_f1 == 1.0 and result.grade.exact
    fans_out = not single and entities >= FAN_OUT_MIN
    assert result.stats.subagents == (entities if fans_out else 0)
    calls = [c["function"]["name"] for m, _ in recorder.finished for msg in m
             if msg["role"] == "assistant" for c in msg.get("tool_calls") or ()]
    assert ("spawn_subagents" in calls) == fans_out
    assert "create_subagent" not in calls and "assign_task" not in calls


@pytest.mark.parametrize("pages,subagents", [(30, 100), (45, 6)])
def test_teacher_cites_every_planted_fact_of_an_unseen_report(tmp_path, pages, subagents):
    task = make_report_task(424242 + pages, pages, tmp_path)
    analysis = asyncio.run(analyze(DocumentTools([task.path]), task.question,
                                   ReportTeacher(task), max_subagents=subagents,
                                   runs_dir=tmp_path))
    grade = task.grade(analysis.report)
    assert grade.cited_recall == 1.0 and grade.precision == 1.0
    assert analysis.result.stats.subagents == len(analysis.plan)


def test_curriculum_is_seeded_and_renders_to_calls_the_parser_reads_back(tmp_path):
    path = tmp_path / "c.jsonl"
    counts = write_curriculum(path, runs=6, seed=11)
    lines = path.read_text().splitlines()
    assert sum(counts.values()) == len(lines) > 6
    again = [json.dumps(e.to_json(), ensure_ascii=False) for e in episodes(6, seed=11)]
    assert again == lines
    other = [json.dumps(e.to_json(), ensure_ascii=False) for e in episodes(6, seed=12)]
    assert other != lines
    template = ChatTemplate()
    for line in lines:
        record = json.loads(line)
        messages = record["messages"]
        assert messages[-1]["role"] == "assistant" and messages[-1]["content"]
        for i, msg in enumerate(messages):
            if msg["role"] != "assistant":
                continue
            # As the model sees it at inference (and train/data.py renders it): earlier turns
            # without their reasoning, this one whole.
            context = [{k: v for k, v in m.items() if k != "reasoning_content"}
                       for m in messages[:i]]
            prompt = template.render(context, tools=record["tools"])
            full = template.render([*context, msg], tools=record["tools"],
                                   add_generation_prompt=False)
            assert full.startswith(prompt)
            parsed = parse_assistant(full[len(prompt):].removesuffix("<|im_end|>"),
                                     thinking=True)
            want = [(c["function"]["name"], json.loads(c["function"]["arguments"]))
                    for c in msg.get("tool_calls") or ()]
            got = [(c.name, json.loads(c.arguments)) for c in parsed.tool_calls]
            assert got == want
            assert [c.id for c in parsed.tool_calls] == [c["id"] for c in msg.get("tool_calls") or ()]
            assert (parsed.content or None) == (msg["content"] or None)
