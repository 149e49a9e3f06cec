"""The long-report task: planted-fact recall with page citations.

`make_report_task` writes a synthetic annual report (`swarmoe.docs.synthetic`) with a sidecar of
its planted facts; `swarmoe analyze` answers a question over it; `parse_findings` reads the
answer's findings and their citations, and `grade_report` says which planted facts the answer
states and which it cites on the page that prints them.

Grading rules (strict, because a citation is only useful when it can be followed):

* A fact is **stated** by a finding when the finding (its text without citations) carries the
  fact's key content. Figures: the planted number, compared as a value (`1,234.5` = `1234.5` =
  `1,234.50`; a scale word converts, so `$1,234.5 million` = `$1.2345 billion` = `$1,234.5m`,
  but the rounded `$1.2 billion` is another number). Segment tables: the first segment's revenue
  and that segment's name in the same finding. Risks: the named plant, platform or scheme
  (`Kestrel`, not `Kestrel 2`) and a word of the risk itself (`cyber`, `pension`, ...), so a
  segment row that names the same segment does not count.
* A finding's citations are **right** when every page they name (each page of a range) holds a
  planted fact the finding states. A fact is **cited** when a finding states it, names its page
  and its citations are right: a neighbouring page, a range that spans other pages, or an extra
  citation of a page without a stated fact earns nothing.
* recall = stated facts / facts; cited_recall = cited facts / facts; precision = findings whose
  citations are right / findings that state a fact and cite a page (None when there are none);
  score = cited_recall x precision (0 without checkable findings). A finding that states a fact
  without any citation lowers cited_recall only; a wrong page lowers both.

Citations naming another document than the graded one (when its name is known) are ignored.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

from swarmoe.docs.synthetic import PlantedFact, SyntheticReport, generate_report

REPORT_QUESTION = (
    "What are the report's key financial figures, segment results and risks? "
    "State each figure, segment result and risk with the page it is printed on."
)

# -- findings and citations ----------------------------------------------------------------


@dataclass(frozen=True)
class Citation:
    """A cited page or page range (1-based, inclusive); `doc` is the name written with it."""

    doc: str | None
    first: int
    last: int

    @property
    def pages(self) -> range:
        return range(self.first, self.last + 1)


@dataclass(frozen=True)
class Finding:
    """One line of a report: what it states (citations removed) and what it cites."""

    text: str
    citations: tuple[Citation, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"text": self.text, "citations": [asdict(c) for c in self.citations]}


_DASH = r"\s*(?:-|–|—|to)\s*"
_MARK = re.compile(r"(?<![A-Za-z])(?:pages?|pp|pg|p)\.?\s*(?=\d)", re.I)
_PAGES = re.compile(rf"(\d+)(?:{_DASH}(\d+))?")
_LIST_SEP = re.compile(r"\s*(?:,|and|&)\s*(?=\d)")
_GROUP = re.compile(r"\[([^\[\]]*)\]|\(([^()]*)\)")
_BARE = re.compile(
    rf"(?<![A-Za-z])(?:pages?\s+|pp\.?\s*|pg\.\s*|p\.\s*)(\d+)(?:{_DASH}(\d+))?", re.I
)
_LEAD = re.compile(r"^(?:and|&|see|cf\.?|sources?:?|ref\.?)(?:\s+|$)", re.I)
_SKIP = re.compile(r"^(?:#|```|[-*_]{3,}$|\|?[\s:|-]+\|[\s:|-]*$)")
_BULLET = re.compile(r"^(?:>\s*)*(?:[-*+•]|\d+[.)])\s+")


def _doc_name(text: str) -> str | None:
    """The document named before a page marker, without 'see', 'and' and punctuation."""
    return _LEAD.sub("", text.strip(" ,;:-–—")).strip(" ,;:-–—") or None


def _citation(doc: str | None, first: str, last: str | None) -> Citation:
    a, b = sorted((int(first), int(last or first)))
    return Citation(doc, a, b)


def _group_citations(group: str) -> list[Citation]:
    """Citations inside one bracket: `doc p.N`, `doc pp.N-M`, `p. N, M`, `a.pdf p.3; b.pdf p.5`;
    a marker without a name of its own belongs to the document named before it."""
    out: list[Citation] = []
    end = 0
    doc: str | None = None
    for m in _MARK.finditer(group):
        doc = _doc_name(group[end : m.start()]) or doc
        end = m.end()
        while page := _PAGES.match(group, end):
            out.append(_citation(doc, page[1], page[2]))
            end = page.end()
            sep = _LIST_SEP.match(group, end)
            if sep is None:
                break
            end = sep.end()
    return out


def _split(line: str) -> tuple[str, list[Citation]]:
    """A line's text without its citations, and the citations."""
    citations: list[Citation] = []

    def take_group(m: re.Match[str]) -> str:
        found = _group_citations(m[1] if m[1] is not None else m[2])
        citations.extend(found)
        return " " if found else m[0]

    def take_bare(m: re.Match[str]) -> str:
        citations.append(_citation(None, m[1], m[2]))
        return " "

    text = _BARE.sub(take_bare, _GROUP.sub(take_group, line))
    text = re.sub(r"\s+([,.;:])", r"\1", re.sub(r"\s+", " ", text))
    text = re.sub(r"[,;:]+(?=[.,;:])", "", text)  # "x, [p.4]." leaves "x,."
    return text.strip(" ,;:-–—"), citations


