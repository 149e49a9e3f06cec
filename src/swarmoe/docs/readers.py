"""Readers: one function per format turning a file into `Parsed` pages.

PDF pages are the file's own pages, read with pypdfium2 (PDFium's text layer, some twenty
times faster than pypdf on filings). Formats without pages (HTML, DOCX, Markdown, text) are cut
into pages of about `PAGE_CHARS` characters at block boundaries, honouring explicit page breaks
(DOCX page breaks, form feeds in text), so citations work the same way for every format.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from swarmoe.docs.model import DocumentError, OutlineEntry, Parsed, Table

PAGE_CHARS = 3000

_KINDS = {
    ".pdf": "pdf",
    ".html": "html",
    ".htm": "html",
    ".xhtml": "html",
    ".docx": "docx",
    ".md": "markdown",
    ".markdown": "markdown",
    ".txt": "text",
    ".text": "text",
}


def detect_kind(path: Path, head: bytes) -> str:
    """The format from the first bytes when they are telling, else from the extension."""
    if head.startswith(b"%PDF-"):
        return "pdf"
    kind = _KINDS.get(path.suffix.lower())
    if kind:
        return kind
    if head.startswith(b"PK\x03\x04"):
        return "docx"
    if re.match(rb"\s*(<!doctype html|<html)", head[:200], re.IGNORECASE):
        return "html"
    return "text"


def read(path: Path, data: bytes) -> Parsed:
    """Parse `data` (the bytes of `path`) into pages; DocumentError names the file on failure."""
    if not data.strip():
        raise DocumentError(path, "the file is empty")
    kind = detect_kind(path, data[:512])
    parsed = {
        "pdf": _read_pdf,
        "html": _read_html,
        "docx": _read_docx,
        "markdown": _read_markdown,
        "text": _read_text,
    }[kind](path, data)
    if not any(p.strip() for p in parsed.pages):
        hint = " (a scanned PDF needs OCR first)" if kind == "pdf" else ""
        raise DocumentError(path, f"no text could be extracted from this {kind} file{hint}")
    return parsed


# -- PDF ----------------------------------------------------------------------------------------


def _read_pdf(path: Path, data: bytes) -> Parsed:
    import pypdfium2 as pdfium

    try:
        pdf = pdfium.PdfDocument(data)
    except pdfium.PdfiumError as e:
        if "password" in str(e).lower():
            raise DocumentError(
                path, "the PDF is encrypted (password-protected); decrypt it first"
            ) from None
        raise DocumentError(path, f"not a readable PDF ({e})") from None
    try:
        if len(pdf) == 0:
            raise DocumentError(path, "the PDF has no pages")
        pages = []
        for i in range(len(pdf)):
            page = pdf[i]
            textpage = page.get_textpage()
            pages.append(textpage.get_text_range().replace("\r\n", "\n").replace("\r", "\n"))
            textpage.close()
            page.close()
        outline = []
        for mark in pdf.get_toc():
            dest = mark.get_dest()
            index = dest.get_index() if dest is not None else None
            title = " ".join(mark.get_title().split())
            if index is not None and title and 0 <= index < len(pages):
                outline.append(OutlineEntry(title=title, page=index, level=mark.level + 1))
    except DocumentError:
        raise
    except pdfium.PdfiumError as e:
        raise DocumentError(path, f"the PDF is damaged ({e})") from None
    finally:
        pdf.close()
    return Parsed(kind="pdf", pages=pages, outline=outline)


def pdf_tables(pdf: Any, page: int) -> list[Table]:
    """Ruled and aligned tables on one page of an open `pdfplumber` PDF: a tenth of a second
    or more per page, which is why it runs only when a caller asks for a page's tables."""
    p = pdf.pages[page]
    try:
        found = p.extract_tables()
    finally:
        p.close()  # drop the page's parsed objects; a long run asks for many pages
    return [
        Table(page=page, rows=[[c or "" for c in row] for row in t])
        for t in found
        if t and any(any(c for c in r) for r in t)
    ]


