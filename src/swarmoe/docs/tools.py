"""Document tools for agents: list, outline, read, search and tables over a run's documents.

Agents see page numbers as a PDF viewer shows them (1 = the first page) and every result names
its document and pages, so findings can be cited as `[report.pdf p.42]`. A tool's `doc`
argument is looked up by name among the documents the run was given, never opened as a path:
nothing outside those files can be read, whatever an agent asks for.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from swarmoe.docs.document import Document, open_document
from swarmoe.swarm.tools import Tool, ToolError, tool

READ_MAX_PAGES = 10
READ_MAX_CHARS = 24_000
SEARCH_MAX_K = 20


def cite(doc: str, first: int, last: int | None = None) -> str:
    """`[doc p.N]` or `[doc pp.N-M]` with 1-based page numbers."""
    if last is None or last == first:
        return f"[{doc} p.{first}]"
    return f"[{doc} pp.{first}-{last}]"


class DocumentTools:
    """The documents of one run and the tools that read them.

    `documents` are paths (opened and indexed here) or already open `Document`s; each gets a
    unique name, its file name (with ` (2)` etc. for repeats), which is what agents pass."""

    def __init__(
        self,
        documents: Sequence[str | os.PathLike[str] | Document],
        cache_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self.docs: dict[str, Document] = {}
        for item in documents:
            doc = (
                item
                if isinstance(item, Document)
                else open_document(Path(item), cache_dir=cache_dir)
            )
            name, n = doc.name, 1
            while name in self.docs:
                n += 1
                name = f"{doc.name} ({n})"
            self.docs[name] = doc
        if not self.docs:
            raise ValueError("DocumentTools needs at least one document")

    def get(self, doc: str) -> tuple[str, Document]:
        """The run's document called `doc`; anything else (a path, another file) is refused."""
        found = self.docs.get(doc)
        if found is None:
            raise ToolError(
                f"unknown document {doc!r}; this run's documents are: {', '.join(map(repr, self.docs))}"
            )
        return doc, found

    def _page_range(self, name: str, doc: Document, first: int, last: int) -> tuple[int, int]:
        if not 1 <= first <= doc.num_pages:
            raise ToolError(f"{name} has pages 1-{doc.num_pages}; first={first} is outside them")
        if last < first:
            raise ToolError(f"last ({last}) is before first ({first})")
        return first, min(last, doc.num_pages)

    # -- the operations (1-based pages in and out) ---------------------------------------------

    def list_documents(self) -> list[dict[str, Any]]:
        return [
            {"doc": name, "kind": d.kind, "pages": d.num_pages, "outline_entries": len(d.outline())}
            for name, d in self.docs.items()
        ]

    def outline(self, doc: str) -> dict[str, Any]:
        name, d = self.get(doc)
        entries = d.outline()
        sections = []
        for i, e in enumerate(entries):
            nxt = next((x.page for x in entries[i + 1 :] if x.level <= e.level), d.num_pages)
            last = max(e.page, nxt - 1) + 1  # 1-based, inclusive
            sections.append(
                {
                    "title": e.title,
                    "level": e.level,
                    "first_page": e.page + 1,
                    "last_page": last,
                    "cite": cite(name, e.page + 1, last),
                }
            )
        return {"doc": name, "pages": d.num_pages, "sections": sections}

    def read_pages(self, doc: str, first: int, last: int) -> str:
        name, d = self.get(doc)
        first, last = self._page_range(name, d, first, last)
        out: list[str] = []
        used = 0
        for p in range(first, last + 1):
            if p - first >= READ_MAX_PAGES or used >= READ_MAX_CHARS:
                out.append(
                    f"[truncated: read at most {READ_MAX_PAGES} pages or {READ_MAX_CHARS} characters per call; call read_pages({name!r}, {p}, {last}) for the rest]"
                )
                break
            text = d.page(p - 1).strip()
            room = READ_MAX_CHARS - used
            if len(text) > room:
                text = text[:room] + f"\n[page cut at {room} characters]"
            out.append(f"=== {cite(name, p)} ===\n{text}")
            used += len(text)
        return "\n\n".join(out)

    def search(self, doc: str, query: str, k: int = 5) -> list[dict[str, Any]]:
        name, d = self.get(doc)
        k = max(1, min(k, SEARCH_MAX_K))
        return [
            {
                "doc": name,
                "page": h.page + 1,
                "cite": cite(name, h.page + 1),
                "score": round(h.score, 3),
                "text": h.text,
            }
            for h in d.search(query, k=k)
        ]

    def tables(self, doc: str, page: int) -> list[dict[str, Any]]:
        name, d = self.get(doc)
        self._page_range(name, d, page, page)
        return [
            {"doc": name, "page": page, "cite": cite(name, page), "table": t.to_markdown()}
            for t in d.tables(page - 1)
        ]

    # -- as swarm tools ------------------------------------------------------------------------

    def tools(self) -> list[Tool]:
        """The five operations as `swarmoe.swarm` tools."""

        def list_documents() -> list[dict[str, Any]]:
            """List the documents of this run with their page counts."""
            return self.list_documents()

        def outline(doc: str) -> dict[str, Any]:
            """The sections of a document with their page ranges (1-based, inclusive).

            Args:
                doc: the document's name, as list_documents gives it
            """
            return self.outline(doc)

        def read_pages(doc: str, first: int, last: int) -> str:
            """Read pages first..last of a document (1-based, inclusive; at most 10 pages or
            24,000 characters per call). Each page starts with its citation, like [doc p.3].

            Args:
                doc: the document's name, as list_documents gives it
                first: first page to read, 1-based
                last: last page to read, inclusive
            """
            return self.read_pages(doc, first, last)

        def search(doc: str, query: str, k: int = 5) -> list[dict[str, Any]]:
            """Find the pages that best match a query (keywords and meaning), best first, each
            with its citation and the best-matching passage.

            Args:
                doc: the document's name, as list_documents gives it
                query: what to look for, in words or as a question
                k: how many pages to return (at most 20)
            """
            return self.search(doc, query, k)

        def tables(doc: str, page: int) -> list[dict[str, Any]]:
            """The tables on one page, as markdown, with their citation.

            Args:
                doc: the document's name, as list_documents gives it
                page: the page, 1-based
            """
            return self.tables(doc, page)

        return [tool(f) for f in (list_documents, outline, read_pages, search, tables)]
