"""WideSearch tasks: table generation and reading, the corpus and its tools, grading, and runs
through the swarm and the single-agent baseline against a scripted researcher model."""

from __future__ import annotations

import asyncio
import json
import random
import re

import pytest
from typer.testing import CliRunner

from swarmoe.cli import app
from swarmoe.swarm import ToolError
from swarmoe.tasks import (
    TableError,
    grade,
    make_task,
    normalize_value,
    parse_answer,
    parse_csv,
    random_table,
    read_table,
    run_task,
)
from swarmoe.tasks.corpus import _decoy, distinct_values
from swarmoe.tasks.widesearch import SINGLE_AGENT_PROMPT
from swarmoe.testing import FakeModel
from swarmoe.testing.fake_model import reply

# -- a scripted researcher ------------------------------------------------------------------------


def _value_forms(value: str) -> list[str]:
    forms = [value]
    if value.isdigit():
        forms.append(f"{int(value):,}")
    return forms


class Researcher:
    """A test double of a model doing the task. As orchestrator it splits the prompt's entries
    over sub-agents of `per_agent` entries; as a worker (a sub-agent, or the single agent) it
    searches each entry's name, opens every hit whose title names the entry, and reports a value
    only when a line of an opened page states it next to the attribute's name. It knows the
    truth only to recognise it: what it answers must have come through the tools."""

    def __init__(self, truth: dict[str, dict[str, str]], per_agent: int = 2,
                 forget: str | None = None) -> None:
        self.truth = truth
        self.per_agent = per_agent
        self.forget = forget
        self.searches = 0
        self.opens = 0

    def script(self, body: dict) -> dict:
        messages = body["messages"]
        names = {t["function"]["name"] for t in body.get("tools") or []}
        steps = sum(m["role"] == "assistant" for m in messages)
        if "create_subagent" in names:
            return self._orchestrate(messages, steps)
        return self._research(messages, steps)

    @staticmethod
    def _entries(prompt: str) -> tuple[list[str], str]:
        entries = [ln[2:].strip() for ln in prompt.splitlines() if ln.startswith("- ")]
        attributes = next(ln for ln in prompt.splitlines() if ln.startswith("Attributes: "))
        return entries, attributes

    def _orchestrate(self, messages: list[dict], steps: int) -> dict:
        entries, attributes = self._entries(messages[1]["content"])
        groups = [entries[i:i + self.per_agent] for i in range(0, len(entries), self.per_agent)]
        if steps == 0:
            return reply(tool_calls=[("create_subagent", {"name": f"w{i}",
                                                          "system_prompt": "Look entries up."})
                                     for i in range(len(groups))])
        if steps == 1:
            return reply(tool_calls=[
                ("assign_task", {"agent": f"w{i}", "prompt": "Entries:\n" + "\n".join(
                    f"- {e}" for e in group) + f"\n{attributes}"})
                for i, group in enumerate(groups)])
        tables = [m["content"].splitlines() for m in messages[-len(groups):]]
        return reply("\n".join(tables[0][:2] + [ln for t in tables for ln in t[2:]]))

    def _research(self, messages: list[dict], steps: int) -> dict:
        entries, attributes = self._entries(messages[1]["content"])
        columns = attributes.removeprefix("Attributes: ").split(", ")
        results = [m["content"] for m in messages if m["role"] == "tool"]
        if steps == 0:
            self.searches += len(entries)
            return reply(tool_calls=[("search", {"query": e}) for e in entries])
        if steps == 1:
            ids = list(dict.fromkeys(
                line.split(" | ")[0] for text in results for line in text.splitlines()
                if any(e.lower() in line.split(" | ")[1].lower() for e in entries)))
            self.opens += len(ids)
            return reply(tool_calls=[("open_page", {"page_id": i}) for i in ids])
        pages = results[len(entries):]
        rows = [f"| name | {' | '.join(columns)} |", "|" + "---|" * (len(columns) + 1)]
        for entry in entries:
            mine = [p for p in pages if entry.lower() in p.splitlines()[0].lower()]
            cells = [self._find(mine, a, self.truth[entry][a]) for a in columns]
            if entry == self.forget:
                cells[0] = "unknown"
            rows.append(f"| {entry} | {' | '.join(cells)} |")
        return reply("\n".join(rows))

    @staticmethod
    def _find(pages: list[str], attribute: str, value: str) -> str:
        for page in pages:
            for line in page.lower().splitlines()[1:]:
                if attribute.lower() not in line:
                    continue
                for form in _value_forms(value):
                    if re.search(rf"(?<![\w.,]){re.escape(form.lower())}(?!\w|[.,]\d)", line):
                        return form
        return "unknown"