# -- flowing formats ----------------------------------------------------------------------------


@dataclass
class _Block:
    kind: str  # "heading" | "text" | "table" | "break"
    text: str = ""
    level: int = 0
    rows: list[list[str]] = field(default_factory=list)


def _paginate(kind: str, blocks: list[_Block]) -> Parsed:
    """Pages of about PAGE_CHARS characters, cut between blocks (inside a block only when the
    block alone is longer than a page); headings and tables keep the page they land on."""
    pages: list[list[str]] = [[]]
    size = 0
    outline: list[OutlineEntry] = []
    tables: dict[int, list[Table]] = {}

    def new_page() -> None:
        nonlocal size
        if pages[-1]:
            pages.append([])
            size = 0

    for b in blocks:
        if b.kind == "break":
            new_page()
            continue
        text = b.text.strip()
        if not text:
            continue
        if size and size + len(text) > PAGE_CHARS:
            new_page()
        if b.kind == "heading":
            outline.append(
                OutlineEntry(title=" ".join(text.split()), page=len(pages) - 1, level=b.level)
            )
        if b.kind == "table":
            tables.setdefault(len(pages) - 1, []).append(Table(page=len(pages) - 1, rows=b.rows))
        while len(text) > PAGE_CHARS:
            cut = text.rfind("\n", 0, PAGE_CHARS)
            cut = cut if cut > PAGE_CHARS // 2 else text.rfind(" ", 0, PAGE_CHARS)
            cut = cut if cut > 0 else PAGE_CHARS
            pages[-1].append(text[:cut])
            new_page()
            text = text[cut:].strip()
        pages[-1].append(text)
        size += len(text) + 2
    return Parsed(kind=kind, pages=["\n\n".join(p) for p in pages], outline=outline, tables=tables)


def _decode(path: Path, data: bytes) -> str:
    if b"\x00" in data[:4096]:
        raise DocumentError(path, "looks like a binary file, not text (unsupported format)")
    for enc in ("utf-8-sig", "cp1252"):
        try:
            return data.decode(enc)
        except UnicodeDecodeError:
            continue
    return data.decode("latin-1")


def _table_text(rows: list[list[str]]) -> str:
    return "\n".join(" | ".join(c.strip() for c in r) for r in rows)


_HEADINGS = {f"h{i}": i for i in range(1, 7)}
_BLOCK_TAGS = {"p", "li", "pre", "blockquote", "dd", "dt", "caption", "figcaption", "address"}


def _read_html(path: Path, data: bytes) -> Parsed:
    from bs4 import BeautifulSoup, NavigableString, Tag

    soup = BeautifulSoup(data, "html.parser")
    for t in soup(["script", "style", "noscript", "template", "head"]):
        t.decompose()
    blocks: list[_Block] = []
    loose: list[str] = []

    def flush() -> None:
        text = " ".join(" ".join(loose).split())
        if text:
            blocks.append(_Block("text", text))
        loose.clear()

    def walk(node: Tag) -> None:
        for child in node.children:
            if isinstance(child, NavigableString):
                if child.strip() and type(child) is NavigableString:
                    loose.append(str(child))
                continue
            if not isinstance(child, Tag):
                continue
            if child.name in _HEADINGS:
                flush()
                blocks.append(
                    _Block("heading", child.get_text(" ", strip=True), _HEADINGS[child.name])
                )
            elif child.name == "table":
                flush()
                rows = [
                    [c.get_text(" ", strip=True) for c in tr.find_all(["td", "th"])]
                    for tr in child.find_all("tr")
                ]
                rows = [r for r in rows if any(r)]
                if rows:
                    blocks.append(_Block("table", _table_text(rows), rows=rows))
            elif child.name in _BLOCK_TAGS:
                flush()
                blocks.append(_Block("text", child.get_text(" ", strip=True)))
            elif child.name == "br":
                loose.append("\n")
            else:
                walk(child)
        if node.name not in (
            "span",
            "a",
            "b",
            "i",
            "em",
            "strong",
            "code",
            "small",
            "sup",
            "sub",
            "u",
        ):
            flush()

    walk(soup)
    flush()
    return _paginate("html", blocks)


