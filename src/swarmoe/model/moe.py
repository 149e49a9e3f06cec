"""The MoE block: sigmoid router with `noaux_tc` selection, routed experts, shared experts.

Dispatch never loops over all experts: (token, expert) pairs are sorted by expert, only experts
that received tokens run (one fused gate/up GEMM and one down GEMM each), and results are
combined with `index_add_`. Expert weights come from an `ExpertWeights` provider, so the same
dispatch serves full-precision stacked weights, packed INT4 / FP8 experts dequantised on use,
and an engine's offloaded expert cache.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from swarmoe.config import TextConfig


class ExpertWeights(Protocol):
    """Source of one layer's routed-expert weights."""

    num_experts: int

    def expert(self, e: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate_up [2I, H], down [H, I]) of expert e in `dtype`."""
        ...


class DenseExperts(nn.Module):
    """Full-precision experts stacked per layer: gate and up fused so each expert is two GEMMs."""

    def __init__(self, num_experts: int, hidden: int, inter: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.gate_up = nn.Parameter(torch.empty(num_experts, 2 * inter, hidden))
        self.down = nn.Parameter(torch.empty(num_experts, hidden, inter))

    thread_safe = True  # expert() only reads: dispatch may call it from several threads

    def expert(self, e: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return self.gate_up[e].to(dtype), self.down[e].to(dtype)

    def stacked(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor] | None:
        """All experts as (gate_up [E,2I,H], down [E,H,I]) for grouped GEMMs, when no conversion
        is needed (converting every expert to use a few would cost more than it saves)."""
        if self.gate_up.dtype != dtype or not hasattr(torch, "_grouped_mm"):
            return None
        return self.gate_up, self.down


class MLP(nn.Module):
    """SwiGLU MLP: the dense layers and the shared experts."""

    def __init__(self, hidden: int, inter: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    """Sigmoid scores; the correction bias picks experts but never weights them."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        e = cfg.n_routed_experts
        self.top_k = cfg.num_experts_per_tok
        self.n_group = cfg.n_group
        self.topk_group = cfg.topk_group
        self.norm_topk_prob = cfg.norm_topk_prob
        self.scaling = cfg.routed_scaling_factor
        # Kept in float32 whatever the model dtype, as the reference does.
        self.weight = nn.Parameter(torch.empty(e, cfg.hidden_size, dtype=torch.float32))
        self.register_buffer("e_score_correction_bias", torch.zeros(e, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N,H] -> (indices [N,k], weights [N,k] float32)."""
        scores = F.linear(x.float(), self.weight.float()).sigmoid()
        choice = scores + self.e_score_correction_bias
        if self.topk_group < self.n_group:
            n = choice.shape[0]
            grouped = choice.view(n, self.n_group, -1)
            group_scores = grouped.topk(2, dim=-1).values.sum(-1)
            keep = group_scores.topk(self.topk_group, dim=-1, sorted=False).indices
            group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
            choice = grouped.masked_fill(~group_mask[..., None], float("-inf")).view(n, -1)
        indices = choice.topk(self.top_k, dim=-1, sorted=False).indices
        weights = scores.gather(1, indices)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return indices, weights * self.scaling


def dispatch(
    x: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    experts: ExpertWeights,
    *,
    shared: nn.Module | None = None,
) -> torch.Tensor:
    """Run each token through its chosen experts; x [N,H], indices/weights [N,k].

    `shared` (the shared experts), when given, runs alongside the routed experts and is added.
    """
    n, k = indices.shape
    flat = indices.reshape(-1)
    order = flat.argsort(stable=True)
    token = order // k
    counts = torch.bincount(flat, minlength=experts.num_experts)
    if torch.is_grad_enabled():
        y = _dispatch_autograd(x, token, order, counts, weights, experts)
        return y + shared(x) if shared is not None else y
    active = counts.nonzero().flatten()
    ids = active.tolist()
    ends = counts.index_select(0, active).cumsum(0).tolist()
    xs = x.index_select(0, token)
    threads = torch.get_num_threads()
    parallel = threads > 1 and x.shape[-1] >= PARALLEL_MIN_HIDDEN and x.device.type == "cpu"
    # Contiguous runs of active experts: (first, end) indices into ids/ends, one per worker.
    shared_cost = 1.0 + n / ROWS_PER_EXPERT_READ if shared is not None else 0.0
    parts = _partition(ends, threads if parallel else 1, shared_cost)
    stacked = getattr(experts, "stacked", None)
    stacks = stacked(x.dtype) if stacked is not None else None
    lock = None if getattr(experts, "thread_safe", False) else threading.Lock()

    def run(part: int) -> torch.Tensor:
        first, last = parts[part]
        return _run_experts(ids[first:last], ends, first, last, xs, experts, stacks, lock)

    if parallel:
        outs, shared_out = _run_parallel(run, len(parts), shared, x, threads)
    else:
        outs = [run(0)]
        shared_out = shared(x) if shared is not None else None
    out = outs[0] if len(outs) == 1 else torch.cat(outs)
    # Routing weights stay float32 until the product is rounded, as the reference does.
    out.mul_(weights.reshape(-1).index_select(0, order).unsqueeze(1))
    # Back to (token, slot) order and sum the k slots: a gather and a reduction, no scatter.
    y = out.index_select(0, order.argsort()).view(n, k, -1).sum(1)
    return y if shared_out is None else y + shared_out


# Below this hidden size dispatch stays on the calling thread: the work per expert is too small
# for the hand-off to workers to pay.
PARALLEL_MIN_HIDDEN = 256
# Rows of tokens that cost about as much compute as reading one expert's weights (balancing).
ROWS_PER_EXPERT_READ = 12


def _partition(ends: list[int], parts: int, shared_cost: float) -> list[tuple[int, int]]:
    """Split the active experts into `parts` contiguous runs of about equal cost.

    An expert costs one read of its weights plus its rows / ROWS_PER_EXPERT_READ; the shared
    expert (cost `shared_cost`) goes with the first run.
    """
    count = len(ends)
    if parts == 1 or count == 0:
        return [(0, count)]
    total = count + ends[-1] / ROWS_PER_EXPERT_READ + shared_cost
    bounds = [0]
    done = shared_cost
    for i in range(count):
        if len(bounds) < parts and done >= total * len(bounds) / parts:
            bounds.append(i)
        done += 1.0 + (ends[i] - (ends[i - 1] if i else 0)) / ROWS_PER_EXPERT_READ
    bounds.append(count)
    return [(a, b) for a, b in zip(bounds, bounds[1:], strict=False) if b > a or a == 0]


def _run_experts(
    ids: list[int],
    ends: list[int],
    first: int,
    last: int,
    xs: torch.Tensor,
    experts: ExpertWeights,
    stacks: tuple[torch.Tensor, torch.Tensor] | None,
    lock: threading.Lock | None,
) -> torch.Tensor:
    """Active experts ids (= active[first:last]) over their rows of xs, sorted by expert."""
    start = ends[first - 1] if first else 0
    stop = ends[last - 1] if last > first else start
    rows = xs[start:stop]
    if not ids:
        return rows.new_empty(0, xs.shape[1])
    if stacks is not None and ids[-1] + 1 - ids[0] <= GROUPED_MAX_SPAN * len(ids):
        # One grouped GEMM per projection over the experts ids[0]..ids[-1] (stacked weights are a
        # view, nothing is gathered); experts in between without tokens have empty groups.
        lo, hi = ids[0], ids[-1] + 1
        offs = torch.zeros(hi - lo, dtype=torch.int64)
        local = torch.tensor(ids, dtype=torch.int64) - lo
        offs.index_copy_(0, local, torch.tensor(ends[first:last], dtype=torch.int64) - start)
        offs = offs.cummax(0).values.to(torch.int32)
        gate_up, down = stacks
        h = torch._grouped_mm(rows, gate_up[lo:hi].transpose(1, 2), offs=offs)
        gate, up = h.chunk(2, dim=-1)
        return torch._grouped_mm(F.silu(gate, inplace=True).mul_(up), down[lo:hi].transpose(1, 2), offs=offs)
    out = torch.empty_like(rows)
    row = 0
    weight_left = xs.dtype in WEIGHT_LEFT
    for i, e in enumerate(ids):
        end = ends[first + i] - start
        if lock is None:
            gate_up, down = experts.expert(e, xs.dtype)
        else:
            with lock:
                gate_up, down = experts.expert(e, xs.dtype)
        if weight_left:
            # (W @ x^T)^T: the weight as the left operand, which oneDNN runs faster for bf16.
            h = torch.mm(gate_up, rows[row:end].t())
            inter = h.shape[0] // 2
            act = F.silu(h[:inter], inplace=True).mul_(h[inter:])
            torch.mm(down, act, out=out[row:end].t())
        else:
            h = torch.mm(rows[row:end], gate_up.t())
            gate, up = h.chunk(2, dim=-1)
            torch.mm(F.silu(gate, inplace=True).mul_(up), down.t(), out=out[row:end])
        row = end
    return out


# A run of experts uses grouped GEMMs when it spans at most this many experts per active one
# (each expert in the span costs an empty group); sparse runs loop over their experts.
GROUPED_MAX_SPAN = 4
# Dtypes whose small GEMMs run faster with the weight as the left operand.
WEIGHT_LEFT = {torch.bfloat16}


def _run_parallel(
    run: Callable[[int], torch.Tensor],
    parts: int,
    shared: nn.Module | None,
    x: torch.Tensor,
    threads: int,
) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """Expert parallelism: each worker owns a contiguous run of experts, one thread each.

    On a CPU, splitting every small GEMM across cores costs a fork/join per GEMM (hundreds per
    layer, each stalling when a core is busy elsewhere); giving each core whole experts streams
    their weights with no synchronisation until the layer ends, as llama.cpp and KTransformers do.
    The shared expert runs on the first worker, which gets fewer routed experts for it.
    """
    # Grad mode and inference mode are per thread: carry the caller's into the workers.
    inference = torch.is_inference_mode_enabled()

    def work(part: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        with torch.inference_mode(inference), torch.no_grad():
            shared_out = shared(x) if part == 0 and shared is not None else None
            return run(part), shared_out

    pool = _expert_pool(threads)
    results = [f.result() for f in [pool.submit(work, part) for part in range(parts)]]
    return [out for out, _ in results], results[0][1]


_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_pool_lock = threading.Lock()


def _expert_pool(threads: int) -> ThreadPoolExecutor:
    """`threads` persistent workers whose torch ops run single-threaded."""
    global _pool, _pool_size
    with _pool_lock:
        if _pool is None or _pool_size != threads:
            if _pool is not None:
                _pool.shutdown(wait=False)
            ready = threading.Barrier(threads + 1)

            def init() -> None:
                torch.set_num_threads(1)
                ready.wait()

            pool = ThreadPoolExecutor(threads, thread_name_prefix="swarmoe-experts", initializer=init)
            for _ in range(threads):
                pool.submit(int)
            ready.wait()
            # torch.set_num_threads also sets the default that new threads start with: restore it.
            torch.set_num_threads(threads)
            _pool, _pool_size = pool, threads
        return _pool


def _forget_pool() -> None:
    global _pool, _pool_size
    _pool, _pool_size = None, 0


os.register_at_fork(after_in_child=_forget_pool)


def _dispatch_autograd(
    x: torch.Tensor,
    token: torch.Tensor,
    order: torch.Tensor,
    counts: torch.Tensor,
    weights: torch.Tensor,
    experts: ExpertWeights,
) -> torch.Tensor:
    """The same computation, differentiable (no `out=`, no in-place), on the calling thread."""
    xs = x.index_select(0, token)
    ws = weights.reshape(-1).index_select(0, order)
    active = counts.nonzero().flatten()
    outs = []
    start = 0
    for e, count in zip(active.tolist(), counts.index_select(0, active).tolist(), strict=True):
        end = start + count
        gate_up, down = experts.expert(e, x.dtype)
        gate, up = F.linear(xs[start:end], gate_up).chunk(2, dim=-1)
        outs.append(F.linear(F.silu(gate) * up, down))
        start = end
    out = torch.cat(outs) * ws.unsqueeze(1)
    return torch.zeros_like(x).index_add_(0, token, out.to(x.dtype))


RoutingHook = Callable[[int, torch.Tensor], None]


class MoE(nn.Module):
    def __init__(self, cfg: TextConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.gate = Router(cfg)
        self.experts: nn.Module = DenseExperts(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        self.shared_experts = (
            MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts)
            if cfg.n_shared_experts
            else None
        )
        self.routing_hooks: list[RoutingHook] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        indices, weights = self.gate(flat)
        for hook in self.routing_hooks:
            hook(self.layer_idx, indices)
        y = dispatch(flat, indices, weights, self.experts, shared=self.shared_experts)
        return y.view(shape)


@dataclass
class LayerStats:
    tokens_per_expert: torch.Tensor
    tokens: int = 0

    @property
    def experts_touched(self) -> int:
        return int((self.tokens_per_expert > 0).sum())

    @property
    def max_load(self) -> int:
        return int(self.tokens_per_expert.max())

    @property
    def mean_load(self) -> float:
        return float(self.tokens_per_expert.float().mean())

    @property
    def cv(self) -> float:
        """Coefficient of variation of the per-expert load: 0 is perfectly balanced."""
        load = self.tokens_per_expert.float()
        mean = load.mean()
        return float(load.std(unbiased=False) / mean) if mean > 0 else 0.0


@dataclass
class RoutingStats:
    """Per-layer routing statistics collected through the MoE routing hooks.

    Use as a context manager around forward passes: `with RoutingStats.attach(model) as s: ...`.
    """

    layers: dict[int, LayerStats] = field(default_factory=dict)
    _moes: list[MoE] = field(default_factory=list, repr=False)

    @classmethod
    def attach(cls, model: nn.Module) -> RoutingStats:
        stats = cls()
        for module in model.modules():
            if isinstance(module, MoE):
                module.routing_hooks.append(stats.record)
                stats._moes.append(module)
        return stats

    def record(self, layer: int, indices: torch.Tensor) -> None:
        moe = next(m for m in self._moes if m.layer_idx == layer)
        counts = torch.bincount(indices.reshape(-1).cpu(), minlength=moe.experts.num_experts)
        if layer not in self.layers:
            self.layers[layer] = LayerStats(torch.zeros_like(counts))
        entry = self.layers[layer]
        entry.tokens_per_expert += counts
        entry.tokens += indices.shape[0]

    def detach(self) -> None:
        for moe in self._moes:
            if self.record in moe.routing_hooks:
                moe.routing_hooks.remove(self.record)
        self._moes.clear()

    def __enter__(self) -> RoutingStats:
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()

    def rows(self) -> list[dict[str, float | int]]:
        return [
            {
                "layer": layer,
                "tokens": s.tokens,
                "experts_touched": s.experts_touched,
                "max_load": s.max_load,
                "mean_load": round(s.mean_load, 3),
                "cv": round(s.cv, 3),
            }
            for layer, s in sorted(self.layers.items())
        ]
