"""A synthetic annual report (PDF, reportlab) with facts planted at known pages.

Tests and demos need a long document whose answers are known: this one has sections with
bookmarks, running headers and footers, filler prose, and planted figures, segment tables and
risk statements, each on its own page. The same seed gives the same bytes-for-content report
and the same facts, so a test can ask where a fact is and check the answer.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path

SECTIONS = (
    ("Letter to Shareholders", 0.03),
    ("Business Overview", 0.10),
    ("Segment Review", 0.15),
    ("Management's Discussion and Analysis", 0.17),
    ("Risk Factors", 0.12),
    ("Financial Statements", 0.10),
    ("Notes to the Financial Statements", 0.20),
    ("Corporate Governance", 0.08),
    ("Sustainability", 0.05),
)

SEGMENT_NAMES = (
    "Aurora",
    "Borealis",
    "Cascade",
    "Dunmore",
    "Everfield",
    "Fjordline",
    "Glenhaven",
    "Halcyon",
    "Ironbridge",
    "Juniper",
    "Kestrel",
    "Lumen",
    "Meridian",
    "Northgate",
    "Oakridge",
    "Pinecrest",
)

# (label, template, question): {v} is the figure; the question paraphrases the printed line.
FIGURES = (
    (
        "capex",
        "Capital expenditures totaled ${v} million, mainly for new distribution hubs.",
        "How much did the company spend on capital expenditures?",
    ),
    (
        "rnd",
        "Research and development spending reached ${v} million for the year.",
        "What was research and development expense?",
    ),
    (
        "fcf",
        "Free cash flow for the year was ${v} million after investment in facilities.",
        "What free cash flow did the company generate?",
    ),
    (
        "dividend",
        "The board declared a final dividend of ${v} per ordinary share.",
        "What dividend per share was declared?",
    ),
    (
        "headcount",
        "The group employed {v} people at the end of the financial year.",
        "How many people did the group employ?",
    ),
    (
        "debt",
        "Net debt stood at ${v} million at the balance sheet date.",
        "What was the net debt position?",
    ),
    (
        "tax",
        "The effective tax rate was {v} percent, reflecting the regional mix of profits.",
        "What was the effective tax rate?",
    ),
    (
        "buyback",
        "Share repurchases returned ${v} million to shareholders during the year.",
        "How much was spent on share buybacks?",
    ),
)

RISKS = (
    (
        "cyber",
        "A cyber attack on the {n} billing platform could interrupt invoicing for several weeks.",
        "cyber attack on the billing platform",
    ),
    (
        "supplier",
        "Dependence on a single supplier of {n} sensor modules could halt assembly lines.",
        "dependence on a single supplier",
    ),
    (
        "currency",
        "Fluctuations in the {n} currency corridor could reduce reported earnings.",
        "foreign currency fluctuations affecting earnings",
    ),
    (
        "regulation",
        "New emissions regulation affecting the {n} plants could require costly upgrades.",
        "emissions regulation at the plants",
    ),
    (
        "climate",
        "Flooding near the {n} warehouses could destroy inventory and delay shipments.",
        "flooding risk to warehouses and inventory",
    ),
    (
        "talent",
        "Loss of key engineers in the {n} design centre could delay product launches.",
        "loss of key engineering staff",
    ),
    (
        "litigation",
        "A class action concerning {n} product labelling could lead to material damages.",
        "class action litigation over product labelling",
    ),
    (
        "pension",
        "A deficit in the {n} pension scheme could require additional cash contributions.",
        "pension scheme deficit",
    ),
)

_SUBJECTS = (
    "The group",
    "Management",
    "The board",
    "Our regional teams",
    "The company",
    "Each business unit",
    "The finance function",
    "Our operations",
)
_VERBS = (
    "continued to focus on",
    "made steady progress in",
    "reviewed",
    "invested in",
    "strengthened",
    "monitored",
    "expanded",
    "simplified",
)
_OBJECTS = (
    "operational efficiency",
    "customer service standards",
    "working practices",
    "internal controls",
    "its supply chain",
    "digital tools for staff",
    "quality assurance",
    "procurement processes",
    "training programmes",
    "its property portfolio",
)
_TAILS = (
    "across all regions.",
    "during the period under review.",
    "in line with the strategy set out last year.",
    "with support from external advisers.",
    "while keeping costs under control.",
    "as part of a multi-year programme.",
    "in close cooperation with local partners.",
    "following feedback from stakeholders.",
)


@dataclass(frozen=True)
class PlantedFact:
    """A fact printed on one page: what it is, where (0-indexed), the printed text, a question
    that should find it, and the key value an answer must contain."""

    label: str
    kind: str  # "figure" | "segment_table" | "risk"
    page: int
    text: str
    query: str
    value: str


@dataclass(frozen=True)
class SyntheticReport:
    path: Path
    num_pages: int
    company: str
    facts: list[PlantedFact]
    sections: list[tuple[str, int, int]] = field(default_factory=list)  # title, first, last page


def _sentence(rng: random.Random) -> str:
    return (
        f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_TAILS)}"
    )


def _section_bounds(pages: int) -> list[tuple[str, int, int]]:
    """Sections after the cover and contents pages, sized by their shares of the body."""
    body = pages - 2
    out, first, cum = [], 2, 0.0
    for i, (title, share) in enumerate(SECTIONS):
        cum += share
        last = pages - 1 if i == len(SECTIONS) - 1 else max(first, 2 + round(body * cum) - 1)
        out.append((title, first, last))
        first = last + 1
    return out


def _plan(pages: int, seed: int) -> tuple[list[tuple[str, int, int]], dict[int, PlantedFact]]:
    rng = random.Random(seed)
    sections = _section_bounds(pages)
    by_title = {t: (a, b) for t, a, b in sections}
    n_each = max(1, (pages // 10) // 3)
    taken: set[int] = set()

    def pick(title: str) -> int:
        a, b = by_title[title]
        free = [p for p in range(a + 1, b + 1) if p not in taken] or [
            p for p in range(a, b + 1) if p not in taken
        ]
        if not free:
            free = [p for p in range(2, pages) if p not in taken]
        page = rng.choice(free)
        taken.add(page)
        return page

    facts: dict[int, PlantedFact] = {}
    segments = list(SEGMENT_NAMES)
    rng.shuffle(segments)
    for i in range(n_each):
        label, template, question = FIGURES[i % len(FIGURES)]
        year = 2024 - i // len(FIGURES)
        v = (
            f"{rng.randint(10, 4000)}"
            if label == "headcount"
            else f"{rng.randint(100, 9999) / 10:,.1f}"
        )
        if label == "headcount":
            v = f"{int(v) * 10:,}"
        elif label == "dividend":
            v = f"{rng.randint(10, 300) / 100:.2f}"
        elif label == "tax":
            v = f"{rng.randint(150, 320) / 10:.1f}"
        text = f"In fiscal {year}: " + template.format(v=v)
        page = pick("Management's Discussion and Analysis" if i % 2 else "Financial Statements")
        facts[page] = PlantedFact(
            f"{label}-{year}", "figure", page, text, f"{question} (fiscal {year})", v
        )
    pairs = list(combinations(segments, 2))
    rng.shuffle(pairs)
    for i in range(n_each):
        names = [*pairs[i], "Corporate"]  # each named pair is printed on one table only
        year = 2024 - i
        rows = [[n, f"{rng.randint(500, 9000):,}", f"{rng.randint(20, 900):,}"] for n in names]
        text = f"Segment results for fiscal {year} (in $ millions): " + "; ".join(
            f"{r[0]} revenue {r[1]}, operating income {r[2]}" for r in rows
        )
        page = pick("Segment Review")
        facts[page] = PlantedFact(
            f"segments-{year}",
            "segment_table",
            page,
            text,
            f"Compare revenue and operating income of the {names[0]} and {names[1]} segments in fiscal {year}",
            rows[0][1],
        )
    for i in range(n_each):
        label, template, question = RISKS[i % len(RISKS)]
        name = segments[(i + 5) % len(segments)] + (
            f" {i // len(RISKS) + 1}" if i >= len(RISKS) else ""
        )
        text = "Risk: " + template.format(n=name)
        page = pick("Risk Factors")
        facts[page] = PlantedFact(
            f"risk-{label}-{i}",
            "risk",
            page,
            text,
            f"What is the risk of {question} ({name})?",
            name,
        )
    return sections, facts


def generate_report(
    path: str | Path, pages: int = 500, seed: int = 0, company: str = "Northwind Holdings"
) -> SyntheticReport:
    """Write a `pages`-page annual report PDF to `path`; return it with its planted facts."""
    from reportlab.lib.pagesizes import A4
    from reportlab.pdfgen import canvas

    if pages < 30:
        raise ValueError("a synthetic report needs at least 30 pages")
    path = Path(path)
    sections, facts = _plan(pages, seed)
    rng = random.Random(seed + 1)
    width, height = A4
    c = canvas.Canvas(str(path), pagesize=A4, pageCompression=0, invariant=1)
    c.setTitle(f"{company} Annual Report")
    header = f"{company} - Annual Report and Accounts"
    starts = {a: t for t, a, _ in sections}
    current = ""
    for page in range(pages):
        c.setFont("Helvetica", 8)
        c.drawString(50, height - 30, header)
        c.drawRightString(width - 50, 30, f"Page {page + 1}")
        y = height - 70
        if page == 0:
            c.setFont("Helvetica-Bold", 24)
            c.drawString(60, height / 2, f"{company}")
            c.setFont("Helvetica", 14)
            c.drawString(60, height / 2 - 30, "Annual Report and Accounts 2024")
            c.bookmarkPage("cover")
            c.addOutlineEntry("Cover", "cover", level=0)
            c.showPage()
            continue
        if page == 1:
            c.setFont("Helvetica-Bold", 16)
            c.drawString(60, y, "Contents")
            c.setFont("Helvetica", 11)
            for t, a, _ in sections:
                y -= 20
                c.drawString(60, y, f"{t} {'.' * 10} {a + 1}")
            c.showPage()
            continue
        if page in starts:
            current = starts[page]
            key = f"s{page}"
            c.bookmarkPage(key)
            c.addOutlineEntry(current, key, level=0)
            c.setFont("Helvetica-Bold", 16)
            c.drawString(60, y, current)
            y -= 30
        else:
            c.setFont("Helvetica-Bold", 11)
            c.drawString(60, y, f"{current} (continued)")
            y -= 24
        fact = facts.get(page)
        fact_at = rng.randint(2, 12)
        line = 0
        c.setFont("Helvetica", 10)
        while y > 80:
            if fact is not None and line == fact_at:
                y = _draw_fact(c, fact, y)
                fact = None
                c.setFont("Helvetica", 10)
            else:
                c.drawString(60, y, _sentence(rng))
                y -= 14
            line += 1
        c.showPage()
    c.save()
    return SyntheticReport(
        path=path,
        num_pages=pages,
        company=company,
        facts=sorted(facts.values(), key=lambda f: f.page),
        sections=sections,
    )


def _draw_fact(c: object, fact: PlantedFact, y: float) -> float:
    """A figure or risk as one bold line; a segment table as a ruled grid (so pdfplumber finds
    its cells) under a caption."""
    if fact.kind != "segment_table":
        c.setFont("Helvetica-Bold", 10)
        c.drawString(60, y, fact.text)
        return y - 18
    caption, _, _ = fact.text.partition(": ")
    c.setFont("Helvetica-Bold", 10)
    c.drawString(60, y, caption)
    y -= 8
    rows = [["Segment", "Revenue", "Operating income"]]
    for part in fact.text.split(": ", 1)[1].split("; "):
        name, rest = part.split(" revenue ")
        revenue, op = rest.split(", operating income ")
        rows.append([name, revenue, op])
    col = (60, 200, 320, 460)
    c.setFont("Helvetica", 10)
    for r in rows:
        c.rect(col[0], y - 16, col[-1] - col[0], 16)
        for x in col[1:-1]:
            c.line(x, y - 16, x, y)
        for j, cell in enumerate(r):
            c.drawString(col[j] + 4, y - 12, cell)
        y -= 16
    return y - 14
