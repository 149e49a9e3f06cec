"""Tables of entities x attributes: read from CSV, or invented from a seed.

A `Table` is the ground truth of a wide-search task: column 1 names the entities, the other
columns are attributes. `random_table` invents entity names, attribute names and values (years,
counts, measures, cities, people, codes, categories, percentages, dates), so a curriculum can
draw unlimited tasks no model has seen, whose answers cannot come from memory.
"""

from __future__ import annotations

import csv
import io
import os
import random
import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


class TableError(ValueError):
    """A table that cannot be used; the message says which row or column is wrong."""


def fold(text: str) -> str:
    """Case-folded, accents dropped, NFKC: the form in which two spellings of one name meet."""
    decomposed = unicodedata.normalize("NFKD", text)
    plain = "".join(c for c in decomposed if not unicodedata.combining(c))
    return unicodedata.normalize("NFKC", plain).casefold()


def name_key(name: str) -> str:
    """Letters and digits of a folded name: `Head-office City` and `head office city` agree."""
    return re.sub(r"[^0-9a-z]+", "", fold(name))


@dataclass
class Table:
    """Ground truth: `rows[entity][attribute] -> value`, in table order. An empty value means
    the table does not know that fact; tasks only ask for cells that have one."""

    entity_column: str
    attributes: list[str]
    rows: dict[str, dict[str, str]]

    def column(self, attribute: str) -> list[str]:
        """The attribute's non-empty values over all rows, in row order."""
        return [r[attribute] for r in self.rows.values() if r.get(attribute)]

    def to_csv(self) -> str:
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow([self.entity_column, *self.attributes])
        for entity, values in self.rows.items():
            writer.writerow([entity, *(values.get(a, "") for a in self.attributes)])
        return out.getvalue()


def parse_csv(text: str, source: str = "table") -> Table:
    """A `Table` from CSV text: header row first, entity names in column 1. Raises TableError
    naming the row or column for a missing header, unnamed or repeated columns, rows of the wrong
    width, and empty or repeated entity names."""
    rows = [r for r in csv.reader(io.StringIO(text.lstrip("\ufeff"))) if any(c.strip() for c in r)]
    if not rows:
        raise TableError(f"{source}: the CSV is empty")
    header = [c.strip() for c in rows[0]]
    if len(header) < 2:
        raise TableError(f"{source}: the header needs an entity column and at least one "
                         f"attribute column, got {header}")
    seen: dict[str, str] = {}
    for i, name in enumerate(header, 1):
        if not name_key(name):
            raise TableError(f"{source}: column {i} of the header has no name")
        if name_key(name) in seen:
            raise TableError(f"{source}: columns {seen[name_key(name)]!r} and {name!r} have the "
                             f"same name")
        seen[name_key(name)] = name
    if len(rows) < 2:
        raise TableError(f"{source}: the CSV has a header but no rows")
    table = Table(header[0], header[1:], {})
    entities: dict[str, str] = {}
    for line, row in enumerate(rows[1:], 2):
        cells = [c.strip() for c in row]
        if len(cells) != len(header):
            raise TableError(f"{source}: row {line} has {len(cells)} cells, the header has "
                             f"{len(header)}")
        entity = cells[0]
        if not name_key(entity):
            raise TableError(f"{source}: row {line} has no entity name in column 1")
        if name_key(entity) in entities:
            raise TableError(f"{source}: row {line} repeats the entity {entity!r} "
                             f"(as {entities[name_key(entity)]!r})")
        entities[name_key(entity)] = entity
        table.rows[entity] = dict(zip(header[1:], cells[1:], strict=True))
    return table


def read_table(path: str | os.PathLike[str]) -> Table:
    """`parse_csv` of a file (UTF-8, with or without a byte-order mark)."""
    p = Path(path)
    if not p.is_file():
        raise TableError(f"{p}: no such file" if not p.exists() else f"{p}: not a regular file")
    try:
        text = p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise TableError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    return parse_csv(text, str(p))


# -- invented names -----------------------------------------------------------------------------

_ONSETS = ("b", "br", "c", "d", "dr", "f", "g", "gr", "h", "k", "kr", "l", "m", "n", "p", "pr",
           "qu", "r", "s", "st", "t", "th", "tr", "v", "w", "z", "sh", "ch")
_VOWELS = ("a", "e", "i", "o", "u", "a", "e", "o", "ae", "ai", "ou", "ei")
_CODAS = ("", "", "", "n", "r", "l", "s", "th", "nd", "rk", "m", "x", "st", "v")


def invent_word(rng: random.Random, syllables: int | None = None) -> str:
    """A pronounceable made-up word such as `Dravenmor`: names no model can know."""
    n = syllables or rng.choice((2, 2, 2, 3))
    parts = [rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(n)]
    return "".join(parts).capitalize()


_ENTITY_KINDS = (
    ("company", ("Works", "Holdings", "Labs", "Foundry", "Trading", "Group")),
    ("observatory", ("Observatory",)),
    ("village", ("",)),
    ("society", ("Society", "Guild", "Circle")),
    ("festival", ("Festival", "Fair")),
    ("river", ("", "River")),
    ("brewery", ("Brewery", "Brewing")),
    ("school", ("Academy", "College", "School")),
    ("vessel", ("",)),
    ("museum", ("Museum", "Gallery")),
)


