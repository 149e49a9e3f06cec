"""The on-disk cache of parsed documents and their indexes, keyed by content hash.

A folder per document: `<root>/docs/<sha256>/` with the parse (`parsed.json`), the index
(`bm25/`, `dense.npy`) and tables as they are extracted (`tables/<page>.json`). The same bytes
under another name or path hit the same entry; an edited file gets a new one. Entries are
written to a temporary folder and renamed into place, so a crash or a concurrent writer never
leaves half an entry that a reader would trust.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

from swarmoe.docs.model import OutlineEntry, Parsed, Table

# Bumped whenever what a reader extracts changes, so stale parses are not reused.
PARSE_VERSION = 1


def default_root() -> Path:
    """`$SWARMOE_CACHE_DIR`, else `~/.cache/swarmoe`."""
    env = os.environ.get("SWARMOE_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "swarmoe"


def content_key(data: bytes, settings: str) -> str:
    """sha256 of the bytes and of everything that shapes what is stored for them."""
    h = hashlib.sha256(data)
    h.update(f"\0parse={PARSE_VERSION}\0{settings}".encode())
    return h.hexdigest()


class DocCache:
    """One document's cache folder."""

    def __init__(self, root: Path, key: str) -> None:
        self.folder = root / "docs" / key

    def exists(self) -> bool:
        return (self.folder / "parsed.json").is_file()

    def load_parsed(self) -> Parsed:
        raw = json.loads((self.folder / "parsed.json").read_text())
        tables = raw["tables"]
        return Parsed(
            kind=raw["kind"],
            pages=raw["pages"],
            outline=[OutlineEntry(**e) for e in raw["outline"]],
            tables=None
            if tables is None
            else {int(p): [Table(**t) for t in ts] for p, ts in tables.items()},
        )

    def write(self, parsed: Parsed, save_index: object) -> None:
        """Store the parse and, through `save_index(folder)`, the index; atomically."""
        self.folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=self.folder.parent, prefix=".tmp-"))
        try:
            raw = {
                "kind": parsed.kind,
                "pages": parsed.pages,
                "outline": [asdict(e) for e in parsed.outline],
                "tables": None
                if parsed.tables is None
                else {str(p): [asdict(t) for t in ts] for p, ts in parsed.tables.items()},
            }
            (tmp / "parsed.json").write_text(json.dumps(raw))
            save_index(tmp)
            try:
                tmp.rename(self.folder)
            except OSError:  # another process stored the same entry first: theirs is as good
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def load_tables(self, page: int) -> list[Table] | None:
        f = self.folder / "tables" / f"{page}.json"
        if not f.is_file():
            return None
        return [Table(**t) for t in json.loads(f.read_text())]

    def store_tables(self, page: int, tables: list[Table]) -> None:
        folder = self.folder / "tables"
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{page}.{os.getpid()}.json"
        tmp.write_text(json.dumps([asdict(t) for t in tables]))
        tmp.replace(folder / f"{page}.json")
