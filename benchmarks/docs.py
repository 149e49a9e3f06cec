"""Document search and ingestion on FinanceBench filings, against plain pypdf + BM25.

For every question with evidence pages, ranks the pages of its filing with
`Document.search(question)` and with the plain peer (pypdf text per page, bm25s with its
default English analyser, nothing else), both in this run, and reports recall@1/5/10 of the
evidence page (a hit when any evidence page is within the top k). Ingestion is timed cold (a
fresh cache) per filing and on one 500-page PDF assembled from the filings' own pages, next to
the peer's pypdf parse of the same file.

The questions are split by filing into `dev` (even positions in name order) and `test`; search
settings were chosen on `dev` and on synthetic reports only, so `test` is the honest figure.
The data stays where it is: pass its folder, nothing is copied into the repository.

    .venv/bin/python benchmarks/docs.py [DATA_DIR]     # default ../shared/data/financebench

Prints a table and one JSON line, also appended to benchmarks/results/docs.jsonl.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from record import report

REPO = Path(__file__).resolve().parent.parent
KS = (1, 5, 10)


def plain_pages(path: Path) -> list[str]:
    from pypdf import PdfReader

    return [p.extract_text() or "" for p in PdfReader(path).pages]


def plain_ranking(pages: list[str], question: str) -> list[int]:
    import bm25s

    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize(pages, stopwords="en", show_progress=False), show_progress=False)
    query = bm25s.tokenize([question], stopwords="en", show_progress=False, return_ids=False)[0]
    scores = retriever.get_scores(query) if query else np.zeros(len(pages))
    return [int(i) for i in np.argsort(-np.asarray(scores), kind="stable")]


def recall(ranks: list[int]) -> dict[str, float]:
    n = max(len(ranks), 1)
    return {f"@{k}": round(sum(r < k for r in ranks) / n, 3) for k in KS}


def build_500(pdfs: list[Path], out: Path) -> int:
    """A 500-page PDF made of the filings' pages in turn (real layouts, real text)."""
    from pypdf import PdfReader, PdfWriter

    writer = PdfWriter()
    readers = [PdfReader(p) for p in pdfs]
    i = 0
    while len(writer.pages) < 500:
        r = readers[i % len(readers)]
        start = (i // len(readers)) * 40
        for page in r.pages[start : start + 40]:
            if len(writer.pages) < 500:
                writer.add_page(page)
        i += 1
    with out.open("wb") as f:
        writer.write(f)
    return len(writer.pages)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "data", nargs="?", default=str(REPO / ".." / "shared" / "data" / "financebench")
    )
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "docs.jsonl"))
    args = ap.parse_args()
    data = Path(args.data).resolve()
    qfile = data / "questions.jsonl"
    if not qfile.is_file():
        sys.exit(f"no FinanceBench sample at {data} (expected questions.jsonl and pdfs/)")

    sys.path.insert(0, str(REPO / "src"))
    from swarmoe.docs import open_document

    questions = [json.loads(line) for line in qfile.read_text().splitlines() if line.strip()]
    questions = [
        q
        for q in questions
        if q.get("evidence") and (data / "pdfs" / f"{q['doc_name']}.pdf").is_file()
    ]
    names = sorted({q["doc_name"] for q in questions})
    cache = Path(tempfile.mkdtemp(prefix="swarmoe-bench-docs-"))

    docs, plain, t_ours, t_plain, n_pages = {}, {}, 0.0, 0.0, 0
    for name in names:
        path = data / "pdfs" / f"{name}.pdf"
        t0 = time.perf_counter()
        plain[name] = plain_pages(path)
        t_plain += time.perf_counter() - t0
        t0 = time.perf_counter()
        docs[name] = open_document(path, cache_dir=cache)
        t_ours += time.perf_counter() - t0
        n_pages += docs[name].num_pages

    ranks: dict[str, dict[str, list[int]]] = {
        s: {"ours": [], "plain": []} for s in ("all", "dev", "test")
    }
    t_search = 0.0
    for q in questions:
        gold = {e["evidence_page_num"] for e in q["evidence"]}
        t0 = time.perf_counter()
        ours = [
            h.page
            for h in docs[q["doc_name"]].search(q["question"], k=docs[q["doc_name"]].num_pages)
        ]
        t_search += time.perf_counter() - t0
        base = plain_ranking(plain[q["doc_name"]], q["question"])
        split = "dev" if names.index(q["doc_name"]) % 2 == 0 else "test"
        for s in ("all", split):
            ranks[s]["ours"].append(min((ours.index(p) for p in gold if p in ours), default=10**6))
            ranks[s]["plain"].append(min(base.index(p) for p in gold))

    big = cache / "five-hundred.pdf"
    pages_500 = build_500([data / "pdfs" / f"{n}.pdf" for n in names], big)
    t0 = time.perf_counter()
    plain_pages(big)
    plain_500 = time.perf_counter() - t0
    t0 = time.perf_counter()
    open_document(big, cache_dir=cache / "fresh")
    ours_500 = time.perf_counter() - t0
    # the same in a new process: imports, torch and the model load included
    code = "import sys; from swarmoe.docs import open_document; open_document(sys.argv[1], cache_dir=sys.argv[2])"
    t0 = time.perf_counter()
    subprocess.run(
        [sys.executable, "-c", code, str(big), str(cache / "fresh2")],
        check=True,
        env={**os.environ, "PYTHONPATH": str(REPO / "src")},
    )
    ours_500_cold = time.perf_counter() - t0

    result = {
        "benchmark": "docs",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "questions": {s: len(r["ours"]) for s, r in ranks.items()},
        "filings": len(names),
        "recall": {s: {who: recall(r[who]) for who in ("ours", "plain")} for s, r in ranks.items()},
        "ingest_pages_per_s": {
            "ours": round(n_pages / t_ours, 1),
            "plain_pypdf": round(n_pages / t_plain, 1),
        },
        "ingest_500_pages_s": {
            "ours": round(ours_500, 2),
            "ours_new_process": round(ours_500_cold, 2),
            "plain_pypdf_parse_only": round(plain_500, 2),
            "pages": pages_500,
        },
        "search_ms_per_query": round(1000 * t_search / len(questions), 1),
        "cpus": os.cpu_count(),
    }
    print(f"{'split':6} {'n':>4}  {'ours @1/@5/@10':>18}  {'plain @1/@5/@10':>18}")
    for s, r in result["recall"].items():
        fmt = lambda d: " ".join(f"{v:.2f}" for v in d.values())  # noqa: E731
        print(f"{s:6} {result['questions'][s]:>4}  {fmt(r['ours']):>18}  {fmt(r['plain']):>18}")
    ing = result["ingest_pages_per_s"]
    print(
        f"ingest (parse+index, cold): ours {ing['ours']} pages/s, plain pypdf parse {ing['plain_pypdf']} pages/s"
    )
    i5 = result["ingest_500_pages_s"]
    print(
        f"500-page PDF: ours {i5['ours']} s (parse+BM25+dense; {i5['ours_new_process']} s in a new process), "
        f"plain pypdf parse {i5['plain_pypdf_parse_only']} s"
    )
    print(f"search: {result['search_ms_per_query']} ms/query")
    report(result, args.out)


if __name__ == "__main__":
    main()
