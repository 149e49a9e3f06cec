"""`open_document` and the `Document` it returns."""

from __future__ import annotations

import os
import threading
from functools import cached_property
from pathlib import Path
from typing import Any

from swarmoe.docs.cache import DocCache, content_key, default_root
from swarmoe.docs.embed import prefetch_embedder
from swarmoe.docs.index import HybridIndex, describe
from swarmoe.docs.model import DocumentError, OutlineEntry, Parsed, SearchHit, Table
from swarmoe.docs.readers import pdf_tables, read
from swarmoe.docs.text import detect_headings, strip_running_lines


class Document:
    """A parsed, indexed document. Pages are 0-indexed everywhere (`page`, outline entries,
    search hits, tables); people-facing output adds 1 where it says 'p.'."""

    def __init__(
        self, path: Path, key: str, parsed: Parsed, index: HybridIndex, cache: DocCache | None
    ) -> None:
        self.path = path
        self.name = path.name
        self.key = key
        self.kind = parsed.kind
        self._parsed = parsed
        self._index = index
        self._cache = cache
        self._stat = _stamp(path)
        self._lock = threading.Lock()
        self._plumber: Any = None

    def __repr__(self) -> str:
        return f"Document({self.name!r}, kind={self.kind!r}, pages={self.num_pages})"

    @property
    def num_pages(self) -> int:
        return len(self._parsed.pages)

    def page(self, i: int) -> str:
        """The text of page `i` (0-indexed)."""
        if not 0 <= i < self.num_pages:
            raise IndexError(f"{self.name}: page {i} out of range (0..{self.num_pages - 1})")
        return self._parsed.pages[i]

    @cached_property
    def _outline(self) -> list[OutlineEntry]:
        if self._parsed.outline:
            return list(self._parsed.outline)
        lines = strip_running_lines(self._parsed.pages)
        return [OutlineEntry(title=t, page=p, level=lvl) for t, p, lvl in detect_headings(lines)]

    def outline(self) -> list[OutlineEntry]:
        """The file's own outline (PDF bookmarks, HTML/Markdown/DOCX headings) or, when it has
        none, headings detected from the text."""
        return list(self._outline)

    def search(self, query: str, k: int = 5) -> list[SearchHit]:
        """The `k` pages that best answer `query`, best first (hybrid BM25 + dense)."""
        if k <= 0 or not query.strip():
            return []
        return self._index.search(query, k)

    def tables(self, page: int) -> list[Table]:
        """Tables on page `page`; for PDFs extracted on first request and then cached."""
        self.page(page)  # bounds check with the document's name in the message
        if self._parsed.tables is not None:
            return list(self._parsed.tables.get(page, []))
        with self._lock:
            cached = self._cache.load_tables(page) if self._cache else None
            if cached is not None:
                return cached
            if _stamp(self.path) != self._stat:
                raise DocumentError(
                    self.path, "the file changed since it was opened; open it again"
                )
            if self._plumber is None:
                import pdfplumber

                self._plumber = pdfplumber.open(self.path)  # kept: reopening costs 40% a call
            found = pdf_tables(self._plumber, page)
            if self._cache:
                self._cache.store_tables(page, found)
            return found


def _stamp(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def open_document(
    path: str | os.PathLike[str],
    cache_dir: str | os.PathLike[str] | None = None,
    use_cache: bool = True,
) -> Document:
    """Parse and index a PDF, HTML, DOCX, Markdown or text file, or load both from the cache
    (`cache_dir`, default `$SWARMOE_CACHE_DIR` or `~/.cache/swarmoe`) when these exact bytes
    were indexed before. Raises DocumentError, naming the file, for missing, empty, encrypted
    or broken files."""
    p = Path(path).expanduser().resolve()
    if not p.is_file():
        raise DocumentError(p, "no such file" if not p.exists() else "not a regular file")
    try:
        data = p.read_bytes()
    except OSError as e:
        raise DocumentError(p, f"cannot be read ({e.strerror})") from None
    key = content_key(data, describe())
    cache = DocCache(Path(cache_dir) if cache_dir else default_root(), key) if use_cache else None
    if cache is not None and cache.exists():
        parsed = cache.load_parsed()
        return Document(p, key, parsed, HybridIndex.load(cache.folder, parsed.pages), cache)
    prefetch_embedder()
    parsed = read(p, data)
    index = HybridIndex.build(parsed.pages)
    if cache is not None:
        cache.write(parsed, index.save)
    return Document(p, key, parsed, index, cache)
