"""The page-aware hybrid index: BM25 over page text plus dense vectors of page leads, fused by
reciprocal rank.

Why this shape (measured on a dev split of FinanceBench filings, see docs/documents.md):
- Pages are the unit, because citations are pages and answers in reports sit on one page.
- Running headers and footers are dropped and a page's title lines count twice in BM25:
  statement names and section titles say what a page is about; the repeated company name
  and page furniture do not.
- The dense side embeds only the first `LEAD_TOKENS` word pieces of each (header-stripped)
  page. In reports that lead names the statement, note or section; it scored as well as
  embedding whole pages in chunks at a tenth of the compute, which is what lets a 500-page
  filing be indexed in seconds on two cores.
- Questions are expanded with financial vocabulary (glossary.py) before both retrievers.
- The two are fused by summing z-normalised scores (CombSUM). Reciprocal-rank fusion was
  measured too: it treats BM25's confident single hit (a rare name on one page) like a
  near-tie, and lost to z-score sums on the dev split and on synthetic reports.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from swarmoe.docs.glossary import expand_query
from swarmoe.docs.model import SearchHit
from swarmoe.docs.text import analyze, page_title, snippet, strip_running_lines

LEAD_TOKENS = 64
TITLE_WEIGHT = 2


def _standardize(scores: np.ndarray) -> np.ndarray:
    """Scores as z-values, so each retriever's confidence (how far a page stands out from the
    rest of this document) decides, not its raw scale."""
    sd = scores.std()
    return (scores - scores.mean()) / (sd if sd > 0 else 1.0)


class HybridIndex:
    """BM25 (bm25s) and dense page vectors for one document; searched together."""

    def __init__(self, pages: list[str], bm25: Any, dense: np.ndarray) -> None:
        self.pages = pages
        self.bm25 = bm25
        self.dense = dense

    @classmethod
    def build(cls, pages: list[str]) -> HybridIndex:
        import bm25s

        from swarmoe.docs.embed import get_embedder

        lines = strip_running_lines(pages)
        corpus = [analyze(" ".join([page_title(ls)] * TITLE_WEIGHT + ls)) for ls in lines]
        bm25 = None  # a document of numbers and stopwords only has no BM25 side
        if any(corpus):
            bm25 = bm25s.BM25()
            bm25.index(corpus, show_progress=False)
        # ~8 characters per word piece: cutting the text first keeps the tokenizer from
        # reading whole pages only to throw most of them away.
        leads = [" ".join(ls)[: LEAD_TOKENS * 8] for ls in lines]
        dense = get_embedder().encode(leads, max_tokens=LEAD_TOKENS)
        return cls(pages, bm25, dense)

    def save(self, folder: Path) -> None:
        if self.bm25 is not None:
            self.bm25.save(str(folder / "bm25"))
        np.save(folder / "dense.npy", self.dense)

    @classmethod
    def load(cls, folder: Path, pages: list[str]) -> HybridIndex:
        import bm25s

        bm25 = bm25s.BM25.load(str(folder / "bm25")) if (folder / "bm25").is_dir() else None
        return cls(pages, bm25, np.load(folder / "dense.npy"))

    def search(self, query: str, k: int = 5) -> list[SearchHit]:
        from swarmoe.docs.embed import get_embedder

        expanded = expand_query(query)
        terms = analyze(expanded)
        fused = _standardize(self.dense @ get_embedder().encode([expanded])[0])
        if terms and self.bm25 is not None:
            fused += _standardize(np.asarray(self.bm25.get_scores(terms), dtype=np.float64))
        fused[[not p.strip() for p in self.pages]] = -np.inf
        top = [int(i) for i in np.argsort(-fused, kind="stable")[:k] if np.isfinite(fused[i])]
        return [
            SearchHit(page=i, text=snippet(self.pages[i], set(terms)), score=float(fused[i]))
            for i in top
        ]


def describe() -> str:
    """The settings that shape the index, stored next to it so a cache built with other
    settings is never reused."""
    from swarmoe.docs.embed import MODEL_ID

    return json.dumps(
        {"lead_tokens": LEAD_TOKENS, "title_weight": TITLE_WEIGHT, "embedder": MODEL_ID, "v": 1}
    )
