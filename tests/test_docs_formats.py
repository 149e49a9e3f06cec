"""Ingestion of every format, outlines, tables, the content-hash cache and clear errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from swarmoe.docs import DocumentError, open_document
from swarmoe.docs import document as document_module


@pytest.fixture()
def cache(tmp_path: Path) -> Path:
    return tmp_path / "cache"


def _pdf(
    path: Path, pages: list[list[str]], bookmarks: bool = True, encrypt: str | None = None
) -> Path:
    from reportlab.pdfgen import canvas

    c = canvas.Canvas(str(path), encrypt=encrypt)
    for i, lines in enumerate(pages):
        if bookmarks:
            c.bookmarkPage(f"p{i}")
            c.addOutlineEntry(lines[0], f"p{i}", level=0)
        y = 780
        for line in lines:
            c.drawString(60, y, line)
            y -= 16
        c.showPage()
    c.save()
    return path


def test_pdf_pages_outline_and_search(tmp_path: Path, cache: Path) -> None:
    pages = [
        ["Overview", "The company makes bicycles in Utrecht."],
        ["Results", "Revenue grew to 12.5 million euros on strong cargo bike demand."],
        ["Risks", "A shortage of aluminium frames could delay deliveries."],
    ]
    doc = open_document(_pdf(tmp_path / "r.pdf", pages), cache_dir=cache)
    assert doc.kind == "pdf" and doc.num_pages == 3
    assert "cargo bike demand" in doc.page(1)
    assert [(e.title, e.page) for e in doc.outline()] == [
        ("Overview", 0),
        ("Results", 1),
        ("Risks", 2),
    ]
    assert doc.search("aluminium shortage", k=1)[0].page == 2
    hit = doc.search("how much revenue", k=1)[0]
    assert hit.page == 1 and "12.5 million" in hit.text
    with pytest.raises(IndexError, match="r.pdf"):
        doc.page(3)


def test_pdf_without_bookmarks_gets_detected_headings(tmp_path: Path, cache: Path) -> None:
    pages = [
        ["PART I", "Item 1. Business", "We sell tea."],
        ["Item 1A. Risk Factors", "Tea prices vary.", "2017 Executive Vice President, Retail"],
        ["NOTES TO THE ACCOUNTS", "Note 3 Leases", "We lease shops."],
    ]
    doc = open_document(_pdf(tmp_path / "n.pdf", pages, bookmarks=False), cache_dir=cache)
    outline = [(e.title, e.page, e.level) for e in doc.outline()]
    assert ("PART I", 0, 1) in outline
    assert ("Item 1. Business", 0, 2) in outline
    assert ("Item 1A. Risk Factors", 1, 2) in outline
    assert ("NOTES TO THE ACCOUNTS", 2, 3) in outline
    assert all("We sell tea" not in t and "Vice President" not in t for t, _, _ in outline)


def test_html(tmp_path: Path, cache: Path) -> None:
    body = "".join(
        f"<p>Paragraph {i} about regional logistics and warehouse staffing levels.</p>"
        for i in range(120)
    )
    html = f"""<!doctype html><html><head><title>x</title><script>var secret = 1;</script></head><body>
    <h1>Annual review</h1><p>Intro text.</p><h2>Segments</h2>
    <table><tr><th>Segment</th><th>Revenue</th></tr><tr><td>Retail</td><td>1,200</td></tr></table>
    <div>{body}</div><h2>Outlook</h2><p>We expect growth in <b>Norway</b> next year.</p></body></html>"""
    (tmp_path / "a.html").write_text(html)
    doc = open_document(tmp_path / "a.html", cache_dir=cache)
    assert doc.kind == "html" and doc.num_pages > 1
    assert "secret" not in " ".join(doc.page(i) for i in range(doc.num_pages))
    outline = doc.outline()
    assert [e.title for e in outline] == ["Annual review", "Segments", "Outlook"]
    assert [e.level for e in outline] == [1, 2, 2]
    last = outline[-1].page
    assert last == doc.num_pages - 1 and "growth in Norway next year" in doc.page(last)
    assert doc.tables(0)[0].rows == [["Segment", "Revenue"], ["Retail", "1,200"]]
    assert doc.search("growth in Norway", k=1)[0].page == last


def test_docx(tmp_path: Path, cache: Path) -> None:
    import docx
    from docx.enum.text import WD_BREAK

    d = docx.Document()
    d.add_heading("Strategy", level=1)
    d.add_paragraph("We focus on solar panels for farms.")
    t = d.add_table(rows=2, cols=2)
    t.cell(0, 0).text, t.cell(0, 1).text = "Region", "Installs"
    t.cell(1, 0).text, t.cell(1, 1).text = "Kenya", "340"
    d.add_paragraph().add_run().add_break(WD_BREAK.PAGE)
    d.add_heading("Risks", level=2)
    d.add_paragraph("Import tariffs on inverters could raise costs.")
    d.save(tmp_path / "s.docx")
    doc = open_document(tmp_path / "s.docx", cache_dir=cache)
    assert doc.kind == "docx" and doc.num_pages == 2
    assert [(e.title, e.page, e.level) for e in doc.outline()] == [
        ("Strategy", 0, 1),
        ("Risks", 1, 2),
    ]
    assert doc.tables(0)[0].rows == [["Region", "Installs"], ["Kenya", "340"]]
    assert "tariffs on inverters" in doc.page(1)
    assert doc.search("tariffs", k=1)[0].page == 1


def test_markdown_and_text(tmp_path: Path, cache: Path) -> None:
    md = "# Plan\n\nBuild a ferry terminal.\n\n## Costs\n\n| Item | EUR |\n|---|---|\n| Dock | 4m |\n\n```\n# not a heading\n```\n"
    (tmp_path / "p.md").write_text(md)
    doc = open_document(tmp_path / "p.md", cache_dir=cache)
    assert doc.kind == "markdown"
    assert [(e.title, e.level) for e in doc.outline()] == [("Plan", 1), ("Costs", 2)]
    assert doc.tables(0)[0].rows == [["Item", "EUR"], ["Dock", "4m"]]
    assert doc.tables(0)[0].to_markdown().splitlines()[2] == "| Dock | 4m |"

    (tmp_path / "t.txt").write_text(
        "INTRODUCTION\n\nFirst page words.\fSecond page mentions glaciers.\n"
    )
    doc = open_document(tmp_path / "t.txt", cache_dir=cache)
    assert doc.kind == "text" and doc.num_pages == 2
    assert "glaciers" in doc.page(1) and doc.tables(1) == []
    assert doc.outline()[0].title == "INTRODUCTION"


def test_cache_is_keyed_by_content(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = _pdf(
        tmp_path / "a.pdf", [["Alpha", "Ships carry copper ore."], ["Beta", "Trains carry grain."]]
    )
    first = open_document(src, cache_dir=cache)
    copy = tmp_path / "renamed.pdf"
    shutil.copy(src, copy)

    def no_parse(*_: object) -> None:
        raise AssertionError("parsed again despite a cached entry")

    monkeypatch.setattr(document_module, "read", no_parse)
    again = open_document(copy, cache_dir=cache)  # same bytes, other name: cache hit
    assert again.key == first.key and again.name == "renamed.pdf"
    assert again.page(1) == first.page(1)
    assert again.search("grain", k=1)[0].page == 1
    _pdf(copy, [["Alpha", "Ships carry copper ore."], ["Beta", "Trains carry timber."]])
    with pytest.raises(AssertionError, match="parsed again"):
        open_document(copy, cache_dir=cache)  # new content: a new entry
    assert len(list((cache / "docs").iterdir())) == 1


def test_env_cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SWARMOE_CACHE_DIR", str(tmp_path / "envcache"))
    (tmp_path / "x.txt").write_text("Some words about lighthouses.")
    open_document(tmp_path / "x.txt")
    assert len(list((tmp_path / "envcache" / "docs").iterdir())) == 1


def test_errors_name_the_file(tmp_path: Path, cache: Path) -> None:
    cases = {
        "empty.pdf": b"",
        "broken.pdf": b"%PDF-1.7\n1 0 obj << /Type /Catalog >> garbage",
        "blank.txt": b"   \n\n ",
        "binary.txt": b"\x00\x01\x02\x03" * 50,
        "locked.docx": b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + b"\x00" * 100,
        "broken.docx": b"PK\x03\x04 not really a zip",
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(DocumentError, match=name):
            open_document(tmp_path / name, cache_dir=cache)
    enc = _pdf(tmp_path / "secret.pdf", [["Hidden", "text"]], encrypt="hunter2")
    with pytest.raises(DocumentError, match=r"secret\.pdf: .*encrypted"):
        open_document(enc, cache_dir=cache)
    blank = _pdf(tmp_path / "scan.pdf", [[""]], bookmarks=False)
    with pytest.raises(DocumentError, match=r"scan\.pdf: no text"):
        open_document(blank, cache_dir=cache)
    with pytest.raises(DocumentError, match=r"missing\.pdf: no such file"):
        open_document(tmp_path / "missing.pdf", cache_dir=cache)


def test_pages_without_words_still_search(tmp_path: Path, cache: Path) -> None:
    (tmp_path / "n.txt").write_text("\f".join(f"{i} {i * 7} {i * 13}" for i in range(1, 9)))
    doc = open_document(tmp_path / "n.txt", cache_dir=cache)
    assert doc.num_pages == 8 and len(doc.search("the", k=3)) == 3  # dense side only
    assert len(open_document(tmp_path / "n.txt", cache_dir=cache).search("revenue", k=2)) == 2


def test_pdf_tables_are_extracted_once(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from swarmoe.docs.synthetic import generate_report

    rep = generate_report(tmp_path / "r.pdf", pages=40, seed=1)
    page = next(f.page for f in rep.facts if f.kind == "segment_table")
    first = open_document(rep.path, cache_dir=cache).tables(page)
    assert first and first[0].rows[0] == ["Segment", "Revenue", "Operating income"]

    def no_pdfplumber(*_: object) -> None:
        raise AssertionError("tables extracted again")

    monkeypatch.setattr(document_module, "pdf_tables", no_pdfplumber)
    assert open_document(rep.path, cache_dir=cache).tables(page) == first
