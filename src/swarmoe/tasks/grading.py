"""Grading a returned table the way WideSearch does: parse it, align rows by entity name, and
score (entity, attribute, value) items, whole rows, and the exact table.

Parsing is tolerant because models are: a Markdown table (pipes at the edges optional, several
tables merged), JSON (a list of row objects, an object keyed by entity, or a list of lists) or
CSV, in or out of code fences. Values are compared after `normalize_value`: case, accents,
whitespace, punctuation and number formats ("1,200" = "1200", "3.50" = "3.5") do not matter;
words and digits do. Rows align by normalised entity name only, never fuzzily: a near-miss name
("New Velmora" for "Velmora") is a wrong row, which is the point of the distractor pages.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

from swarmoe.tasks.tables import fold, name_key

_MARKUP = re.compile(r"\*\*|__|`|<br\s*/?>|^\*|\*$", re.IGNORECASE)
_THOUSANDS = re.compile(r"(?<![\d.])\d{1,3}(?:,\d{3})+(?![\d,])")
_TOKEN = re.compile(r"\d+(?:\.\d+)?|[^\W_]+|%")
_NULLS = frozenset({"", "unknown", "n a", "na", "none", "null", "not found", "not available",
                    "not stated", "not given", "unk", "tbd"})


def _canonical_number(token: str) -> str:
    if "." not in token:
        return token
    try:
        text = format(Decimal(token).normalize(), "f")
    except InvalidOperation:
        return token
    return text.rstrip("0").rstrip(".") if "." in text else text


def normalize_value(text: Any) -> str:
    """The comparable form of a cell: folded case and accents, markup and punctuation dropped,
    thousands separators and trailing decimal zeros removed, a leading minus kept. '' for an
    empty cell or a stated non-answer ('unknown', 'n/a', '-')."""
    s = _MARKUP.sub("", fold(str(text)).strip()).replace("\u2212", "-").strip()
    negative = re.match(r"-\s*\d", s) is not None
    s = _THOUSANDS.sub(lambda m: m.group().replace(",", ""), s)
    tokens = [_canonical_number(t) if t[0].isdigit() else t for t in _TOKEN.findall(s)]
    out = " ".join(tokens)
    if out in _NULLS:
        return ""
    return "-" + out if negative else out


# -- parsing --------------------------------------------------------------------------------------


@dataclass
class ParsedTable:
    """What could be read from an answer: rows keyed by the task's column names (the entity
    column and those requested attributes the answer had), in answer order."""

    format: str | None
    """'markdown', 'json' or 'csv'; None when no table was found."""
    rows: list[dict[str, str]] = field(default_factory=list)
    columns: list[str] = field(default_factory=list)
    """The requested attributes the answer's header had."""
    error: str | None = None


class _Columns:
    """Maps an answer's header cells to the task's columns by `name_key`."""

    def __init__(self, entity_column: str, attributes: Sequence[str]) -> None:
        self.entity_column = entity_column
        self.wanted = {name_key(a): a for a in attributes}
        self.entity_keys = [name_key(entity_column), "entity", "name"]

    def map(self, header: Sequence[str]) -> dict[int, str] | None:
        """Index -> column name, with the entity column always mapped; None for a row that
        names neither the entity column nor any requested attribute (not a header)."""
        keys = [name_key(_MARKUP.sub("", str(h))) for h in header]
        entity = next((keys.index(k) for k in self.entity_keys if k in keys), None)
        mapping: dict[int, str] = {}
        for i, k in enumerate(keys):
            if i != entity and k in self.wanted and self.wanted[k] not in mapping.values():
                mapping[i] = self.wanted[k]
        if entity is None:
            if not mapping:
                return None
            entity = next((i for i in range(len(keys)) if i not in mapping), None)
            if entity is None:
                return None
        mapping[entity] = self.entity_column
        return mapping

    def row(self, mapping: Mapping[int, str], cells: Sequence[Any]) -> dict[str, str] | None:
        out = {name: _cell(cells[i]) for i, name in mapping.items() if i < len(cells)}
        return out if normalize_value(out.get(self.entity_column, "")) else None


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool | int | float):
        return json.dumps(value)
    return _MARKUP.sub("", str(value)).strip()


