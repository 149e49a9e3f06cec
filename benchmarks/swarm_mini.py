"""swarmoe-mini on held-out tasks: what the trained model does with the swarm, in one run.

All tasks use seeds >= 2**31 (the curriculum draws task seeds below 2**30), on one in-process
engine (`LLM(path)`), greedy decoding:

- wide search by entity count (10 / 30 / 100; `--tasks` each, 3-5 attributes): item-F1,
  row-F1, exact tables, sub-agents and critical steps per task;
- the long-report recipe on held-out reports: planted-fact recall with right page citations
  (cited recall), citation precision;
- well-formed tool calls: calls whose arguments parse as a JSON object and name a tool the
  agent has, over every call the model emitted (from the run events);
- swarm vs single agent on the same engine (the first 100-entity task; the single agent under
  `--single-deadline`, a lower bound on its time when it is cut off);
- engine figures during the swarm runs: batch widths per engine step and the prefix-cache hit
  rate (`LLM.stats()`, `LLM.batch_sizes`).

`--financebench` is a separate mode: the long-document recipe on the FinanceBench sample in
../shared/data/financebench (read in place, never copied), an answer counted right when it
contains the reference figure (numeric references) or starts with the reference's yes/no.

    python benchmarks/swarm_mini.py [--model swarmoe-mini] [--quick]
    python benchmarks/swarm_mini.py --financebench [--questions 5]

Prints a summary table and ratios and writes one JSON line (stdout, appended to --out).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import statistics
import time
from collections import Counter
from pathlib import Path
from typing import Any

from record import report
from swarmoe.commands.demo import HELD_OUT_SEED, RunWatch, replay_watch, table_tokens

REPO = Path(__file__).resolve().parent.parent
FINANCEBENCH = REPO / ".." / "shared" / "data" / "financebench"


def _mean(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


class EngineWindow:
    """Engine counters over a window of runs: batch widths and prefix-cache hits."""

    def __init__(self, llm: Any) -> None:
        self.llm = llm
        self.batches: Counter[int] = Counter()
        self.hits = self.lookups = self.preemptions = 0

    def __enter__(self) -> EngineWindow:
        s = self.llm.stats()
        self._start = (Counter(self.llm.batch_sizes), s["prefix_block_hits"],
                       s["prefix_block_lookups"], s["preemptions"])
        return self

    def __exit__(self, *exc: Any) -> None:
        s = self.llm.stats()
        batches, hits, lookups, preemptions = self._start
        self.batches += Counter(self.llm.batch_sizes) - batches
        self.hits += s["prefix_block_hits"] - hits
        self.lookups += s["prefix_block_lookups"] - lookups
        self.preemptions += s["preemptions"] - preemptions

    def to_json(self) -> dict[str, Any]:
        steps = sum(self.batches.values())
        rows = sum(n * c for n, c in self.batches.items())
        return {"steps": steps, "mean_batch": rows / steps if steps else None,
                "max_batch": max(self.batches, default=0),
                "batch_hist": {str(k): v for k, v in sorted(self.batches.items())},
                "prefix_block_hits": self.hits, "prefix_block_lookups": self.lookups,
                "prefix_hit_rate": self.hits / self.lookups if self.lookups else None,
                "preemptions": self.preemptions}


def wide_run(llm: Any, task: Any, args: argparse.Namespace, single: bool = False,
             window: EngineWindow | None = None) -> tuple[Any, RunWatch]:
    from swarmoe.tasks.widesearch import run_task

    watch = RunWatch({t.name for t in task.tools()}, swarm_tools=not single)
    sampling = {"temperature": 0,
                "max_tokens": args.max_tokens or table_tokens(len(task.entities),
                                                              len(task.attributes))}
    options = {"model": llm, "runs_dir": args.dir / "runs", "sampling": sampling,
               "deadline": args.single_deadline if single else args.deadline, "on_event": watch}
    if window is not None:
        with window:
            result = asyncio.run(run_task(task, options, single_agent=single))
    else:
        result = asyncio.run(run_task(task, options, single_agent=single))
    return result, watch


def _wide_record(result: Any, watch: RunWatch) -> dict[str, Any]:
    g, s = result.grade, result.stats
    return {"seed": result.task.seed, "entities": len(result.task.entities),
            "attributes": len(result.task.attributes), "item_f1": g.item_f1, "row_f1": g.row_f1,
            "exact": g.exact, "subagents": s.subagents, "critical_steps": s.critical_steps,
            "total_steps": s.total_steps, "tool_calls": s.tool_calls,
            "calls_emitted": watch.calls_emitted, "calls_well_formed": watch.calls_well_formed,
            "wall_s": round(s.wall_seconds, 2), "stopped": result.stopped}


def widesearch(llm: Any, args: argparse.Namespace, calls: Counter[str]) -> dict[str, Any]:
    from swarmoe.tasks.tables import random_table
    from swarmoe.tasks.widesearch import make_task

    window, by_count, runs, versus = EngineWindow(llm), {}, [], None
    for n in args.counts:
        recs = []
        for i in range(args.tasks):
            seed = HELD_OUT_SEED + 1000 * n + i
            k = 3 + i % 3
            task = make_task(random_table(seed, entities=n + 5, attributes=k), entities=n,
                             seed=seed)
            result, watch = wide_run(llm, task, args, window=window)
            rec = _wide_record(result, watch)
            calls.update(emitted=watch.calls_emitted, well_formed=watch.calls_well_formed)
            print(f"  wide {n:>3} x {k} seed {seed}: item-F1 {rec['item_f1']:.3f} row-F1 "
                  f"{rec['row_f1']:.3f} {rec['subagents']} sub-agents, crit {rec['critical_steps']}"
                  f", {rec['wall_s']} s" + (f" STOPPED {result.stopped}" if result.stopped else ""),
                  flush=True)
            recs.append(rec)
            if i == 0 and n == args.versus:
                single, swatch = wide_run(llm, task, args, single=True)
                srec = _wide_record(single, swatch)
                calls.update(emitted=swatch.calls_emitted, well_formed=swatch.calls_well_formed)
                print(f"  single agent, same task: item-F1 {srec['item_f1']:.3f}, "
                      f"{srec['wall_s']} s" + (f" STOPPED {single.stopped}" if single.stopped
                                               else ""), flush=True)
                versus = {"entities": n, "swarm": rec, "single": srec,
                          "single_over_swarm_wall": srec["wall_s"] / rec["wall_s"]
                          if rec["wall_s"] else None,
                          "single_wall_is_lower_bound": single.stopped is not None}
        runs += recs
        by_count[str(n)] = {
            "tasks": len(recs),
            **{key: _mean([r[key] for r in recs]) for key in
               ("item_f1", "row_f1", "subagents", "critical_steps", "wall_s")},
            "exact": sum(r["exact"] for r in recs) / len(recs),
            "stopped": sum(r["stopped"] is not None for r in recs)}
    return {"by_entities": by_count, "runs": runs, "swarm_vs_single": versus,
            "engine": window.to_json()}


def reports(llm: Any, args: argparse.Namespace, calls: Counter[str]) -> dict[str, Any]:
    from swarmoe.docs.recipe import analyze
    from swarmoe.docs.tools import DocumentTools
    from swarmoe.swarm import RunStopped
    from swarmoe.tasks.report import make_report_task

    recs = []
    for i in range(args.reports):
        seed, pages = HELD_OUT_SEED + 500 + i, args.pages[i % len(args.pages)]
        task = make_report_task(seed, pages, args.dir / "reports")
        tools = DocumentTools([task.path], cache_dir=args.dir / "cache")
        subagents = min(100, -(-pages // 3))
        started, stopped = time.monotonic(), None
        try:
            analysis = asyncio.run(analyze(
                tools, task.question, llm, max_subagents=subagents, runs_dir=args.dir / "runs",
                sampling={"temperature": 0, "max_tokens": args.max_tokens or 4096},
                deadline=args.deadline))
            result, text = analysis.result, analysis.report
        except RunStopped as e:
            result, text, stopped = e.result, "", e.reason
        watch = replay_watch(result.run_id, args.dir / "runs", {t.name for t in tools.tools()})
        calls.update(emitted=watch.calls_emitted, well_formed=watch.calls_well_formed)
        grade = task.grade(text)
        rec = {"seed": seed, "pages": task.num_pages, "facts": len(task.facts),
               "cited_recall": grade.cited_recall, "precision": grade.precision,
               "recall": grade.recall, "subagents": result.stats.subagents,
               "critical_steps": result.stats.critical_steps,
               "calls_emitted": watch.calls_emitted, "calls_well_formed": watch.calls_well_formed,
               "wall_s": round(time.monotonic() - started, 2), "stopped": stopped}
        print(f"  report {pages} pages seed {seed}: cited recall {grade.cited_recall:.3f}, "
              f"precision {grade.precision}, {rec['subagents']} sub-agents, {rec['wall_s']} s"
              + (f" STOPPED {stopped}" if stopped else ""), flush=True)
        recs.append(rec)
    return {"tasks": len(recs), "runs": recs,
            **{key: _mean([r[key] for r in recs]) for key in
               ("cited_recall", "precision", "recall", "subagents", "critical_steps", "wall_s")},
            "stopped": sum(r["stopped"] is not None for r in recs)}


# -- FinanceBench ---------------------------------------------------------------------------

_NUM = re.compile(r"-?\(?\$?\s?(\d{1,3}(?:,\d{3})+|\d+)(?:\.(\d+))?")


def _numbers(text: str) -> list[float]:
    out = []
    for m in _NUM.finditer(text):
        out.append(float(m[1].replace(",", "") + (f".{m[2]}" if m[2] else "")))
    return out


def grade_financebench(reference: str, answer: str) -> bool | None:
    """True when `answer` holds the reference's first figure (within 0.5 %, as printed or as a
    percentage's number) or, for a yes/no reference, opens with the same word; None when the
    reference is neither (not graded automatically)."""
    ref = reference.strip()
    word = re.match(r"(yes|no)\b", ref, re.I)
    if word:
        return bool(re.match(rf"\W*{word[1]}\b", answer.strip(), re.I))
    figures = _numbers(ref)
    if not figures:
        return None
    want = figures[0]
    return any(abs(v - want) <= 0.005 * max(abs(want), 1e-9) for v in _numbers(answer))


def financebench(llm: Any, args: argparse.Namespace) -> dict[str, Any]:
    from swarmoe.docs.recipe import analyze
    from swarmoe.docs.tools import DocumentTools
    from swarmoe.swarm import RunStopped

    data = Path(args.data)
    questions = [json.loads(line) for line in (data / "questions.jsonl").open()]
    questions = questions[: args.questions]
    recs = []
    for q in questions:
        pdf = data / "pdfs" / f"{q['doc_name']}.pdf"
        tools = DocumentTools([pdf], cache_dir=args.dir / "cache")
        pages = next(iter(tools.docs.values())).num_pages
        started, stopped, text = time.monotonic(), None, ""
        try:
            analysis = asyncio.run(analyze(
                tools, q["question"], llm, max_subagents=min(100, -(-pages // 3)),
                runs_dir=args.dir / "runs", deadline=args.deadline,
                sampling={"temperature": 0, "max_tokens": args.max_tokens or 2048}))
            text = analysis.report
        except RunStopped as e:
            stopped = e.reason
        except ValueError as e:  # a prompt longer than the model's context, say
            stopped = f"{type(e).__name__}: {e}"
        right = grade_financebench(q["answer"], text)
        recs.append({"id": q["financebench_id"], "doc": q["doc_name"], "pages": pages,
                     "type": q["question_type"], "reference": q["answer"][:200],
                     "answer": text[:400], "right": right, "stopped": stopped,
                     "wall_s": round(time.monotonic() - started, 2)})
        print(f"  {q['financebench_id']} ({q['doc_name']}, {pages} p): right={right}"
              + (f" STOPPED {stopped[:100]}" if stopped else ""), flush=True)
    graded = [r for r in recs if r["right"] is not None]
    return {"questions": len(recs), "graded": len(graded),
            "right": sum(bool(r["right"]) for r in graded),
            "accuracy": sum(bool(r["right"]) for r in graded) / len(graded) if graded else None,
            "stopped": sum(r["stopped"] is not None for r in recs),
            "wall_s": sum(r["wall_s"] for r in recs), "runs": recs}


# -- main ---------------------------------------------------------------------------------------


def _fmt(v: Any) -> str:
    return "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def summary(record: dict[str, Any]) -> None:
    if "financebench" in record:
        fb = record["financebench"]
        print(f"\nFinanceBench: {fb['right']}/{fb['graded']} graded answers hold the reference "
              f"({_fmt(fb['accuracy'])}); {fb['questions'] - fb['graded']} not auto-graded, "
              f"{fb['stopped']} stopped, {fb['wall_s']:.0f} s")
        return
    ws = record["widesearch"]
    print(f"\n{'entities':>9}{'tasks':>7}{'item-F1':>9}{'row-F1':>9}{'exact':>7}"
          f"{'sub-ag.':>9}{'crit.':>7}{'wall s':>9}{'stopped':>9}")
    for n, r in ws["by_entities"].items():
        print(f"{n:>9}{r['tasks']:>7}{_fmt(r['item_f1']):>9}{_fmt(r['row_f1']):>9}"
              f"{_fmt(r['exact']):>7}{_fmt(r['subagents']):>9}{_fmt(r['critical_steps']):>7}"
              f"{_fmt(r['wall_s']):>9}{r['stopped']:>9}")
    rp = record["reports"]
    print(f"reports: cited recall {_fmt(rp['cited_recall'])}, precision {_fmt(rp['precision'])},"
          f" recall {_fmt(rp['recall'])} over {rp['tasks']} ({rp['stopped']} stopped)")
    print(f"well-formed tool calls: {record['tool_calls']['well_formed']}/"
          f"{record['tool_calls']['emitted']} ({_fmt(record['tool_calls']['rate'])})")
    v = ws["swarm_vs_single"]
    if v:
        bound = " (single agent cut off: lower bound)" if v["single_wall_is_lower_bound"] else ""
        print(f"swarm vs single agent, {v['entities']} entities: wall {v['swarm']['wall_s']} s vs "
              f"{v['single']['wall_s']} s = {_fmt(v['single_over_swarm_wall'])}x{bound}; "
              f"item-F1 {_fmt(v['swarm']['item_f1'])} vs {_fmt(v['single']['item_f1'])}; "
              f"critical steps {v['swarm']['critical_steps']} vs {v['single']['critical_steps']}")
    e = ws["engine"]
    print(f"engine during the swarm runs: {e['steps']} steps, mean batch {_fmt(e['mean_batch'])},"
          f" max {e['max_batch']}, prefix-cache hit rate {_fmt(e['prefix_hit_rate'])}, "
          f"{e['preemptions']} preemptions")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="swarmoe-mini", help="shipped name or checkpoint path")
    ap.add_argument("--quick", action="store_true", help="a small smoke run")
    ap.add_argument("--financebench", action="store_true", help="the FinanceBench mode")
    ap.add_argument("--data", default=str(FINANCEBENCH), help="FinanceBench directory")
    ap.add_argument("--questions", type=int, default=None, help="FinanceBench questions to ask")
    ap.add_argument("--counts", default=None, help="entity counts, default 10,30,100")
    ap.add_argument("--tasks", type=int, default=None, help="tasks per entity count (default 3)")
    ap.add_argument("--reports", type=int, default=None, help="held-out reports (default 3)")
    ap.add_argument("--max-tokens", type=int, default=None, help="tokens per model call")
    ap.add_argument("--deadline", type=float, default=900.0, help="seconds per swarm run")
    ap.add_argument("--single-deadline", type=float, default=300.0,
                    help="seconds for the single-agent baseline")
    ap.add_argument("--dir", type=Path, default=Path("/tmp/swarmoe-bench-mini"))
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "swarm_mini.jsonl"))
    args = ap.parse_args()
    q = args.quick
    args.counts = [int(c) for c in (args.counts or ("5" if q else "10,30,100")).split(",")]
    args.tasks = args.tasks or (1 if q else 3)
    args.reports = args.reports if args.reports is not None else (1 if q else 3)
    args.pages = [30] if q else [40, 60, 90]
    args.versus = 100 if 100 in args.counts else max(args.counts)
    args.questions = args.questions or (1 if q else None)

    from swarmoe import LLM
    from swarmoe.checkpoints import resolve_checkpoint

    path = resolve_checkpoint(args.model)
    entities = max(args.counts)
    started = time.monotonic()
    llm = LLM(path, max_num_seqs=max(entities, 34) + 8, max_num_batched_tokens=4096)
    record: dict[str, Any] = {
        "benchmark": "swarm_mini", "mode": "financebench" if args.financebench else "held-out",
        "model": str(args.model), "path": str(path), "quick": q,
        "machine": {"cpu": platform.processor() or platform.machine(),
                    "threads": os.environ.get("OMP_NUM_THREADS")},
        "parameters": sum(p.numel() for p in llm.model.parameters()),
        "seeds": f">= {HELD_OUT_SEED}"}
    if args.financebench:
        record["financebench"] = financebench(llm, args)
    else:
        calls: Counter[str] = Counter()
        record["widesearch"] = widesearch(llm, args, calls)
        record["reports"] = reports(llm, args, calls)
        record["tool_calls"] = {"emitted": calls["emitted"], "well_formed": calls["well_formed"],
                                "rate": calls["well_formed"] / calls["emitted"]
                                if calls["emitted"] else None}
    record["wall_s"] = round(time.monotonic() - started, 1)
    summary(record)
    report(record, args.out)


if __name__ == "__main__":
    main()