# -- tables ---------------------------------------------------------------------------------------


def test_random_tables_are_seeded_varied_and_round_trip_through_csv():
    a, b, c = random_table(7, 12, 6), random_table(7, 12, 6), random_table(8, 12, 6)
    assert a.to_csv() == b.to_csv() and a.to_csv() != c.to_csv()
    assert len(a.rows) == 12 and len(a.attributes) == 6
    assert len({normalize_value(e) for e in a.rows}) == 12
    assert parse_csv(a.to_csv()) == a
    wide = random_table(3, 30, 24)
    values = [v for row in wide.rows.values() for v in row.values()]
    assert all(values)
    numeric = sum(bool(re.fullmatch(r"[\d.]+%?", v)) for v in values)
    assert 0 < numeric < len(values)  # numbers and words both
    assert len({wide.entity_column, *(random_table(s, 2, 1).entity_column for s in range(20))}) > 2


@pytest.mark.parametrize("text, problem", [
    ("", "empty"),
    ("name,year\n", "no rows"),
    ("name\nA\n", "at least one attribute"),
    ("name,year,Year\nA,1,2\n", "same name"),
    ("name,,x\nA,1,2\n", "column 2"),
    ("name,year\nA,1\nB,2,3\n", "row 3 has 3 cells"),
    ("name,year\nA,1\n a ,2\n", "repeats the entity"),
    ("name,year\n,1\n", "no entity name"),
])
def test_bad_csv_is_refused_with_the_reason(text, problem):
    with pytest.raises(TableError, match=problem):
        parse_csv(text)