def _split_pipes(line: str) -> list[str]:
    s = line.strip()
    s = s[1:] if s.startswith("|") else s
    s = s[:-1] if s.endswith("|") and not s.endswith("\\|") else s
    return [c.replace("\\|", "|").strip() for c in re.split(r"(?<!\\)\|", s)]


def _is_rule(cells: Sequence[str]) -> bool:
    return all(re.fullmatch(r":?-{2,}:?|", c.replace(" ", "")) for c in cells)


def _markdown(text: str, cols: _Columns) -> list[dict[str, str]] | None:
    blocks: list[list[list[str]]] = [[]]
    for line in text.splitlines():
        if "|" in line and not line.strip().startswith("```"):
            cells = _split_pipes(line)
            if not _is_rule(cells):
                blocks[-1].append(cells)
        elif blocks[-1]:
            blocks.append([])
    rows: list[dict[str, str]] = []
    mapping: dict[int, str] | None = None
    header_keys: list[str] = []
    for block in blocks:
        if not block:
            continue
        header = cols.map(block[0])
        if header is not None:
            mapping, header_keys, body = header, [name_key(c) for c in block[0]], block[1:]
        elif mapping is not None:
            body = block  # rows continued after a break, under the last header
        else:
            continue
        for cells in body:
            if [name_key(c) for c in cells] == header_keys:
                continue  # the header repeated
            if (row := cols.row(mapping, cells)) is not None:
                rows.append(row)
    return rows if mapping is not None else None


def _json_candidates(text: str) -> list[str]:
    found = [m.group(1) for m in re.finditer(r"```[a-zA-Z]*\s*\n(.*?)```", text, re.DOTALL)]
    found.append(text.strip())
    for open_, close in (("[", "]"), ("{", "}")):
        start, end = text.find(open_), text.rfind(close)
        if 0 <= start < end:
            found.append(text[start:end + 1])
    return found


def _json_rows(value: Any, cols: _Columns) -> list[dict[str, str]] | None:
    if isinstance(value, dict):
        for key, inner in value.items():
            if name_key(key) in ("rows", "data", "table", "results", "entities", "items"):
                return _json_rows(inner, cols)
        if value and all(isinstance(v, dict) for v in value.values()):
            return _json_rows([{cols.entity_column: k, **v} for k, v in value.items()], cols)
        return _json_rows([value], cols)
    if not isinstance(value, list) or not value:
        return None
    if all(isinstance(v, list) for v in value):
        mapping = cols.map([str(c) for c in value[0]])
        if mapping is None:
            return None
        return [r for cells in value[1:] if (r := cols.row(mapping, cells)) is not None]
    rows = []
    for item in value:
        if not isinstance(item, dict):
            return None
        keys = list(item)
        mapping = cols.map(keys)
        if mapping is None:
            continue
        if (row := cols.row(mapping, [item[k] for k in keys])) is not None:
            rows.append(row)
    return rows if rows else None


def _json(text: str, cols: _Columns) -> list[dict[str, str]] | None:
    for candidate in _json_candidates(text):
        try:
            value = json.loads(candidate)
        except ValueError:
            continue
        if (rows := _json_rows(value, cols)) is not None:
            return rows
    return None


def _csv(text: str, cols: _Columns) -> list[dict[str, str]] | None:
    fenced = re.findall(r"```[a-zA-Z]*\s*\n(.*?)```", text, re.DOTALL)
    body = "\n".join(fenced) if fenced else text
    for delimiter in (",", "\t", ";"):
        lines = list(csv.reader(io.StringIO(body), delimiter=delimiter, skipinitialspace=True))
        for start, header in enumerate(lines):
            mapping = cols.map(header) if len(header) > 1 else None
            if mapping is None or len(mapping) < 2:
                continue
            rows = []
            for cells in lines[start + 1:]:
                if len(cells) < 2:
                    break
                if (row := cols.row(mapping, cells)) is not None:
                    rows.append(row)
            return rows
    return None