def _city(rng: random.Random) -> str:
    word = invent_word(rng, 2)
    form = rng.randrange(4)
    if form == 0:
        return f"Port {word}"
    if form == 1:
        return f"{word} Falls"
    return word + rng.choice(("ford", "ton", "haven", "mouth", "by", "wick", "stead", ""))


def _person(rng: random.Random) -> str:
    return f"{invent_word(rng, 2)} {invent_word(rng)}"


def _count_gen(rng: random.Random, _name: str) -> Callable[[random.Random], str]:
    lo, hi = rng.choice(((10, 999), (100, 9999), (1000, 99999), (10000, 2_000_000)))
    return lambda r: str(r.randint(lo, hi))


def _measure_gen(rng: random.Random, _name: str) -> Callable[[random.Random], str]:
    hi, places = rng.choice(((10.0, 2), (100.0, 1), (1000.0, 1), (5000.0, 0)))
    return lambda r: f"{r.uniform(hi / 50, hi):.{places}f}"


_MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August",
           "September", "October", "November", "December")
_CATEGORIES = {
    "primary colour": ("red", "blue", "green", "amber", "violet", "grey", "white", "ochre"),
    "main material": ("granite", "oak", "steel", "basalt", "brick", "glass", "limestone"),
    "status": ("active", "dormant", "closed", "merged", "restored", "planned"),
    "grade": ("A", "A-", "B+", "B", "C", "D"),
    "climate zone": ("arid", "temperate", "alpine", "coastal", "tropical", "subarctic"),
    "main product": ("copper wire", "rope", "barley", "glassware", "paper", "tiles", "cheese"),
}
_NOUNS = ("lanterns", "wells", "looms", "bridges", "kilns", "docks", "orchards", "towers")

ValueGen = Callable[[random.Random], str]
# Attribute kind -> (name pool, factory(rng, base name) of one column's value generator).
_ATTRIBUTE_KINDS: dict[str, tuple[tuple[str, ...], Callable[[random.Random, str], ValueGen]]] = {
    "year": (("founding year", "year opened", "charter year", "first survey year",
              "year of renovation", "launch year", "merger year", "year listed"),
             lambda rng, _: lambda r: str(r.randint(1720, 2024))),
    "count": (("staff count", "member count", "number of branches", "seat capacity",
               "annual visitors", "fleet size", *(f"number of {n}" for n in _NOUNS)), _count_gen),
    "measure": (("length (km)", "area (sq km)", "peak height (m)", "average depth (m)",
                 "annual budget (million)", "distance to coast (km)", "rating out of 10"),
                _measure_gen),
    "city": (("head office city", "home port", "city of origin", "regional seat", "host city",
              "twin town"), lambda rng, _: _city),
    "person": (("founder", "director", "chief engineer", "curator", "head coach", "patron",
                "first captain", "chairperson", "architect"), lambda rng, _: _person),
    "code": (("registry code", "licence number", "catalogue id", "station code"),
             lambda rng, _: lambda r: f"{invent_word(r, 1)[:2].upper()}-{r.randint(1000, 9999)}"),
    "category": (tuple(_CATEGORIES), lambda rng, base: lambda r: r.choice(_CATEGORIES[base])),
    "percent": (("market share", "approval rate", "occupancy rate", "forest cover"),
                lambda rng, _: lambda r: f"{r.uniform(1, 99):.1f}%"),
    "date": (("opening date", "founding date", "last inspection date"),
             lambda rng, _: lambda r: f"{r.randint(1, 28)} {r.choice(_MONTHS)} "
                                   f"{r.randint(1800, 2024)}"),
}
_QUALIFIERS = ("original", "current", "recorded", "official", "first", "main", "regional")


def random_table(seed: int, entities: int, attributes: int) -> Table:
    """A seeded table of `entities` invented entities x `attributes` invented attributes with
    values of varied kinds; the same seed gives the same table, another seed another one."""
    if entities < 1 or attributes < 1:
        raise ValueError(f"a table needs at least one entity and one attribute, got "
                         f"entities={entities}, attributes={attributes}")
    rng = random.Random(f"widesearch-table:{seed}")
    kind, suffixes = rng.choice(_ENTITY_KINDS)
    names: list[str] = []
    keys: set[str] = set()
    while len(names) < entities:
        suffix = rng.choice(suffixes)
        name = f"{invent_word(rng)} {suffix}".strip()
        if name_key(name) not in keys:
            keys.add(name_key(name))
            names.append(name)
    columns: list[tuple[str, ValueGen, bool]] = []
    used = {name_key(kind)}
    for _ in range(attributes):
        for attempt in range(1000):
            kind_name = rng.choice(list(_ATTRIBUTE_KINDS))
            pool, factory = _ATTRIBUTE_KINDS[kind_name]
            base = rng.choice(pool)
            name = base if attempt < 20 and rng.random() < 0.6 else (
                f"{rng.choice(_QUALIFIERS)} {base}")
            if name_key(name) not in used:
                break
        else:
            raise ValueError(f"cannot invent {attributes} distinct attribute names")
        used.add(name_key(name))
        columns.append((name, factory(rng, base), kind_name != "category"))
    rows: dict[str, dict[str, str]] = {n: {} for n in names}
    for name, gen, distinct in columns:
        seen: set[str] = set()
        for entity in names:
            value = gen(rng)
            for _ in range(50):
                if not distinct or value not in seen:
                    break
                value = gen(rng)
            seen.add(value)
            rows[entity][name] = value
    return Table(kind, [c[0] for c in columns], rows)

