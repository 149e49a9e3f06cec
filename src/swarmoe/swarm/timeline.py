"""A run's timeline from its journal: one row per agent run, with its model calls and tool calls
as bars, for `swarmoe trace` (a table in the terminal and a self-contained HTML Gantt chart)."""

from __future__ import annotations

import html
from dataclasses import dataclass, field

from swarmoe.swarm.store import Event


@dataclass
class Bar:
    kind: str  # "llm" or "tool"
    label: str
    start: float
    end: float
    error: bool = False


@dataclass
class Row:
    agent: str
    name: str
    start: float
    end: float | None = None
    steps: int = 0
    error: str | None = None
    bars: list[Bar] = field(default_factory=list)


@dataclass
class Timeline:
    origin: float
    end: float
    rows: list[Row]
    status: str


def build_timeline(events: list[Event]) -> Timeline:
    """Rows in start order; times are absolute (seconds since the epoch)."""
    rows: dict[str, Row] = {}
    status = "running or crashed"
    for e in events:
        d = e.data
        if e.kind == "agent_start":
            rows.setdefault(e.agent, Row(e.agent, d.get("name", e.agent), e.t))
            continue
        row = rows.get(e.agent)
        if e.kind == "run_finish":
            status = "finished"
        elif e.kind == "run_stopped":
            status = f"stopped: {d.get('reason')}"
        if row is None:
            continue
        if e.kind == "agent_finish":
            row.end, row.steps, row.error = e.t, d.get("steps", 0), d.get("error")
        elif e.kind == "llm_response":
            calls = [c["function"]["name"] for c in d.get("tool_calls") or []]
            label = f"{len(calls)} tool calls" if calls else "answer"
            row.bars.append(Bar("llm", label, d.get("started", e.t), e.t))
        elif e.kind == "tool_result" and "started" in d:
            row.bars.append(Bar("tool", d.get("name", "?"), d["started"], e.t, d.get("error", False)))
    ordered = sorted(rows.values(), key=lambda r: r.start)
    times = [e.t for e in events] or [0.0]
    return Timeline(min(times), max(times), ordered, status)


def render_html(tl: Timeline, title: str) -> str:
    """A dependency-free HTML page: one line per agent, bars positioned in % of the run."""
    span = max(tl.end - tl.origin, 1e-9)

    def pos(t: float) -> float:
        return 100.0 * (t - tl.origin) / span

    lines = []
    for row in tl.rows:
        end = row.end if row.end is not None else tl.end
        bars = [f'<div class="agent" style="left:{pos(row.start):.3f}%;'
                f'width:{max(pos(end) - pos(row.start), 0.1):.3f}%"></div>']
        for b in row.bars:
            cls = f"{b.kind}{' err' if b.error else ''}"
            bars.append(f'<div class="{cls}" title="{html.escape(b.label)} '
                        f'{b.end - b.start:.3f}s" style="left:{pos(b.start):.3f}%;'
                        f'width:{max(pos(b.end) - pos(b.start), 0.1):.3f}%"></div>')
        label = html.escape(f"{row.name} ({row.steps} steps{', ' + row.error if row.error else ''})")
        lines.append(f'<div class="row"><span class="name">{label}</span>'
                     f'<div class="lane">{"".join(bars)}</div></div>')
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font: 12px sans-serif; margin: 16px; }}
.row {{ display: flex; align-items: center; height: 16px; }}
.name {{ width: 260px; flex: none; overflow: hidden; white-space: nowrap; }}
.lane {{ position: relative; flex: 1; height: 12px; }}
.lane div {{ position: absolute; top: 0; height: 12px; }}
.agent {{ background: #e4e8f0; }}
.llm {{ background: #4c78a8; height: 6px !important; }}
.tool {{ background: #59a14f; top: 6px !important; height: 6px !important; opacity: .6; }}
.err {{ background: #e15759; }}
</style></head><body>
<h3>{html.escape(title)}</h3>
<p>{len(tl.rows)} agent runs, {tl.end - tl.origin:.2f} s, {html.escape(tl.status)}.
Blue: model calls; green: tool calls; red: failed tool calls.</p>
{''.join(lines)}
</body></html>
"""
