"""The document tools: citations, bounded reads, and no access outside the run's documents."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from swarmoe import Swarm
from swarmoe.docs.tools import READ_MAX_CHARS, READ_MAX_PAGES, DocumentTools
from swarmoe.swarm import ToolError
from swarmoe.testing import FakeModel
from swarmoe.testing.fake_model import reply


@pytest.fixture()
def run_docs(tmp_path: Path) -> tuple[DocumentTools, Path]:
    pages = [
        f"Page {i + 1} of the plan. Topic {'harbour' if i == 13 else 'roads'} works."
        for i in range(25)
    ]
    (tmp_path / "plan.txt").write_text("\f".join(pages))
    (tmp_path / "plan.md").write_text("# Budget\n\nThe bridge costs 12 million.\n")
    (tmp_path / "secret.txt").write_text("TOP SECRET launch codes")
    return DocumentTools(
        [tmp_path / "plan.txt", tmp_path / "plan.md"], cache_dir=tmp_path / "cache"
    ), tmp_path


def test_results_carry_citations(run_docs) -> None:
    tools, _ = run_docs
    assert [d["doc"] for d in tools.list_documents()] == ["plan.txt", "plan.md"]
    assert tools.list_documents()[0]["pages"] == 25
    text = tools.read_pages("plan.txt", 14, 15)
    assert text.startswith("=== [plan.txt p.14] ===\nPage 14 of the plan. Topic harbour works.")
    assert "=== [plan.txt p.15] ===" in text
    hit = tools.search("plan.txt", "harbour", k=3)[0]
    assert (hit["page"], hit["cite"]) == (14, "[plan.txt p.14]")
    section = tools.outline("plan.md")["sections"][0]
    assert (section["title"], section["first_page"], section["cite"]) == (
        "Budget",
        1,
        "[plan.md p.1]",
    )


def test_reads_are_bounded(run_docs, tmp_path: Path) -> None:
    tools, _ = run_docs
    text = tools.read_pages("plan.txt", 1, 25)
    assert text.count("=== [plan.txt p.") == READ_MAX_PAGES
    assert f"read_pages('plan.txt', {READ_MAX_PAGES + 1}, 25)" in text
    assert tools.read_pages("plan.txt", 24, 99).count("===") == 4  # clipped to the last page
    (tmp_path / "big.txt").write_text("\f".join("word " * 2000 for _ in range(8)))
    big = DocumentTools([tmp_path / "big.txt"], cache_dir=tmp_path / "cache")
    assert len(big.read_pages("big.txt", 1, 8)) < READ_MAX_CHARS + 2000
    for first, last in ((0, 1), (26, 30), (5, 4)):
        with pytest.raises(ToolError):
            tools.read_pages("plan.txt", first, last)


def test_nothing_outside_the_run_can_be_read(run_docs) -> None:
    tools, folder = run_docs
    secret = folder / "secret.txt"
    attempts = [
        str(secret),
        "secret.txt",
        "../secret.txt",
        f"{folder}/plan.txt",
        "/etc/passwd",
        "plan.txt/../secret.txt",
        "~/.ssh/id_rsa",
        "",
    ]
    for doc in attempts:
        for call in (
            lambda d: tools.read_pages(d, 1, 1),
            lambda d: tools.outline(d),
            lambda d: tools.search(d, "codes"),
            lambda d: tools.tables(d, 1),
        ):
            with pytest.raises(ToolError, match="unknown document"):
                call(doc)


async def test_agents_get_errors_not_files(run_docs) -> None:
    """Through a real swarm run: a sub-agent asking for paths gets tool errors, never content."""
    tools, folder = run_docs
    bad = [str(folder / "secret.txt"), "../secret.txt", "/etc/hostname"]

    def script(body: dict) -> object:
        names = {t["function"]["name"] for t in body.get("tools") or []}
        msgs = body["messages"]
        if "create_subagent" in names:
            step = sum(m["role"] == "assistant" for m in msgs)
            if step == 0:
                return reply(
                    tool_calls=[("create_subagent", {"name": "snoop", "system_prompt": "read"})]
                )
            if step == 1:
                return reply(
                    tool_calls=[("assign_task", {"agent": "snoop", "prompt": "read files"})]
                )
            return msgs[-1]["content"]
        if msgs[-1]["role"] == "user":
            return reply(
                tool_calls=[("read_pages", {"doc": d, "first": 1, "last": 1}) for d in bad]
                + [("read_pages", {"doc": "plan.md", "first": 1, "last": 1})]
            )
        return json.dumps([m["content"] for m in msgs if m["role"] == "tool"])

    fake = FakeModel(script)
    result = await Swarm(fake.backend(), tools=tools.tools(), runs_dir=folder / "runs").run("go")
    results = json.loads(result.answer)
    assert all(r.startswith("Error: unknown document") for r in results[:3])
    assert "bridge costs 12 million" in results[3]
    assert "SECRET" not in result.answer and result.stats.tool_errors == 3
