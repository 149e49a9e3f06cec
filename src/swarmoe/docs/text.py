"""Text utilities shared by the readers and the index: the BM25 analyser, running-header
removal, page titles, detected headings and query-focused snippets.

Everything here is plain Python so that parsing and BM25 never wait on a model.
"""

from __future__ import annotations

import re
from collections import Counter

_WORD = re.compile(r"[a-z]+|[0-9]+")
# Function words plus the instruction phrasing that questions wrap around the real ask
# ("give a response ... round to one decimal place"): they match every page equally.
_STOP = """a an the and or of to in for on by with at from as is are was were be been being it its
    this that these those what which who whom how why when where does do did has have had not no
    any all than then into per if shall will would can could should may might i you we our your
    their there here about over under between among via also such other more most so very just
    give answer question following provide response units unit round decimal place places
    please using use based basing primarily only information shown stated details outlined
    assume calculate compute help need want"""
STOPWORDS = frozenset(_STOP.split())


def stem(word: str) -> str:
    """A light suffix stripper: folds plurals and -ing/-ed forms so 'expenditures' meets
    'expenditure' without the over-stemming of a full Porter stemmer on financial terms."""
    if len(word) <= 3 or word.isdigit():
        return word
    for suffix, repl in (
        ("ies", "y"),
        ("sses", "ss"),
        ("ing", ""),
        ("ed", ""),
        ("es", "e"),
        ("s", ""),
    ):
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            if suffix == "s" and (word.endswith("ss") or word.endswith("us")):
                return word
            return word[: -len(suffix)] + repl
    return word


def analyze(text: str) -> list[str]:
    """BM25 terms: lower-cased letter runs and digit runs (so 'FY2018' meets '2018'), stemmed,
    without stopwords."""
    return [
        stem(w)
        for w in _WORD.findall(text.lower())
        if w not in STOPWORDS and (len(w) > 1 or w.isdigit())
    ]


def _shape(line: str) -> str:
    return re.sub(r"\d+", "#", line.strip().lower())


def strip_running_lines(pages: list[str]) -> list[list[str]]:
    """Each page's non-empty lines without running headers and footers: a line whose shape
    (digits folded, so 'Page 12 of 500' counts) recurs on a fifth of the pages or more carries
    no information about any one page and drowns titles in both BM25 and the embedding."""
    lines = [[ln.strip() for ln in p.splitlines() if ln.strip()] for p in pages]
    if len(pages) < 5:
        return lines
    counts: Counter[str] = Counter()
    for ls in lines:
        counts.update({_shape(ln) for ln in ls})
    limit = max(3, len(pages) // 5)
    running = {s for s, c in counts.items() if c >= limit}
    kept = [[ln for ln in ls if _shape(ln) not in running] for ls in lines]
    return [k if k else ls for k, ls in zip(kept, lines, strict=True)]  # never blank a page


def _is_texty(line: str) -> bool:
    letters = sum(c.isalpha() for c in line)
    return letters >= 3 and letters >= 0.5 * len(line)


def page_title(lines: list[str], max_lines: int = 3) -> str:
    """The first few mostly-alphabetic lines of a page: where statement names, section titles
    and headings sit in reports."""
    out = [ln for ln in lines[:12] if _is_texty(ln)][:max_lines]
    return " ".join(out)


_STRUCTURAL = re.compile(
    r"^(?:(?P<part>part\s+[ivx]+\b)|(?P<item>item\s+\d+[a-z]?\b)|(?P<note>note\s+\d+\b)"
    r"|(?P<num>\d{1,2}(?:\.\d{1,2})*\.?\s+(?-i:[A-Z])))",
    re.IGNORECASE,
)


def heading_level(line: str) -> int | None:
    """1-3 when a line reads as a heading (Part/Item/Note/numbered, or an all-capitals title
    line), None otherwise: a fallback outline for files that carry no bookmarks."""
    s = line.strip()
    m = _STRUCTURAL.match(s)
    if not 3 <= len(s) <= 90 or (s.endswith((".", ",", ";", ":")) and not m):
        return None
    letters = [c for c in s if c.isalpha()]
    if len(letters) < 4 or sum(c.isdigit() for c in s) > 0.25 * len(s):
        return None
    if m:
        if m.group("part"):
            return 1
        if m.group("num") and len(s) > 70:
            return None
        return 2 if m.group("item") else 3
    if (
        sum(c.isupper() for c in letters) >= 0.9 * len(letters)
        and len(letters) >= 6
        and len(s.split()) <= 12
    ):
        return 3
    return None


def detect_headings(
    pages_lines: list[list[str]], max_per_page: int = 8
) -> list[tuple[str, int, int]]:
    """(title, page, level) for heading-like lines; pages with more candidates than
    `max_per_page` are tables of contents or tables, whose lines are not where sections start."""
    out: list[tuple[str, int, int]] = []
    for page, lines in enumerate(pages_lines):
        found = [(ln, lvl) for ln in lines if (lvl := heading_level(ln)) is not None]
        if len(found) > max_per_page:
            continue
        for ln, lvl in found:
            title = " ".join(ln.split())
            if out and out[-1][0].lower() == title.lower():
                continue  # a statement continued on the next page repeats its title
            out.append((title, page, lvl))
    return out


def snippet(text: str, terms: set[str], width: int = 6, max_chars: int = 700) -> str:
    """The window of `width` lines of a page that holds the most distinct query terms: what a
    reader (or an agent) needs to judge a hit without reading the whole page."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        return ""
    sets = [set(analyze(ln)) & terms for ln in lines]
    best, best_start = -1, 0
    for start in range(max(1, len(lines) - width + 1)):
        covered = set().union(*sets[start : start + width])
        if len(covered) > best:
            best, best_start = len(covered), start
    out = "\n".join(lines[best_start : best_start + width])
    return out if len(out) <= max_chars else out[: max_chars - 1] + "…"
