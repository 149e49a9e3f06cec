"""`swarmoe demo`: the trained swarmoe-mini doing what it was trained for, on this machine.

By default it loads `swarmoe-mini` (or the checkpoint `--model` names) into one in-process
engine and runs, on tasks it never saw in training (seeds >= 2**31; training draws below 2**30):

1. a wide-search task of 100 entities with the agent swarm (one sub-agent per entity, all
   decoding together in one continuously batched engine), graded item-, row- and table-wise;
2. the same task on the same engine as a single agent, bounded by a deadline;
3. the long-document recipe on a generated annual report, its cited findings graded;
4. the wide-search task again through `swarmoe serve` semantics: the OpenAI-compatible app on
   127.0.0.1 and the swarm talking to it over HTTP with the official openai client.

`--random` keeps the plumbing demo: a tiny random-weight checkpoint, the server, chat,
streaming, a forced tool call, a swarm and the document recipe — every piece, with noise for
words. Both work offline.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

#: First seed of the demo's tasks: above every seed the curriculum draws (`[0, 2**30)`).
HELD_OUT_SEED = 2**31
_SERVED = "swarmoe-mini"
_NOISE = ("NOTE: this checkpoint has RANDOM weights. Everything the model 'says' below is noise;\n"
          "      the point is the plumbing (server, streaming, tool-call parsing), not the words.")
_WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}


def demo(
    model: Annotated[str, typer.Option(
        "--model", help="a shipped checkpoint name or a checkpoint directory")] = "swarmoe-mini",
    random_weights: Annotated[bool, typer.Option(
        "--random", help="the plumbing demo on a tiny random-weight checkpoint instead")] = False,
    directory: Annotated[Path, typer.Option(
        "--dir", help="where runs, reports and (with --random) the tiny checkpoint go")] = Path(
        "/tmp/swarmoe-demo"),
    entities: Annotated[int, typer.Option(help="entities of the wide-search task")] = 100,
    attributes: Annotated[int, typer.Option(help="attributes asked per entity")] = 3,
    seed: Annotated[int, typer.Option(help="task seed (>= 2**31: never seen in training)")] = (
        HELD_OUT_SEED + 2026),
    deadline: Annotated[float, typer.Option(help="seconds allowed to each swarm run")] = 300.0,
    single_deadline: Annotated[float, typer.Option(
        help="seconds allowed to the single-agent baseline")] = 120.0,
    report_pages: Annotated[int | None, typer.Option(
        help="pages of the generated annual report (default: 40, or 120 with --random)")] = None,
    max_tokens: Annotated[int | None, typer.Option(
        help="tokens per model call (default: enough for the table; 24 with --random)")] = None,
    http: Annotated[bool, typer.Option(help="also run the task over HTTP (swarmoe serve)")] = True,
) -> None:
    """Run swarmoe-mini on an unseen 100-entity wide search (swarm vs one agent), an unseen
    annual report, and the same search over the OpenAI-compatible server. `--random`: the
    plumbing demo on random weights."""
    if random_weights:
        _random_demo(directory, 24 if max_tokens is None else max_tokens,
                     120 if report_pages is None else report_pages)
        return
    from swarmoe.checkpoints import MissingCheckpointError, local_checkpoint

    try:
        path = local_checkpoint(model)
    except MissingCheckpointError as exc:
        raise typer.BadParameter(f"{exc}. `swarmoe demo --random` runs the plumbing demo on "
                                 f"random weights.", param_hint="--model") from None
    if path is None:
        raise typer.BadParameter(f"{model!r} is neither a checkpoint directory nor a shipped "
                                 f"checkpoint name; the demo runs a local checkpoint",
                                 param_hint="--model")
    if entities < 1 or attributes < 1:
        raise typer.BadParameter("--entities and --attributes must be positive")
    if report_pages is not None and report_pages < 30:
        raise typer.BadParameter("a generated report has at least 30 pages",
                                 param_hint="--report-pages")
    if seed < HELD_OUT_SEED:
        typer.echo(f"warning: seed {seed} < 2**31 may be a task the model was trained on")
    _trained_demo(path, directory, entities, attributes, seed, deadline, single_deadline,
                  40 if report_pages is None else report_pages, max_tokens, http)


# -- the trained model ---------------------------------------------------------------------


class RunWatch:
    """Follows a run's events: sub-agents started and finished, tool results, and every tool
    call the model emitted, judged well-formed when its arguments parse as a JSON object and it
    names a tool that agent has. `on_line` hears a progress line now and then."""

    def __init__(self, tools: set[str], swarm_tools: bool = True,
                 on_line: Callable[[str], None] | None = None, every: float = 15.0) -> None:
        from swarmoe.swarm.swarm import ORCHESTRATOR, SWARM_TOOL_NAMES

        self.main = ORCHESTRATOR
        self.tools = set(tools)
        self.main_tools = self.tools | (SWARM_TOOL_NAMES if swarm_tools else set())
        self.on_line = on_line
        self.every = every
        self.started = time.monotonic()
        self.last_line = self.started
        self.subagents_started = self.subagents_done = 0
        self.model_calls = self.calls_emitted = self.calls_well_formed = 0
        self.tool_results = self.tool_errors = 0
        self.bad_calls: list[str] = []

    def __call__(self, event: Any) -> None:
        kind, agent = event.kind, event.agent
        if kind == "agent_start" and agent != self.main:
            self.subagents_started += 1
            if self.subagents_started == 1:
                self._say("first sub-agent started", force=True)
        elif kind == "agent_finish" and agent != self.main:
            self.subagents_done += 1
            if self.subagents_done == self.subagents_started:
                self._say("all sub-agents have answered; the orchestrator integrates", force=True)
            else:
                self._say("")
        elif kind == "llm_response":
            self.model_calls += 1
            allowed = self.main_tools if agent == self.main else self.tools
            for call in event.data.get("tool_calls") or ():
                fn = call.get("function") or {}
                self.calls_emitted += 1
                if fn.get("name") in allowed and _json_object(fn.get("arguments")):
                    self.calls_well_formed += 1
                elif len(self.bad_calls) < 5:
                    self.bad_calls.append(f"{fn.get('name')!r}({str(fn.get('arguments'))[:60]})")
            self._say("")
        elif kind == "tool_result":
            self.tool_results += 1
            self.tool_errors += bool(event.data.get("error"))

    @property
    def well_formed_rate(self) -> float | None:
        return self.calls_well_formed / self.calls_emitted if self.calls_emitted else None

    def _say(self, what: str, force: bool = False) -> None:
        now = time.monotonic()
        if self.on_line is None or not (force or now - self.last_line >= self.every):
            return
        self.last_line = now
        self.on_line(f"   [{now - self.started:6.1f} s] {self.model_calls} model calls, "
                     f"{self.subagents_done}/{self.subagents_started} sub-agents done, "
                     f"{self.tool_results} tool results" + (f" — {what}" if what else ""))


def _json_object(text: Any) -> bool:
    try:
        return isinstance(json.loads(text or "{}"), dict)
    except (TypeError, ValueError):
        return False


def table_tokens(entities: int, attributes: int) -> int:
    """A per-call token limit that fits the final table with room for reasoning."""
    return min(16384, 512 + entities * (14 + 10 * attributes))


def _echo(line: str) -> None:
    typer.echo(line)


def _trained_demo(path: Path, directory: Path, n: int, k: int, seed: int, deadline: float,
                  single_deadline: float, pages: int, max_tokens: int | None, http: bool) -> None:
    from swarmoe import LLM
    from swarmoe.tasks.tables import random_table
    from swarmoe.tasks.widesearch import make_task

    directory.mkdir(parents=True, exist_ok=True)
    runs = directory / "runs"
    started = time.monotonic()
    typer.echo(f"1. loading {path} into one in-process engine")
    llm = LLM(path, max_num_seqs=max(n, 16) + 8, max_num_batched_tokens=4096)
    c = llm.config.text
    params = sum(p.numel() for p in llm.model.parameters())
    typer.echo(f"   {params / 1e6:.1f}M parameters, {c.num_hidden_layers} layers, "
               f"{c.n_routed_experts} routed experts (top-{c.num_experts_per_tok}), "
               f"{llm.max_model_len} positions; up to {llm.scheduler.max_num_seqs} sequences "
               f"decode together")
    task = make_task(random_table(seed, entities=n + 5, attributes=k), entities=n, seed=seed)
    sampling = {"temperature": 0, "max_tokens": max_tokens or table_tokens(n, k)}
    typer.echo(f"\n2. wide search, unseen task (seed {seed}): {n} entries ({task.entity_column})"
               f" x {k} attributes ({', '.join(task.attributes)}); the corpus has "
               f"{len(task.corpus.pages)} pages, the tools are search and open_page")
    swarm = _wide(task, {"model": llm}, runs, sampling, deadline, single_agent=False)
    typer.echo(f"\n3. the same task on the same engine as a single agent "
               f"(deadline {single_deadline:g} s):")
    single = _wide(task, {"model": llm}, runs, sampling, single_deadline, single_agent=True)
    _compare(swarm, single)
    _report_recipe(llm, directory, seed, pages, deadline, max_tokens or 4096)
    if http:
        _over_http(llm, task, runs, sampling, deadline, swarm)
    typer.echo(f"\nDemo done in {time.monotonic() - started:.0f} s. Serve the model yourself: "
               f"swarmoe serve --model {path}")


def _wide(task: Any, options: dict[str, Any], runs: Path, sampling: dict[str, Any],
          deadline: float, single_agent: bool) -> Any:
    from swarmoe.tasks.widesearch import run_task

    watch = RunWatch({t.name for t in task.tools()}, swarm_tools=not single_agent, on_line=_echo)
    options = {**options, "runs_dir": runs, "sampling": sampling, "deadline": deadline,
               "on_event": watch}
    result = asyncio.run(run_task(task, options, single_agent=single_agent))
    _print_wide(result, watch)
    return result


def _print_wide(result: Any, w: RunWatch) -> None:
    g, s = result.grade, result.stats
    if result.stopped:
        typer.echo(f"   STOPPED without an answer: {result.stopped} (graded as no answer)")
    rate = w.well_formed_rate
    typer.echo(f"   item-F1 {g.item_f1:.3f}   row-F1 {g.row_f1:.3f}   exact {g.exact}   "
               f"({sum(c.correct for c in g.cells)}/{len(g.cells)} cells right)")
    typer.echo(f"   {s.subagents} sub-agents, {s.tool_calls} tool calls ({s.tool_errors} errors), "
               f"{s.total_steps} model calls, critical steps {s.critical_steps}, "
               f"wall {s.wall_seconds:.1f} s, {s.prompt_tokens + s.completion_tokens} tokens")
    typer.echo(f"   well-formed tool calls: {w.calls_well_formed}/{w.calls_emitted}"
               + (f" ({rate:.0%})" if rate is not None else "")
               + (f"; e.g. bad: {', '.join(w.bad_calls[:2])}" if w.bad_calls else ""))
    if g.parsed.error and result.answer:
        typer.echo(f"   the answer did not parse as a table: {g.parsed.error}")
    _print_cells(result)


def _print_cells(result: Any, rows: int = 6) -> None:
    """The first rows of the graded table: each cell as answered, ✓ or ✗ (expected value)."""
    task, g = result.task, result.grade
    by_entity: dict[str, list[Any]] = {}
    for cell in g.cells:
        by_entity.setdefault(cell.entity, []).append(cell)
    shown = list(by_entity)[:rows]
    if not shown:
        return
    typer.echo(f"   | {task.entity_column} | {' | '.join(task.attributes)} |")
    for entity in shown:
        cells = [f"{c.got or '-'} ✓" if c.correct else f"{c.got or '-'} ✗ ({c.expected})"
                 for c in by_entity[entity]]
        typer.echo(f"   | {entity} | {' | '.join(cells)} |")
    if len(by_entity) > rows:
        typer.echo(f"   ... {len(by_entity) - rows} more rows")


def _compare(swarm: Any, single: Any) -> None:
    a, b = swarm.stats, single.stats
    typer.echo("\n   swarm vs single agent, same model and engine:")
    typer.echo(f"   {'':14}{'item-F1':>9}{'row-F1':>9}{'crit.steps':>12}{'wall s':>9}  ended")
    for label, r in (("swarm", swarm), ("single agent", single)):
        typer.echo(f"   {label:14}{r.grade.item_f1:9.3f}{r.grade.row_f1:9.3f}"
                   f"{r.stats.critical_steps:12d}{r.stats.wall_seconds:9.1f}  "
                   f"{'stopped: ' + r.stopped if r.stopped else 'answered'}")
    if a.wall_seconds > 0:
        note = " (the single agent was cut off: a lower bound)" if single.stopped else ""
        typer.echo(f"   single / swarm wall time: {b.wall_seconds / a.wall_seconds:.2f}x{note}")


def replay_watch(run_id: str, runs_dir: Path, tools: set[str]) -> RunWatch:
    """A `RunWatch` fed with a finished run's journaled events (for runs whose `on_event` is
    taken, as the document recipe's is)."""
    from swarmoe.swarm.store import Journal

    watch = RunWatch(tools)
    journal = Journal.open(run_id, runs_dir)
    try:
        for event in journal.events():
            watch(event)
    finally:
        journal.close()
    return watch


