"""The value types of the document layer: what readers produce and searches return."""

from __future__ import annotations

from dataclasses import dataclass, field


class DocumentError(ValueError):
    """A file that cannot be read as a document; the message starts with the file's path."""

    def __init__(self, path: object, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


@dataclass(frozen=True)
class OutlineEntry:
    """A heading or bookmark: its text, its 0-indexed page and its depth (1 = top)."""

    title: str
    page: int
    level: int = 1


@dataclass(frozen=True)
class Table:
    """A table found on a page: rows of cell strings, the first row usually the header."""

    page: int
    rows: list[list[str]]

    def to_markdown(self) -> str:
        """A pipe table, the form models read most reliably."""
        if not self.rows:
            return ""
        width = max(len(r) for r in self.rows)
        rows = [
            [(c or "").replace("\n", " ").replace("|", "/").strip() for c in r]
            + [""] * (width - len(r))
            for r in self.rows
        ]
        lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * width]
        lines += ["| " + " | ".join(r) + " |" for r in rows[1:]]
        return "\n".join(lines)


@dataclass(frozen=True)
class SearchHit:
    """One page matching a query: 0-indexed `page`, the best-matching passage as `text`,
    and the fused `score` (higher is better; comparable within one search only)."""

    page: int
    text: str
    score: float


@dataclass
class Parsed:
    """What a reader extracts from a file before indexing: page texts, the outline the file
    itself declares (bookmarks, heading styles) and, for formats where tables are cheap to
    read while parsing, the tables by page."""

    kind: str
    pages: list[str]
    outline: list[OutlineEntry] = field(default_factory=list)
    tables: dict[int, list[Table]] | None = None