def parse_findings(report_text: str) -> list[Finding]:
    """The findings of a Markdown report, one per content line (bullets, table rows, paragraph
    lines; headings, rules and table separators skipped), with their page citations.

    Accepted citations, case-insensitive: in square or round brackets, `p.12`, `p12`, `p 12`,
    `page 12`, `pg. 12`, `pp.12-14`, `pages 12 to 14` (any dash), lists such as `p. 3, 5` or
    `pp. 3 and 5`, optionally after a document name (`[report.pdf p.12]`, `[report.pdf, page 12]`,
    `(see report.pdf p. 4)`, `[a.pdf p.3; b.pdf p.5]`); outside brackets `p. 12`, `pp. 12-14`,
    `page 12`, `pages 12-14` (one page or range, no lists, no bare `p12`). A line holding only
    citations adds them to the line before."""
    findings: list[Finding] = []
    for raw in report_text.splitlines():
        line = raw.strip()
        if not line or _SKIP.match(line):
            continue
        text, citations = _split(_BULLET.sub("", line).replace("|", " "))
        if text:
            findings.append(Finding(text, tuple(citations)))
        elif citations and findings:  # a line holding only citations cites the line before
            last = findings[-1]
            findings[-1] = Finding(last.text, last.citations + tuple(citations))
    return findings


# -- key content of a planted fact ---------------------------------------------------------