class _Throttled:
    """Passes on at most one line per `every` seconds (the recipe's per-read progress)."""

    def __init__(self, every: float = 15.0) -> None:
        self.every, self.last, self.lines = every, time.monotonic(), 0
        self.started = self.last

    def __call__(self, line: str) -> None:
        self.lines += 1
        now = time.monotonic()
        if now - self.last >= self.every and not line.startswith("plan "):
            self.last = now
            typer.echo(f"   [{now - self.started:6.1f} s] {self.lines} reads so far, e.g. {line}")


def _report_recipe(llm: Any, directory: Path, seed: int, pages: int, deadline: float,
                   max_tokens: int) -> None:
    from swarmoe.docs.recipe import analyze
    from swarmoe.docs.tools import DocumentTools
    from swarmoe.swarm import RunStopped
    from swarmoe.tasks.report import make_report_task

    task = make_report_task(seed, pages, directory / "reports")
    subagents = min(100, -(-pages // 3))  # ~3 pages a sub-agent, as in training
    typer.echo(f"\n4. the long-document recipe on an unseen {task.num_pages}-page annual report "
               f"({task.path}, {len(task.facts)} planted facts), {subagents} sub-agents:")
    tools = DocumentTools([task.path], cache_dir=directory / "cache")
    runs = directory / "runs"
    started = time.monotonic()
    try:
        analysis = asyncio.run(analyze(
            tools, task.question, llm, max_subagents=subagents, runs_dir=runs,
            on_progress=_Throttled(), sampling={"temperature": 0, "max_tokens": max_tokens},
            deadline=deadline))
    except RunStopped as exc:
        typer.echo(f"   STOPPED without a report: {exc.reason}")
        return
    s = analysis.result.stats
    watch = replay_watch(analysis.result.run_id, runs, {t.name for t in tools.tools()})
    grade = task.grade(analysis.report)
    precision = "n/a" if grade.precision is None else f"{grade.precision:.3f}"
    typer.echo(f"   cited recall {grade.cited_recall:.3f} "
               f"({sum(f.cited for f in grade.facts)}/{len(grade.facts)} facts stated and cited "
               f"on their page)   precision {precision}   recall (cited or not) "
               f"{grade.recall:.3f}")
    typer.echo(f"   {s.subagents} sub-agents, {s.tool_calls} tool calls "
               f"({watch.calls_well_formed}/{watch.calls_emitted} well-formed), critical steps "
               f"{s.critical_steps}, wall {time.monotonic() - started:.1f} s, "
               f"{len(analysis.coverage.covered())} of {task.num_pages} pages read")
    lines = [line for line in analysis.report.splitlines() if line.strip()]
    for line in lines[:6]:
        typer.echo(f"   > {line[:110]}")
    if not lines:
        typer.echo("   (the report is empty)")


def _over_http(llm: Any, task: Any, runs: Path, sampling: dict[str, Any], deadline: float,
               in_process: Any) -> None:
    import openai

    from swarmoe.engine.async_engine import AsyncEngine
    from swarmoe.server import create_app
    from swarmoe.server.background import serve_in_thread

    engine = AsyncEngine(llm)
    try:
        with serve_in_thread(create_app(engine, _SERVED)) as url:
            client = openai.OpenAI(base_url=url + "/v1", api_key="not-needed")
            typer.echo(f"\n5. the same wide search through swarmoe serve: {url}/v1 (127.0.0.1), "
                       f"models {[m.id for m in client.models.list()]}; the swarm calls it with "
                       f"the openai client")
            result = _wide(task, {"model": _SERVED, "base_url": url + "/v1",
                                  "api_key": "not-needed"}, runs, sampling, deadline, False)
    finally:
        engine.shutdown()
    same = "the same answer as" if result.answer == in_process.answer else "an answer unlike"
    typer.echo(f"   over HTTP: {same} the in-process run (wall {result.stats.wall_seconds:.1f} s "
               f"vs {in_process.stats.wall_seconds:.1f} s)")


# -- the plumbing demo on random weights ----------------------------------------------------


def _random_demo(directory: Path, max_tokens: int, report_pages: int) -> None:
    """Make a tiny random checkpoint, serve it on 127.0.0.1, chat with it via openai, run a
    swarm on it over HTTP, and run the long-document recipe on a generated annual report."""
    import openai

    from swarmoe import LLM
    from swarmoe.engine.async_engine import AsyncEngine
    from swarmoe.server import create_app
    from swarmoe.server.background import serve_in_thread
    from swarmoe.testing import make_tiny_checkpoint

    typer.echo(_NOISE + "\n")
    # A long context, so the document recipe's outline fits in the orchestrator's prompt.
    path = make_tiny_checkpoint(directory, int4=True, max_position_embeddings=16384)
    typer.echo(f"1. wrote a tiny random K2 checkpoint (INT4 experts) to {path}")
    engine = AsyncEngine(LLM(path, max_num_seqs=8))
    try:
        with serve_in_thread(create_app(engine, "swarmoe-tiny")) as url:
            typer.echo(f"2. serving it at {url}/v1 (127.0.0.1 only)")
            client = openai.OpenAI(base_url=url + "/v1", api_key="not-needed")
            typer.echo(f"3. models: {[m.id for m in client.models.list()]}")
            _chat(client, max_tokens)
            _stream(client, max_tokens)
            _tool_call(client, max_tokens)
            _swarm(url, directory, max_tokens)
            _report(url, directory, report_pages, max_tokens)
    finally:
        engine.shutdown()
    typer.echo("\n" + _NOISE)
    typer.echo(f"Serve it yourself: swarmoe serve --model {path}")
    typer.echo("The trained model: swarmoe demo (swarmoe-mini)")


def _chat(client, max_tokens: int) -> None:
    r = client.chat.completions.create(
        model="swarmoe-tiny", max_tokens=max_tokens, temperature=0,
        messages=[{"role": "user", "content": "What is a mixture of experts?"}])
    msg = r.choices[0].message
    typer.echo("\n4. chat (thinking on, so the noise lands in reasoning_content):")
    typer.echo(f"   reasoning_content: {getattr(msg, 'reasoning_content', None)!r}")
    typer.echo(f"   content:           {msg.content!r}")
    typer.echo(f"   finish_reason={r.choices[0].finish_reason}  usage={r.usage.model_dump()}")


def _stream(client, max_tokens: int) -> None:
    typer.echo("\n5. streaming chat (thinking off), chunk by chunk:\n   ", nl=False)
    stream = client.chat.completions.create(
        model="swarmoe-tiny", max_tokens=max_tokens, temperature=0, stream=True,
        messages=[{"role": "user", "content": "Count to five."}],
        extra_body={"chat_template_kwargs": {"thinking": False}})
    for chunk in stream:
        for choice in chunk.choices:
            if choice.delta.content:
                typer.echo(repr(choice.delta.content), nl=False)
                typer.echo(" ", nl=False)
    typer.echo("")


def _tool_call(client, max_tokens: int) -> None:
    r = client.chat.completions.create(
        model="swarmoe-tiny", max_tokens=max_tokens, temperature=0, tools=[_WEATHER],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        messages=[{"role": "user", "content": "Weather in Paris?"}])
    typer.echo("\n6. tool call (tool_choice names get_weather; the server opens the call and")
    typer.echo("   the model writes the arguments, which from random weights are not JSON):")
    for call in r.choices[0].message.tool_calls or []:
        typer.echo(f"   id={call.id} name={call.function.name} arguments={call.function.arguments!r}")
    typer.echo(f"   finish_reason={r.choices[0].finish_reason}")


def _swarm(url: str, directory: Path, max_tokens: int) -> None:
    from swarmoe import Swarm

    typer.echo("\n7. an agent swarm on the same server (OpenAI backend over HTTP):")
    swarm = Swarm(model="swarmoe-tiny", base_url=url + "/v1", api_key="not-needed",
                  runs_dir=directory / "runs", sampling={"max_tokens": max_tokens, "temperature": 0})
    result = swarm.run_sync("Compare three ways to shard a trillion-parameter MoE.")
    s = result.stats
    typer.echo(f"   run {result.run_id}: {s.total_steps} model calls, {s.subagents} sub-agents, "
               f"critical steps {s.critical_steps}, {s.prompt_tokens + s.completion_tokens} tokens")
    typer.echo(f"   answer: {result.answer!r}")
    typer.echo(f"   timeline: swarmoe trace {result.run_id} --runs-dir {directory / 'runs'}")


def _report(url: str, directory: Path, pages: int, max_tokens: int) -> None:
    from swarmoe.docs.recipe import analyze
    from swarmoe.docs.synthetic import generate_report
    from swarmoe.docs.tools import DocumentTools

    pdf = directory / "annual-report.pdf"
    report = generate_report(pdf, pages=pages)
    typer.echo(f"\n8. the long-document recipe on a generated {pages}-page annual report ({pdf},"
               f" {len(report.facts)} planted facts):")
    tools = DocumentTools([pdf], cache_dir=directory / "cache")
    doc = next(iter(tools.docs.values()))
    hit = doc.search("capital expenditure", k=1)[0]
    typer.echo(f"   search 'capital expenditure' -> page {hit.page + 1}: {hit.text[:70]!r}")
    from swarmoe.swarm import RunStopped

    try:
        analysis = asyncio.run(analyze(
            tools, "What were the main figures, segment results and risks?", "swarmoe-tiny",
            max_subagents=10, base_url=url + "/v1", api_key="not-needed", runs_dir=directory / "runs",
            sampling={"max_tokens": max_tokens, "temperature": 0}))
    except RunStopped as exc:  # noise can end a run early; the demo goes on
        typer.echo(f"   the run stopped: {exc.reason}")
        return
    typer.echo(f"   plan: {len(analysis.plan)} sub-agents over page ranges, e.g. {analysis.plan[0].line()}")
    typer.echo(f"   report from the random-weight model (noise): {analysis.report[:120]!r}")
    typer.echo("   with a real model: swarmoe analyze REPORT.pdf --question '...' --model kimi-k2.5")


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)