def parse_answer(text: str | None, entity_column: str, attributes: Sequence[str]) -> ParsedTable:
    """Read a table from a model's answer: Markdown, then JSON, then CSV (JSON first when the
    answer starts like JSON). Unknown columns are dropped; rows without an entity name too."""
    if not text or not text.strip():
        return ParsedTable(None, error="the answer is empty")
    cols = _Columns(entity_column, attributes)
    plain = re.sub(r"^```[a-zA-Z]*\s*", "", text.strip())
    readers = [("markdown", _markdown), ("json", _json), ("csv", _csv)]
    if plain.startswith(("{", "[")):
        readers.insert(0, readers.pop(1))
    for fmt, reader in readers:
        rows = reader(text, cols)
        if rows is not None:
            present = {k for r in rows for k in r}
            return ParsedTable(fmt, rows, [a for a in attributes if a in present])
    return ParsedTable(None, error="no table with the requested columns was found in the answer")


# -- scoring --------------------------------------------------------------------------------------


@dataclass
class CellGrade:
    entity: str
    attribute: str
    expected: str
    got: str | None
    """The answer's value as written; None when the answer has no such row or column."""
    correct: bool


@dataclass
class Grade:
    """WideSearch's scores for one answer. Item scores count (entity, attribute, value) cells:
    precision over the non-empty cells the answer gave (extra rows included), recall over the
    cells asked. A row is right when all its requested cells are; `exact` when every row is
    right and there is no extra one."""

    item_precision: float
    item_recall: float
    item_f1: float
    row_precision: float
    row_recall: float
    row_f1: float
    exact: bool
    cells: list[CellGrade]
    """One per cell asked, in task order."""
    missing_rows: list[str]
    extra_rows: list[str]
    """Entity names the answer has that were not asked, or that conflict with an earlier row."""
    parsed: ParsedTable

    def to_json(self) -> dict[str, Any]:
        return {
            "item_precision": self.item_precision, "item_recall": self.item_recall,
            "item_f1": self.item_f1, "row_precision": self.row_precision,
            "row_recall": self.row_recall, "row_f1": self.row_f1, "exact": self.exact,
            "cells_right": sum(c.correct for c in self.cells), "cells_asked": len(self.cells),
            "missing_rows": self.missing_rows, "extra_rows": self.extra_rows,
            "wrong_cells": [{"entity": c.entity, "attribute": c.attribute,
                             "expected": c.expected, "got": c.got}
                            for c in self.cells if not c.correct],
            "parse_error": self.parsed.error,
        }


def _f1(p: float, r: float) -> float:
    return 2 * p * r / (p + r) if p + r else 0.0


def _ratio(a: int, b: int) -> float:
    return a / b if b else 0.0


def grade_table(expected: Mapping[str, Mapping[str, str]], entity_column: str,
                attributes: Sequence[str], answer: str | None) -> Grade:
    """Score `answer` against `expected[entity][attribute]` (the cells asked)."""
    parsed = parse_answer(answer, entity_column, attributes)
    wanted = {name_key(e): e for e in expected}
    aligned: dict[str, dict[str, str]] = {}
    seen: dict[str, list[str]] = {}
    extra: list[str] = []
    predicted_cells = 0
    for row in parsed.rows:
        name = row[entity_column]
        values = [normalize_value(row.get(a, "")) for a in attributes]
        entity = wanted.get(name_key(name))
        if entity is not None and entity in aligned:
            if seen[entity] == values:
                continue  # the same row twice (e.g. a draft table and the final one)
            entity = None
        if entity is None:
            extra.append(name)
        else:
            aligned[entity] = {a: row[a] for a in attributes if a in row}
            seen[entity] = values
        predicted_cells += sum(bool(v) for v in values)
    graded: list[CellGrade] = []
    right_rows = 0
    for entity, values in expected.items():
        row = aligned.get(entity, {})
        row_ok = entity in aligned
        for attribute in attributes:
            got = row.get(attribute)
            ok = got is not None and normalize_value(got) == normalize_value(values[attribute]) \
                and normalize_value(got) != ""
            row_ok &= ok
            graded.append(CellGrade(entity, attribute, values[attribute], got, ok))
        right_rows += row_ok
    right = sum(c.correct for c in graded)
    ip, ir = _ratio(right, predicted_cells), _ratio(right, len(graded))
    predicted_rows = len(aligned) + len(extra)
    rp, rr = _ratio(right_rows, predicted_rows), _ratio(right_rows, len(expected))
    return Grade(ip, ir, _f1(ip, ir), rp, rr, _f1(rp, rr),
                 exact=right_rows == len(expected) == predicted_rows,
                 cells=graded, missing_rows=[e for e in expected if e not in aligned],
                 extra_rows=extra, parsed=parsed)
