"""Long documents for agents: open PDF, HTML, DOCX, Markdown or text files as pages, with an
outline, tables and page-aware hybrid search, cached on disk by content hash.

    from swarmoe.docs import open_document
    doc = open_document("report.pdf")
    doc.num_pages, doc.page(0), doc.outline(), doc.tables(41)
    for hit in doc.search("capital expenditure", k=5):
        print(hit.page, hit.score, hit.text)
"""

from __future__ import annotations

from swarmoe.docs.document import Document, open_document
from swarmoe.docs.model import DocumentError, OutlineEntry, SearchHit, Table

__all__ = ["Document", "DocumentError", "OutlineEntry", "SearchHit", "Table", "open_document"]
