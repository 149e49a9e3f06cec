"""A searchable page collection built from a table: where a wide-search agent looks facts up.

Each entity's facts are written out as prose (several sentence and title templates, seeded),
on one page or spread over two. Distractor pages make lookup real: a near-miss name for each
entity ("New Velmora", "Velmorra") stating other values, and pages about invented entities
that read like the real ones. Ids are short (`p017`) and carry no order: pages are shuffled.

Search reuses the document layer's hybrid index (BM25 + dense page leads, `docs/index.py`);
results are one line per page, `ID | title | best sentence`, short and regular so that a small
model reads them as easily as a large one.
"""

from __future__ import annotations

import random
import re
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from swarmoe.swarm.tools import Tool, ToolError, tool
from swarmoe.tasks.grading import normalize_value
from swarmoe.tasks.tables import Table, invent_word, name_key

SEARCH_K = 5
SNIPPET_CHARS = 160


@dataclass(frozen=True)
class Page:
    id: str
    title: str
    body: str
    """One sentence per line."""
    about: str
    """The entity the page describes (a table entity or an invented one)."""
    kind: str
    """'entity' (a page of the truth), 'near_miss' or 'invented' (distractors)."""

    def render(self) -> str:
        """The page as `open_page` shows it."""
        return f"[{self.id}] {self.title}\n{self.body}"