def test_make_task_picks_complete_rows_and_names_bad_choices(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("\ufeffcity,population,mayor\nAlba,1200,Ana Ruiz\nBrel,,Bo Li\nCoro,77,Cy Do\n")
    table = read_table(path)
    assert table.entity_column == "city" and table.rows["Brel"]["population"] == ""
    task = make_task(table, entities=2, attributes=["Population"], seed=1)
    assert task.entities == ["Alba", "Coro"] and task.attributes == ["population"]
    assert make_task(table, attributes=["mayor"]).entities == ["Alba", "Brel", "Coro"]
    with pytest.raises(TableError, match="cannot pick 3 entities: 2 of the table's 3"):
        make_task(table, entities=3, attributes=["population"])
    with pytest.raises(TableError, match=r"unknown attributes \['area'\]"):
        make_task(table, attributes=["area"])
    with pytest.raises(TableError, match=r"\['Zed'\] are not in the table"):
        make_task(table, entities=["Alba", "Zed"])
    with pytest.raises(TableError, match="no such file"):
        read_table(tmp_path / "missing.csv")


# -- corpus and tools -----------------------------------------------------------------------------


def _pages_about(task, entity):
    return [p for p in task.corpus.pages if p.kind == "entity" and p.about == entity]


def test_corpus_states_every_fact_among_distractors_and_depends_on_the_seed():
    table = random_table(11, 20, 5)
    split = 0
    for seed in range(4):
        task = make_task(table, entities=8, seed=seed)
        for entity, values in task.expected.items():
            pages = _pages_about(task, entity)
            assert 1 <= len(pages) <= 2
            split += len(pages) == 2
            shown = [p.render() for p in pages]
            for attribute, value in values.items():
                assert Researcher._find(shown, attribute, value) != "unknown", (entity, value)
        kinds = [p.kind for p in task.corpus.pages]
        assert kinds.count("near_miss") >= 8 and kinds.count("invented") >= 4
        real = {normalize_value(e) for e in table.rows}
        for page in task.corpus.pages:
            if page.kind != "entity":
                assert normalize_value(page.about) not in real
            assert page.about in page.title
        assert len({p.id for p in task.corpus.pages}) == len(task.corpus.pages)
    assert split > 0
    one, again, other = (make_task(table, entities=8, seed=s) for s in (5, 5, 6))
    assert [p.render() for p in one.corpus.pages] == [p.render() for p in again.corpus.pages]
    assert one.prompt == again.prompt
    assert [p.render() for p in one.corpus.pages] != [p.render() for p in other.corpus.pages]


def test_distractor_values_differ_from_the_truth():
    rng = random.Random(0)
    cases = [("1850", ["1850", "1850"]), ("12,500", ["12500"]), ("3.5", ["3.50"]),
             ("-40", []), ("red", ["red", "Blue", "RED"]), ("B+", ["A", "B+"])]
    for value, column in cases:
        for _ in range(30):
            decoy = _decoy(rng, value, distinct_values(column))
            assert decoy is not None and normalize_value(decoy) != normalize_value(value)
    assert _decoy(rng, "red", distinct_values(["red", "Red"])) is None


def test_search_and_open_page_tools():
    task = make_task(random_table(2, 10, 4), entities=5, seed=0)
    search, open_page = task.tools()
    assert (search.name, open_page.name) == ("search", "open_page")
    for entity in task.entities:
        lines = asyncio.run(search.invoke({"query": entity})).splitlines()
        assert 1 <= len(lines) <= 5
        ids = [ln.split(" | ")[0] for ln in lines]
        assert all(len(ln.split(" | ")) == 3 for ln in lines)
        assert {p.id for p in _pages_about(task, entity)} <= set(ids)
    page = _pages_about(task, task.entities[0])[0]
    shown = asyncio.run(open_page.invoke({"page_id": page.id}))
    assert shown.splitlines()[0] == f"[{page.id}] {page.title}" and page.body in shown
    bare = str(int(page.id[1:]))
    assert asyncio.run(open_page.invoke({"page_id": f" [{page.id.upper()}] "})) == shown
    assert asyncio.run(open_page.invoke({"page_id": bare})) == shown
    with pytest.raises(ToolError, match="no page 'p999'"):
        asyncio.run(open_page.invoke({"page_id": "p999"}))
    with pytest.raises(ToolError, match="empty"):
        asyncio.run(search.invoke({"query": "  "}))


# -- grading --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small():
    return make_task(parse_csv("town,population,founder,founded\n"
                               "Alba,12500,Ana Ruiz,1850\nBrel,730,Bo Li,1901\n"
                               "Coro,88000,Cy Do,1799\nDuna,4100,Di Vo,1920\n"), seed=0)


def _markdown(task, rows):
    head = f"| {task.entity_column} | {' | '.join(task.attributes)} |"
    rule = "|" + "---|" * (len(task.attributes) + 1)
    return "\n".join([head, rule, *(f"| {e} | {' | '.join(r)} |" for e, r in rows)])


def _rows(task):
    return [(e, [task.expected[e][a] for a in task.attributes]) for e in task.entities]


def test_a_perfect_answer_scores_one_and_exact(small):
    g = grade(small, "Here is the table:\n\n" + _markdown(small, _rows(small)) + "\n\nDone.")
    assert (g.item_precision, g.item_recall, g.item_f1, g.row_f1, g.exact) == (1, 1, 1, 1, True)
    assert g.parsed.format == "markdown" and not g.missing_rows and not g.extra_rows


def test_a_wrong_cell_a_missing_row_and_an_extra_row(small):
    n_cells, n_rows = len(small.entities) * len(small.attributes), len(small.entities)
    rows = _rows(small)
    wrong = [(rows[0][0], ["999", *rows[0][1][1:]]), *rows[1:]]
    g = grade(small, _markdown(small, wrong))
    assert g.item_precision == g.item_recall == pytest.approx((n_cells - 1) / n_cells)
    assert g.row_f1 == pytest.approx((n_rows - 1) / n_rows) and not g.exact
    bad = [c for c in g.cells if not c.correct]
    assert [(c.entity, c.attribute, c.got) for c in bad] == [(rows[0][0], "population", "999")]

    g = grade(small, _markdown(small, rows[:-1]))
    assert g.item_precision == 1 and g.item_recall == pytest.approx(
        (n_cells - len(small.attributes)) / n_cells)
    assert g.missing_rows == [rows[-1][0]] and not g.exact
    assert g.row_recall == pytest.approx((n_rows - 1) / n_rows) and g.row_precision == 1

    g = grade(small, _markdown(small, [*rows, ("New Alba", ["1", "X Y", "1900"])]))
    assert g.item_recall == 1 and g.item_precision == pytest.approx(n_cells / (n_cells + 3))
    assert g.extra_rows == ["New Alba"] and not g.exact
    assert g.row_precision == pytest.approx(n_rows / (n_rows + 1))


def test_formatting_variants_grade_the_same(small):
    rows = _rows(small)
    records = [{small.entity_column: e, **dict(zip(small.attributes, r, strict=True))}
               for e, r in rows]
    header = ",".join([small.entity_column, *small.attributes])
    variants = {
        "json": "```json\n" + json.dumps(records) + "\n```",
        "keyed": json.dumps({"rows": {e: dict(zip(small.attributes, r, strict=True))
                                      for e, r in rows}}),
        "csv": "```csv\n" + header + "\n" + "\n".join(
            ",".join([e, *r]) for e, r in rows) + "\n```",
        "loose": "\n".join([  # no edge pipes, shuffled columns, an extra column, odd spellings
            "Founded | **TOWN** | notes | Founder | Population", "--- | --- | --- | --- | ---",
            *(f"{r[2]}.0 | {e.upper()} | x | {r[1].lower()}  | {int(r[0]):,}" for e, r in rows)]),
        "twice": _markdown(small, rows) + "\n\nFinal:\n\n" + _markdown(small, rows),
    }
    formats = {"json": "json", "keyed": "json", "csv": "csv", "loose": "markdown",
               "twice": "markdown"}
    for name, text in variants.items():
        g = grade(small, text)
        assert g.exact and g.item_f1 == 1, (name, g.to_json())
        assert g.parsed.format == formats[name]


def test_unparseable_answers_and_stated_unknowns(small):
    for text in ("I could not find anything.", "", None, "| a | b |\n|---|---|\n| 1 | 2 |"):
        g = grade(small, text)
        assert (g.item_f1, g.row_f1, g.exact) == (0, 0, False) and g.parsed.error
    rows = _rows(small)
    unknown = [(rows[0][0], ["unknown", "N/A", "-"]), *rows[1:]]
    g = grade(small, _markdown(small, unknown))
    assert g.item_precision == 1 and g.item_recall < 1 and not g.exact


def test_normalize_value():
    same = [("1,200", "1200"), ("3.50", "3.5"), ("12.0", "12"), ("Zürich", "zurich"),
            ("  St. Ives ", "st ives"), ("**QX-4821**", "qx 4821"), ("$88,000", "88000")]
    for a, b in same:
        assert normalize_value(a) == normalize_value(b), (a, b)
    for a, b in [("-5", "5"), ("12%", "12"), ("1.2", "12"), ("1850", "1851")]:
        assert normalize_value(a) != normalize_value(b), (a, b)
    assert normalize_value("N/A") == normalize_value("unknown") == ""
    assert parse_answer("x", "t", ["a"]).format is None


# -- runs -----------------------------------------------------------------------------------------


def test_cli_swarm_run_json(tmp_path):
    path = tmp_path / "table.csv"
    path.write_text(random_table(4, 9, 4).to_csv())
    task = make_task(read_table(path), entities=5, seed=3)
    model = Researcher(task.expected, per_agent=2)
    fake = FakeModel(model.script)
    with fake.serve() as url:
        out = CliRunner().invoke(app, ["widesearch", str(path), "--entities", "5", "--seed", "3",
                                       "--model", "fake", "--base-url", url, "--api-key", "x",
                                       "--runs-dir", str(tmp_path), "--json"])
    assert out.exit_code == 0, out.output
    data = json.loads(out.stdout)
    assert data["entities"] == task.entities and data["attributes"] == task.attributes
    assert data["seed"] == 3 and data["model"] == "fake" and data["mode"] == "swarm"
    assert fake.requests[0]["messages"][1]["content"] == task.prompt
    assert data["grade"]["exact"] and data["grade"]["item_f1"] == 1 == data["grade"]["row_f1"]
    assert len(data["parsed"]["rows"]) == 5 and data["answer"].startswith("| name |")
    groups = 3  # 5 entries, 2 per sub-agent
    stats = data["stats"]
    assert stats["subagents"] == groups and stats["total_steps"] == 3 + 3 * groups
    assert stats["critical_steps"] == 1 + (1 + 3) + 1
    assert stats["tool_calls"] == model.searches + model.opens and model.opens >= 5
    assert stats["wall_s"] >= 0 and data["stopped"] is None


def test_single_agent_baseline_has_no_subagent_tools(tmp_path):
    task = make_task(random_table(5, 6, 3), entities=4, seed=1)
    model = Researcher(task.expected, forget=task.entities[1])
    fake = FakeModel(model.script)
    result = asyncio.run(run_task(task, {"model": fake.backend(), "runs_dir": tmp_path},
                                  single_agent=True))
    for body in fake.requests:
        assert {t["function"]["name"] for t in body["tools"]} == {"search", "open_page"}
        assert body["messages"][0]["content"] == SINGLE_AGENT_PROMPT
    assert result.stats.subagents == 0 and result.stats.critical_steps == 3
    assert result.stats.tool_calls == model.searches + model.opens
    assert result.single_agent and result.to_json()["mode"] == "single-agent"
    n = len(task.entities) * len(task.attributes)
    assert result.grade.item_precision == 1
    assert result.grade.item_recall == pytest.approx((n - 1) / n)
    assert not result.grade.exact


def test_cli_summary_marks_wrong_cells_and_errors(tmp_path):
    path = tmp_path / "table.csv"
    path.write_text(random_table(6, 5, 2).to_csv())
    task = make_task(read_table(path), entities=3, seed=0)
    fake = FakeModel(Researcher(task.expected, forget=task.entities[0]).script)
    with fake.serve() as url:
        out = CliRunner().invoke(app, ["widesearch", str(path), "--entities", "3",
                                       "--model", "fake", "--base-url", url, "--api-key", "x",
                                       "--runs-dir", str(tmp_path)], env={"COLUMNS": "200"})
    assert out.exit_code == 0, out.output
    text = " ".join(out.output.split())
    assert f"want {task.expected[task.entities[0]][task.attributes[0]]}" in text
    assert "exact no" in text and "2 sub-agents" in text and "critical steps" in text
    runner = CliRunner()
    bad = runner.invoke(app, ["widesearch", str(path), "--attributes", "nope", "--api-key", "x"])
    assert bad.exit_code == 2 and "unknown attributes ['nope']" in bad.output
    missing = runner.invoke(app, ["widesearch", str(tmp_path / "none.csv"), "--api-key", "x"])
    assert missing.exit_code == 2 and "no such file" in missing.output


def test_a_stopped_run_is_graded_on_no_answer(tmp_path):
    task = make_task(random_table(9, 4, 2), entities=2, seed=0)
    fake = FakeModel(Researcher(task.expected).script)
    result = asyncio.run(run_task(task, {"model": fake.backend(), "runs_dir": tmp_path,
                                         "orchestrator_max_steps": 1}))
    assert result.answer is None and "max_steps=1" in result.stopped
    assert result.grade.item_f1 == 0 and result.to_json()["stopped"] == result.stopped
