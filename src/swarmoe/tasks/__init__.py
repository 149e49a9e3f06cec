"""Benchmark task families the swarm is measured on and trained with.

`widesearch`: WideSearch-style tasks (many attributes of many entities, returned as one table),
from any CSV or from `random_table`, with a local corpus, search tools and WideSearch grading.
Imports stay light: torch loads only when a corpus is first searched.
"""

from __future__ import annotations

from swarmoe.tasks.corpus import Corpus, Page, build_corpus
from swarmoe.tasks.grading import CellGrade, Grade, ParsedTable, normalize_value, parse_answer
from swarmoe.tasks.tables import Table, TableError, parse_csv, random_table, read_table
from swarmoe.tasks.widesearch import (
    WideSearchResult,
    WideSearchTask,
    grade,
    make_task,
    run_task,
)

__all__ = [
    "CellGrade",
    "Corpus",
    "Grade",
    "Page",
    "ParsedTable",
    "Table",
    "TableError",
    "WideSearchResult",
    "WideSearchTask",
    "build_corpus",
    "grade",
    "make_task",
    "normalize_value",
    "parse_answer",
    "parse_csv",
    "random_table",
    "read_table",
    "run_task",
]