@dataclass
class Corpus:
    """The pages of one task, with search built on first use (thread-safe: tools run on the
    swarm's thread pool)."""

    pages: list[Page]
    _index: Any = field(default=None, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def __post_init__(self) -> None:
        self.by_id = {p.id: p for p in self.pages}

    def _search_index(self) -> Any:
        with self._lock:
            if self._index is None:
                from swarmoe.docs.index import HybridIndex

                self._index = HybridIndex.build([f"{p.title}\n{p.body}" for p in self.pages])
            return self._index

    def search(self, query: str, k: int = SEARCH_K) -> list[tuple[Page, str]]:
        """The `k` best pages for `query`, each with its sentence that best matches it."""
        from swarmoe.docs.text import analyze, snippet

        if not query.strip():
            return []
        terms = set(analyze(query))
        out = []
        for hit in self._search_index().search(query, k):
            page = self.pages[hit.page]
            # The title is shown anyway: the sentence should match the rest of the query.
            focus = terms - set(analyze(page.title)) or terms
            out.append((page, snippet(page.body, focus, width=1, max_chars=SNIPPET_CHARS)))
        return out

    def page(self, page_id: str) -> Page:
        """The page called `page_id`; tolerant of case, brackets and a bare number ('17')."""
        key = page_id.strip().strip("[]").strip().lower()
        if key.isdigit():
            width = len(self.pages[0].id) - 1
            key = f"p{int(key):0{width}d}"
        found = self.by_id.get(key)
        if found is None:
            raise ToolError(f"no page {page_id!r}; page ids look like {self.pages[0].id} and "
                            f"come from search results")
        return found

    def tools(self) -> list[Tool]:
        """`search` and `open_page` as swarm tools over this corpus."""

        def search(query: str) -> str:
            """Search the pages. Returns up to 5 lines `PAGE_ID | title | best sentence`, best
            match first.

            Args:
                query: words to look for, such as a name and an attribute
            """
            if not query.strip():
                raise ToolError("the query is empty")
            hits = self.search(query)
            if not hits:
                return "no pages match"
            return "\n".join(f"{p.id} | {p.title} | {s.replace(chr(10), ' ')}" for p, s in hits)

        def open_page(page_id: str) -> str:
            """Read one page in full.

            Args:
                page_id: a page id from the search results, like p012
            """
            return self.page(page_id).render()

        return [tool(search), tool(open_page)]


# -- writing pages --------------------------------------------------------------------------------

_FIRST_TITLES = ("{e}", "{e}: overview", "{e} - profile", "About {e}", "{e} (register entry)",
                 "Notes on {e}")
_SECOND_TITLES = ("{e}: further details", "{e} - history and records", "More about {e}",
                  "{e}: key figures")
_INTROS = ("This page collects what the register holds on {e}.",
           "The following notes concern {e}.",
           "{e} appears in several regional records.",
           "What follows is a short account of {e}.")
_NEAR_MISS_INTROS = ("{e} is not to be confused with {other}.",
                     "{e} is a separate entry from {other}.")
_NAMED = ("The {a} of {e} is {v}.",
          "{e}'s {a} is {v}.",
          "For {e}, the {a} is given as {v}.",
          "Records give {v} as the {a} of {e}.",
          "{e} has {v} listed under {a}.",
          "According to the register, the {a} of {e} is {v}.")
_PRONOUN = ("Its {a} is {v}.", "The {a} is recorded as {v}.", "Its {a}: {v}.")
_FILLERS = ("Figures were checked against earlier editions.",
            "Some entries were revised after later surveys.",
            "Other sources give broadly similar details.",
            "Local archives hold further material.",
            "The entry was last reviewed by the editors this year.")
_NEAR_MISS_WORDS = (("New", ""), ("North", ""), ("Upper", ""), ("Little", ""), ("", "Minor"),
                    ("", "Heights"), ("", "Junction"), ("", "II"), ("Old", ""), ("", "Vale"))


def _phrase(attribute: str) -> str:
    """The attribute as it reads inside a sentence: 'Founding Year' -> 'founding year', while
    'CEO' or 'GDP (USD)' keep their capitals."""
    return " ".join(w.lower() if w[:1].isupper() and w[1:].islower() else w
                    for w in attribute.split())


def _display(rng: random.Random, value: str) -> str:
    """A value as a page may print it: large whole numbers with or without thousands commas."""
    if re.fullmatch(r"[1-9]\d{4,}", value) and rng.random() < 0.5:
        return f"{int(value):,}"
    if re.fullmatch(r"[1-9]\d{0,2}(?:,\d{3})+", value) and rng.random() < 0.5:
        return value.replace(",", "")
    return value


def _lookalike(rng: random.Random, model: str) -> str:
    """An invented name shaped like `model`: its longest word replaced by a made-up one, so
    'Thistbu Gallery' gives 'Groxsto Gallery' and 'Lyon' gives 'Drevast'."""
    words = model.split()
    i = max(range(len(words)), key=lambda j: len(words[j]))
    word = invent_word(rng)
    words[i] = word.upper() if words[i].isupper() and len(words[i]) > 1 else word
    return " ".join(words)


def _near_miss(rng: random.Random, name: str, taken: set[str]) -> str | None:
    """A name that a careless reader takes for `name`: a word added or one letter changed."""
    for _ in range(20):
        if rng.random() < 0.6:
            before, after = rng.choice(_NEAR_MISS_WORDS)
            candidate = " ".join(w for w in (before, name, after) if w)
        else:
            letters = [i for i, c in enumerate(name) if c.isalpha() and i > 0]
            if not letters:
                continue
            i = rng.choice(letters)
            candidate = name[:i] + name[i] + name[i:] if rng.random() < 0.5 else (
                name[:i] + name[i + 1:])
        if name_key(candidate) and name_key(candidate) not in taken:
            return candidate
    return None


_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def distinct_values(column: Sequence[str]) -> dict[str, str]:
    """A column's values by normalised form, first spelling kept: what `_decoy` draws from."""
    out: dict[str, str] = {}
    for v in column:
        out.setdefault(normalize_value(v), v)
    return out


def _decoy(rng: random.Random, value: str, column: Mapping[str, str]) -> str | None:
    """Another plausible value for a column (`distinct_values`), different from `value`: another
    value of the column, or the number moved a little (a year by a few years). None if there is
    none."""
    own = normalize_value(value)
    others = [v for k, v in column.items() if k != own]
    plain = value.replace(",", "")
    if _NUMBER.fullmatch(plain) and (not others or rng.random() < 0.5):
        places = len(plain.partition(".")[2])
        x = float(plain)
        year = places == 0 and 1000 <= x <= 2100
        for _ in range(10):
            step = rng.randint(1, 25) if year else abs(x) * rng.uniform(0.03, 0.3)
            y = x + rng.choice((-1, 1)) * max(step, 10.0 ** -places)
            if not year and x >= 0:
                y = abs(y)
            moved = f"{y:.{places}f}"
            if normalize_value(moved) != own:
                return f"{int(moved):,}" if "," in value and places == 0 else moved
    return rng.choice(others) if others else None


def _sentences(rng: random.Random, name: str, facts: Sequence[tuple[str, str]]) -> list[str]:
    lines = []
    for i, (attribute, value) in enumerate(facts):
        templates = _NAMED if i == 0 or rng.random() < 0.7 else _PRONOUN
        lines.append(rng.choice(templates).format(e=name, a=_phrase(attribute),
                                                  v=_display(rng, value)))
    for _ in range(rng.randint(0, 2)):
        lines.insert(rng.randint(1, len(lines)), rng.choice(_FILLERS))
    return lines


def _pages_for(rng: random.Random, name: str, facts: list[tuple[str, str]], kind: str,
               intro: str | None = None) -> list[tuple[str, str, str, str]]:
    """(title, body, about, kind) drafts for one entity: facts shuffled, on one or two pages;
    `intro` (a finished sentence) replaces the random first line."""
    facts = facts[:]
    rng.shuffle(facts)
    split = rng.randint(1, len(facts) - 1) if len(facts) > 1 and rng.random() < 0.5 else len(facts)
    drafts = []
    for part, titles in ((facts[:split], _FIRST_TITLES), (facts[split:], _SECOND_TITLES)):
        if not part:
            continue
        lines = [intro or rng.choice(_INTROS).format(e=name)] if titles is _FIRST_TITLES else []
        lines += _sentences(rng, name, part)
        drafts.append((rng.choice(titles).format(e=name), "\n".join(lines), name, kind))
    return drafts


def build_corpus(table: Table, entities: Sequence[str], seed: int,
                 invented: int | None = None) -> Corpus:
    """The pages for a task over `entities` of `table`: every known fact of each entity (all the
    table's columns, not only those asked), a near-miss distractor per entity, and `invented`
    distractor entities (default: as many as there are entities)."""
    rng = random.Random(f"widesearch-corpus:{seed}")
    taken = {name_key(e) for e in table.rows}
    columns = {a: distinct_values(table.column(a)) for a in table.attributes}
    drafts: list[tuple[str, str, str, str]] = []
    for entity in entities:
        facts = [(a, v) for a, v in table.rows[entity].items() if v]
        if facts:
            drafts += _pages_for(rng, entity, facts, "entity")
        other = _near_miss(rng, entity, taken)
        if other is None:
            continue
        taken.add(name_key(other))
        decoys = [(a, d) for a, v in facts if (d := _decoy(rng, v, columns[a])) is not None]
        if decoys:
            intro = rng.choice(_NEAR_MISS_INTROS).format(e=other, other=entity)
            drafts += _pages_for(rng, other, decoys, "near_miss", intro)
    for _ in range(len(entities) if invented is None else invented):
        name = _lookalike(rng, rng.choice(list(table.rows)))
        if name_key(name) in taken:
            continue
        taken.add(name_key(name))
        facts = [(a, rng.choice(list(col.values()))) for a in table.attributes
                 if (col := columns[a])]
        if facts:
            drafts += _pages_for(rng, name, facts, "invented")
    rng.shuffle(drafts)
    width = max(3, len(str(len(drafts))))
    return Corpus([Page(f"p{i:0{width}d}", title, body, about, kind)
                   for i, (title, body, about, kind) in enumerate(drafts, 1)])
