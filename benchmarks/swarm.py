"""Swarm benchmark: the issue's 100 x 15 workload three ways, in one run.

- swarmoe: `Swarm` over HTTP; the orchestrator creates 100 sub-agents and assigns each 15
  lookups, made in 3 parallel rounds of 5.
- langgraph: the same orchestration as a LangGraph graph (a planning node, `Send` fan-out to a
  worker node per sub-agent, an integrating node), over the same model client and tool.
- single: one agent doing every lookup itself, in the same rounds of 5.

All three talk to one scripted `FakeModel` (0.5 s per call) served from its own process, so
the fake's CPU does not compete for the GIL of the process being measured; the tool sleeps
0.5 s. Each contender runs in a fresh child process, which gives clean peak RSS; CPU time is
counted from the start to the end of the run (imports excluded).

    python benchmarks/swarm.py                      # full run (the single agent takes ~5 min)
    python benchmarks/swarm.py --single-groups 10   # single agent on 10 groups, scaled x10

swarmoe and langgraph run `--repeats` times each, alternating; the median run of each is
reported. Prints a table and ratios, and writes one JSON line (stdout, and appended to --out).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import operator
import resource
import subprocess
import sys
import time
from typing import Annotated, Any, TypedDict

import openai.types.chat  # noqa: F401  (imported before any timing, for every contender)
from langgraph.graph import END, START, StateGraph
from langgraph.types import Send

from record import report
from swarmoe import Swarm, tool
from swarmoe.swarm.backends import OpenAIBackend
from swarmoe.swarm.swarm import ORCHESTRATOR_PROMPT, SWARM_TOOLS
from swarmoe.testing.fake_model import FakeModel, WideLookup


def serve(args: argparse.Namespace) -> None:
    """Child: serve the scripted model until stdin closes."""
    work = WideLookup(groups=args.groups, tool_latency=args.latency)
    with FakeModel(work.script, latency=args.latency).serve() as url:
        print(url, flush=True)
        sys.stdin.read()


async def run_swarmoe(work: WideLookup, url: str) -> dict[str, Any]:
    swarm = Swarm("fake", base_url=url, api_key="bench", tools=[tool(work.lookup)],
                  max_subagents=work.groups, runs_dir="/tmp/swarmoe-bench-runs")
    result = await swarm.run(work.task)
    return {"answer": result.answer, "critical_steps": result.stats.critical_steps,
            "total_steps": result.stats.total_steps}


class State(TypedDict, total=False):
    """LangGraph state of the orchestrator: sub-agent results merge through `operator.add`."""

    messages: list[dict[str, Any]]
    assignments: list[dict[str, Any]]
    results: Annotated[list[tuple[int, str, str]], operator.add]
    answer: str


async def run_langgraph(work: WideLookup, url: str) -> dict[str, Any]:
    backend = OpenAIBackend("fake", base_url=url, api_key="bench")
    lookup = tool(work.lookup).schema
    orchestrator_tools = [lookup, *SWARM_TOOLS]

    async def plan(state: State) -> State:
        msgs: list[dict[str, Any]] = [{"role": "system", "content": ORCHESTRATOR_PROMPT},
                                      {"role": "user", "content": work.task}]
        created = await backend.chat(msgs, orchestrator_tools, {})
        msgs.append(created.to_message())
        systems = {}
        for call in created.tool_calls:
            a = json.loads(call.arguments)
            systems[a["name"]] = a["system_prompt"]
            msgs.append({"role": "tool", "tool_call_id": call.id,
                         "content": f"Created sub-agent {a['name']!r}."})
        assigned = await backend.chat(msgs, orchestrator_tools, {})
        msgs.append(assigned.to_message())
        assignments = []
        for i, call in enumerate(assigned.tool_calls):
            a = json.loads(call.arguments)
            assignments.append({"index": i, "call_id": call.id, "prompt": a["prompt"],
                                "system": systems[a["agent"]]})
        return {"messages": msgs, "assignments": assignments}

    def fan_out(state: State) -> list[Send]:
        return [Send("worker", a) for a in state["assignments"]]

    async def worker(task: dict[str, Any]) -> State:
        msgs = [{"role": "system", "content": task["system"]},
                {"role": "user", "content": task["prompt"]}]
        while True:
            msg = await backend.chat(msgs, [lookup], {})
            msgs.append(msg.to_message())
            if not msg.tool_calls:
                return {"results": [(task["index"], task["call_id"], msg.content or "")]}
            outs = await asyncio.gather(*(work.lookup(**json.loads(c.arguments))
                                          for c in msg.tool_calls))
            msgs.extend({"role": "tool", "tool_call_id": c.id, "content": out}
                        for c, out in zip(msg.tool_calls, outs, strict=True))

    async def integrate(state: State) -> State:
        msgs = state["messages"] + [{"role": "tool", "tool_call_id": cid, "content": content}
                                    for _, cid, content in sorted(state["results"])]
        final = await backend.chat(msgs, orchestrator_tools, {})
        return {"answer": final.content or ""}

    graph = StateGraph(State)
    graph.add_node("plan", plan)
    graph.add_node("worker", worker)
    graph.add_node("integrate", integrate)
    graph.add_edge(START, "plan")
    graph.add_conditional_edges("plan", fan_out, ["worker"])
    graph.add_edge("worker", "integrate")
    graph.add_edge("integrate", END)
    out = await graph.compile().ainvoke({"results": []})
    await backend.aclose()
    return {"answer": out["answer"]}


async def run_single(work: WideLookup, url: str) -> dict[str, Any]:
    backend = OpenAIBackend("fake", base_url=url, api_key="bench")
    msgs = [{"role": "system", "content": "You look keys up."},
            {"role": "user", "content": work.single_agent_task}]
    lookup = [tool(work.lookup).schema]
    steps = 0
    while True:
        msg = await backend.chat(msgs, lookup, {})
        steps += 1
        msgs.append(msg.to_message())
        if not msg.tool_calls:
            break
        outs = await asyncio.gather(*(work.lookup(**json.loads(c.arguments))
                                      for c in msg.tool_calls))
        msgs.extend({"role": "tool", "tool_call_id": c.id, "content": out}
                    for c, out in zip(msg.tool_calls, outs, strict=True))
    await backend.aclose()
    return {"answer": msg.content, "total_steps": steps}


CONTENDERS = {"swarmoe": run_swarmoe, "langgraph": run_langgraph, "single": run_single}


def contend(args: argparse.Namespace) -> None:
    """Child: run one contender against the served model; print one JSON line."""
    groups = args.single_groups if args.contender == "single" else args.groups
    work = WideLookup(groups=groups, tool_latency=args.latency)
    fn = CONTENDERS[args.contender]
    before = resource.getrusage(resource.RUSAGE_SELF)
    started = time.monotonic()
    out = asyncio.run(fn(work, args.url))
    wall = time.monotonic() - started
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu = usage.ru_utime + usage.ru_stime - before.ru_utime - before.ru_stime
    calls = sum(work.executed.values())
    print(json.dumps({
        **{k: v for k, v in out.items() if k != "answer"},
        "groups": groups, "wall_s": round(wall, 3),
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
        "cpu_ms_per_tool_call": round(cpu * 1000 / calls, 3),
        "tool_calls": calls,
        "each_tool_call_once": set(work.executed.values()) == {1},
        "answer_correct": out["answer"] == work.expected_answer(),
    }), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--groups", type=int, default=100, help="sub-agents (15 lookups each)")
    p.add_argument("--latency", type=float, default=0.5, help="seconds per model call and tool")
    p.add_argument("--single-groups", type=int, default=None,
                   help="groups for the single agent (its wall is scaled to --groups)")
    p.add_argument("--repeats", type=int, default=3,
                   help="runs of swarmoe and langgraph each (median reported)")
    p.add_argument("--out", default=None, help="append the JSON line to this file")
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--contender", choices=sorted(CONTENDERS), help=argparse.SUPPRESS)
    p.add_argument("--url", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.single_groups = args.single_groups or args.groups
    if args.serve:
        return serve(args)
    if args.contender:
        return contend(args)

    base = [sys.executable, __file__, "--groups", str(args.groups), "--latency",
            str(args.latency), "--single-groups", str(args.single_groups)]
    server = subprocess.Popen([*base, "--serve"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    try:
        url = server.stdout.readline().strip()
        runs: dict[str, list[dict[str, Any]]] = {}
        # swarmoe and langgraph alternate, so machine noise hits both alike; the median counts.
        order = ["swarmoe", "langgraph"] * args.repeats + ["single"]
        for name in order:
            child = subprocess.run([*base, "--contender", name, "--url", url],
                                   capture_output=True, text=True, check=True)
            runs.setdefault(name, []).append(json.loads(child.stdout.strip().splitlines()[-1]))
            print(f"{name:10s} {runs[name][-1]}", file=sys.stderr, flush=True)
        results = {name: sorted(rs, key=lambda r: r["wall_s"])[len(rs) // 2]
                   for name, rs in runs.items()}
    finally:
        server.stdin.close()
        server.wait(timeout=30)

    critical_path = 7 * args.latency + 3 * args.latency
    single_wall = results["single"]["wall_s"] * args.groups / args.single_groups
    sw, lg = results["swarmoe"], results["langgraph"]
    record = {
        "bench": "swarm", "groups": args.groups, "tool_calls": args.groups * 15,
        "latency_s": args.latency, "critical_path_s": critical_path,
        "repeats": args.repeats, "results": results,
        "walls_s": {name: [r["wall_s"] for r in rs] for name, rs in runs.items()},
        "single_wall_scaled_s": round(single_wall, 2),
        "swarmoe_wall_over_critical_path": round(sw["wall_s"] / critical_path, 3),
        "swarmoe_wall_over_langgraph": round(sw["wall_s"] / lg["wall_s"], 3),
        "single_over_swarmoe": round(single_wall / sw["wall_s"], 2),
        "machine_cpus": len(__import__("os").sched_getaffinity(0)),
    }
    print(f"{'contender':10s} {'wall s':>8s} {'RSS MB':>8s} {'CPU ms/tool call':>17s} correct")
    for name, r in results.items():
        wall = single_wall if name == "single" else r["wall_s"]
        print(f"{name:10s} {wall:8.2f} {r['peak_rss_mb']:8.1f} {r['cpu_ms_per_tool_call']:17.3f} "
              f"{r['answer_correct'] and r['each_tool_call_once']}")
    print(f"critical path {critical_path:.2f} s; swarmoe/critical path "
          f"{record['swarmoe_wall_over_critical_path']}; swarmoe/langgraph "
          f"{record['swarmoe_wall_over_langgraph']}; single/swarmoe {record['single_over_swarmoe']}")
    report(record, args.out)


if __name__ == "__main__":
    main()