_SCALES = {
    "thousand": 10**3,
    "k": 10**3,
    "million": 10**6,
    "millions": 10**6,
    "mn": 10**6,
    "m": 10**6,
    "billion": 10**9,
    "billions": 10**9,
    "bn": 10**9,
    "b": 10**9,
}
_NUMBER = re.compile(
    r"(?<![\w.])((?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?)(?!\d)"
    r"(?:\s?(thousand|millions?|billions?|mn|bn|[kmb])\b)?",
    re.I,
)
_NUMERIC = re.compile(r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")
# words of a risk statement that say nothing about the risk itself
_GENERIC = frozenset({"could", "would", "should", "several", "affecting", "reported", "require"})


def _decimal(s: str) -> Decimal:
    return Decimal(s.replace(",", ""))


def _name_pattern(name: str) -> re.Pattern[str]:
    return re.compile(rf"(?<!\w){re.escape(name)}(?!\w)(?!\s+\d{{1,2}}\b(?![.,]\d))", re.I)


def _stems(text: str) -> set[str]:
    return {w[:5] for w in re.findall(r"[a-z]+", text.lower()) if len(w) >= 5}


@dataclass(frozen=True)
class _Key:
    """What a finding must carry to state a fact."""

    number: Decimal | None = None  # as printed
    scale: int = 1  # the printed number's unit: 1, thousand, million, billion
    names: tuple[re.Pattern[str], ...] = ()
    stems: frozenset[str] = field(default_factory=frozenset)  # one of them must appear

    def stated_in(self, text: str) -> bool:
        if not all(p.search(text) for p in self.names):
            return False
        if self.stems and not self.stems & _stems(text):
            return False
        return self.number is None or any(self._same(m) for m in _NUMBER.finditer(text))

    def _same(self, m: re.Match[str]) -> bool:
        value = _decimal(m[1])
        if m[2] is None:
            return value == self.number
        return value * _SCALES[m[2].lower()] == self.number * self.scale


def _key(fact: PlantedFact) -> _Key:
    if not _NUMERIC.fullmatch(fact.value):  # a name: a risk's plant, platform, scheme ...
        name_words = _stems(fact.value)
        stems = frozenset(_stems(fact.text) - name_words - {w[:5] for w in _GENERIC})
        return _Key(names=(_name_pattern(fact.value),), stems=stems)
    unit = re.search(rf"{re.escape(fact.value)}\s?(thousand|million|billion)\b", fact.text)
    unit = unit or re.search(r"\(in [^)]*?(thousand|million|billion)s?\)", fact.text)
    names: tuple[re.Pattern[str], ...] = ()
    if fact.kind == "segment_table":  # the segment whose revenue is the value
        owner = re.search(rf"(\w+) revenue {re.escape(fact.value)}(?!,?\d)", fact.text)
        names = (_name_pattern(owner[1]),) if owner else ()
    return _Key(_decimal(fact.value), _SCALES[unit[1]] if unit else 1, names)


# -- the grade ------------------------------------------------------------------------------


@dataclass(frozen=True)
class FactGrade:
    """One planted fact: its 1-based page, whether it is stated and cited right, the finding
    that credits it (else the first that states it) and every page cited for it."""

    label: str
    kind: str
    page: int
    value: str
    found: bool
    cited: bool
    finding: int | None
    cited_pages: tuple[int, ...]


@dataclass(frozen=True)
class ReportGrade:
    """Planted-fact recall with page citations; the rules are in the module docstring."""

    facts: tuple[FactGrade, ...]
    findings: int
    checkable: int  # findings that state a fact and cite a page of this document
    precise: int  # of those, findings whose citations are right
    uncited: int  # findings that state a fact but cite no page of this document

    @property
    def recall(self) -> float:
        return sum(f.found for f in self.facts) / len(self.facts)

    @property
    def cited_recall(self) -> float:
        return sum(f.cited for f in self.facts) / len(self.facts)

    @property
    def precision(self) -> float | None:
        return self.precise / self.checkable if self.checkable else None

    @property
    def score(self) -> float:
        return self.cited_recall * (self.precision or 0.0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "score": self.score,
            "recall": self.recall,
            "cited_recall": self.cited_recall,
            "precision": self.precision,
            "facts_total": len(self.facts),
            "found": sum(f.found for f in self.facts),
            "cited": sum(f.cited for f in self.facts),
            "findings": self.findings,
            "checkable": self.checkable,
            "precise": self.precise,
            "uncited": self.uncited,
            "facts": [asdict(f) for f in self.facts],
        }


def _names_doc(cited: str | None, doc: str | None) -> bool:
    if cited is None or doc is None:
        return True
    cited, doc = cited.lower(), doc.lower()
    return cited in (doc, Path(doc).stem) or doc in cited


def grade_report(
    report: SyntheticReport | list[PlantedFact],
    findings: list[Finding],
    *,
    doc: str | None = None,
) -> ReportGrade:
    """Grade `findings` against the planted facts of `report`. `doc` is the document's name as
    citations write it (default: the report's file name; unknown for a bare list of facts)."""
    facts = report.facts if isinstance(report, SyntheticReport) else list(report)
    if isinstance(report, SyntheticReport) and doc is None:
        doc = report.path.name
    if not facts:
        raise ValueError("there are no planted facts to grade against")
    keys = [_key(f) for f in facts]
    stated = [{j for j, k in enumerate(keys) if k.stated_in(f.text)} for f in findings]
    cites = [[c for c in f.citations if _names_doc(c.doc, doc)] for f in findings]
    right = [
        bool(cs) and all(p - 1 in {facts[j].page for j in st} for c in cs for p in c.pages)
        for st, cs in zip(stated, cites, strict=True)
    ]
    grades = []
    for j, fact in enumerate(facts):
        stating = [i for i, st in enumerate(stated) if j in st]
        crediting = [
            i for i in stating if right[i] and any(fact.page + 1 in c.pages for c in cites[i])
        ]
        pages = sorted({p for i in stating for c in cites[i] for p in c.pages})
        grades.append(
            FactGrade(
                fact.label,
                fact.kind,
                fact.page + 1,
                fact.value,
                found=bool(stating),
                cited=bool(crediting),
                finding=(crediting or stating or [None])[0],
                cited_pages=tuple(pages),
            )
        )
    checkable = [i for i, st in enumerate(stated) if st and cites[i]]
    return ReportGrade(
        tuple(grades),
        findings=len(findings),
        checkable=len(checkable),
        precise=sum(right[i] for i in checkable),
        uncited=sum(1 for i, st in enumerate(stated) if st and not cites[i]),
    )


# -- tasks and their sidecars ---------------------------------------------------------------


def facts_path(document: str | Path) -> Path:
    """Where a report's planted facts are kept: `report.pdf` -> `report.facts.json`."""
    return Path(document).with_suffix(".facts.json")


def write_facts(report: SyntheticReport) -> Path:
    """Write the sidecar of `report`'s planted facts next to its PDF; return its path."""
    path = facts_path(report.path)
    payload = {
        "company": report.company,
        "num_pages": report.num_pages,
        "facts": [asdict(f) for f in report.facts],
    }
    path.write_text(json.dumps(payload, indent=1), encoding="utf-8")
    return path


def load_facts(document: str | Path) -> list[PlantedFact]:
    """The planted facts of `document`, from its `.facts.json` sidecar."""
    path = facts_path(document)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no planted facts for {Path(document).name} (make_report_task writes them)"
        )
    try:
        return [PlantedFact(**f) for f in json.loads(path.read_text(encoding="utf-8"))["facts"]]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a planted-facts file ({e})") from None


@dataclass(frozen=True)
class ReportTask:
    """A generated report, its planted facts and the question to ask about it."""

    path: Path
    num_pages: int
    facts: list[PlantedFact]
    question: str

    def grade(self, answer: str) -> ReportGrade:
        """Grade an answer (the report text) to this task."""
        return grade_report(self.facts, parse_findings(answer), doc=self.path.name)


def make_report_task(seed: int, pages: int, directory: str | Path) -> ReportTask:
    """Write `report-SEED-PAGES.pdf` and its facts sidecar into `directory`; the same seed and
    pages give the same facts, so a curriculum draws unseen reports by drawing unseen seeds."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    report = generate_report(directory / f"report-{seed}-{pages}.pdf", pages=pages, seed=seed)
    write_facts(report)
    return ReportTask(report.path, report.num_pages, report.facts, REPORT_QUESTION)