def _read_docx(path: Path, data: bytes) -> Parsed:
    import io
    import zipfile

    import docx
    from docx.table import Table as DocxTable
    from docx.text.paragraph import Paragraph

    if data.startswith(b"\xd0\xcf\x11\xe0"):
        raise DocumentError(
            path,
            "the DOCX is encrypted (password-protected) or a legacy .doc; save it as plain .docx",
        )
    try:
        document = docx.Document(io.BytesIO(data))
    except (zipfile.BadZipFile, KeyError, ValueError) as e:
        raise DocumentError(path, f"not a readable DOCX ({e})") from None
    blocks: list[_Block] = []
    w = "{http://schemas.openxmlformats.org/wordprocessingml/2006/main}"
    for el in document.element.body.iterchildren():
        if el.tag == w + "p":
            para = Paragraph(el, document)
            if (
                any(br.get(w + "type") == "page" for br in el.iter(w + "br"))
                or el.find(f"{w}pPr/{w}pageBreakBefore") is not None
            ):
                blocks.append(_Block("break"))
            style = (para.style.name if para.style is not None else "") or ""
            m = re.match(r"(?:Heading\s*(\d)|Title)$", style)
            if m and para.text.strip():
                blocks.append(_Block("heading", para.text, int(m.group(1) or 1)))
            else:
                blocks.append(_Block("text", para.text))
        elif el.tag == w + "tbl":
            rows = [[cell.text for cell in row.cells] for row in DocxTable(el, document).rows]
            rows = [r for r in rows if any(c.strip() for c in r)]
            if rows:
                blocks.append(_Block("table", _table_text(rows), rows=rows))
    return _paginate("docx", blocks)


_MD_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_MD_TABLE_RULE = re.compile(r"^\s*\|?\s*:?-{2,}:?\s*(\|\s*:?-{2,}:?\s*)*\|?\s*$")


def _md_row(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _read_markdown(path: Path, data: bytes) -> Parsed:
    lines = _decode(path, data).splitlines()
    blocks: list[_Block] = []
    para: list[str] = []
    fence = False

    def flush() -> None:
        if para:
            blocks.append(_Block("text", "\n".join(para)))
            para.clear()

    i = 0
    while i < len(lines):
        line = lines[i]
        if line.lstrip().startswith(("```", "~~~")):
            fence = not fence
            para.append(line)
        elif fence:
            para.append(line)
        elif m := _MD_HEADING.match(line):
            flush()
            blocks.append(_Block("heading", m.group(2), len(m.group(1))))
        elif "|" in line and i + 1 < len(lines) and _MD_TABLE_RULE.match(lines[i + 1]):
            flush()
            rows = [_md_row(line)]
            i += 2
            while i < len(lines) and "|" in lines[i] and lines[i].strip():
                rows.append(_md_row(lines[i]))
                i += 1
            blocks.append(_Block("table", _table_text(rows), rows=rows))
            continue
        elif (
            i + 1 < len(lines)
            and line.strip()
            and re.match(r"^(=+|-+)\s*$", lines[i + 1])
            and not para
        ):
            blocks.append(_Block("heading", line, 1 if lines[i + 1].startswith("=") else 2))
            i += 1
        elif not line.strip():
            flush()
        else:
            para.append(line)
        i += 1
    flush()
    return _paginate("markdown", blocks)


def _read_text(path: Path, data: bytes) -> Parsed:
    from swarmoe.docs.text import heading_level

    blocks: list[_Block] = []
    for n, chunk in enumerate(_decode(path, data).split("\f")):
        if n:
            blocks.append(_Block("break"))
        for para in re.split(r"\n\s*\n", chunk):
            first = para.strip().split("\n", 1)[0]
            level = heading_level(first) if "\n" not in para.strip() else None
            blocks.append(_Block("heading" if level else "text", para, level or 0))
    return _paginate("text", blocks)
