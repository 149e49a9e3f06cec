"""The MoE block: sigmoid router with `noaux_tc` selection, routed experts, shared experts.

Dispatch never loops over all experts: (token, expert) pairs are grouped by expert and only
experts that received tokens run. Three ways, fastest first where they apply:

- the whole layer in one call of the native kernels (`kernels.c`, `_moe_fused`): stacked
  full-precision experts, float32 or bfloat16 on an AVX-512 CPU;
- tasks over runs of experts on persistent worker threads (`_Plan`), each calling the native
  expert kernels (`swarmoe_experts`) or, where those are unavailable, PyTorch's GEMMs; expert
  weights come from an `ExpertWeights` provider, so this serves packed INT4 / FP8 experts
  dequantised on use and an engine's offloaded expert cache too;
- a differentiable loop with `index_add_` when autograd is on.
"""

from __future__ import annotations

import itertools
import os
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from swarmoe.config import TextConfig
from swarmoe.model import grouped, kernels
from swarmoe.model.linear import Linear
from swarmoe.model.quant import FP8_BLOCK, INT4_GROUP, Fp8Experts, Int4Experts


class ExpertWeights(Protocol):
    """Source of one layer's routed-expert weights. A provider of INT4 experts may also offer
    `int4(e)` -> (gate_up, its scales, down, its scales) packed, or None: the native kernels then
    run them packed instead of asking `expert` for dequantised copies."""

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
        self.gate_proj = Linear(hidden, inter, bias=False)
        self.up_proj = Linear(hidden, inter, bias=False)
        self.down_proj = Linear(inter, hidden, bias=False)

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
        return self.select(self.logits(x))

    def logits(self, x: torch.Tensor, experts: slice = slice(None)) -> torch.Tensor:
        """Router logits [N, E] in float32 (of the experts in `experts` only, if given)."""
        weight = self.weight[experts]
        weight = weight if weight.dtype == torch.float32 else weight.float()
        return F.linear(x if x.dtype == torch.float32 else x.float(), weight)

    def select(self, logits: torch.Tensor, scored: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits [N,E] (overwritten; or sigmoid scores already, when `scored`) ->
        (indices [N,k], weights [N,k] float32)."""
        scores = logits if scored else logits.sigmoid_()
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
            weights /= weights.sum(-1, keepdim=True).add_(1e-20)
        return indices, weights.mul_(self.scaling)


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
    if torch.is_grad_enabled():
        y = _dispatch_autograd(x, indices, weights, experts)
        return y + shared(x) if shared is not None else y
    threads = _worker_threads(x)
    plan = _Plan(x, indices, weights, experts, threads)
    shared_out: list[torch.Tensor] = []
    if shared is not None:
        task = _shared_task(shared, x)
        plan.tasks.insert(0, lambda: shared_out.append(task()))
    if threads:
        _run_on_workers([plan.drain] * min(threads, len(plan.tasks)), threads)
    else:
        plan.drain()
    return plan.finish(shared_out)


# Below this hidden size dispatch stays on the calling thread: the work per expert is too small
# for the hand-off to workers to pay.
PARALLEL_MIN_HIDDEN = 256
# Rows of tokens that cost about as much compute as reading one expert's weights (balancing).
ROWS_PER_EXPERT_READ = 12
# Work items per worker: active experts are cut into this many runs per worker, which workers
# take in turn, so that one that starts late (it was routing or running the shared experts) or
# runs slower evens out.
TASKS_PER_WORKER = 6
# Up to this many (token, slot) pairs, dispatch groups them by expert in Python (decode).
DIRECT_PAIRS = 64
# The native kernels run experts of up to about this many rows on average (more rows: the stock
# GEMMs' blocking does better than streaming each weight once for every row).
KERNEL_MAX_ROWS = 32
# From this many tokens the router GEMM is split between two workers.
ROUTER_SPLIT_ROWS = 16


def _worker_threads(x: torch.Tensor) -> int:
    """Worker threads for expert parallelism over x, 0 to stay on the calling thread."""
    threads = torch.get_num_threads()
    if threads > 1 and x.shape[-1] >= PARALLEL_MIN_HIDDEN and x.is_cpu and not torch.is_grad_enabled():
        return threads
    return 0


class _Plan:
    """One inference dispatch: the (token, slot) pairs grouped by expert, and the work over them
    as tasks that workers take in turn (`drain`), each writing its own pairs' rows of `out`.

    Expert parallelism: on a CPU, splitting every small GEMM across cores costs a fork/join per
    GEMM (hundreds per layer, each stalling when a core is busy elsewhere); giving each core whole
    experts streams their weights with no synchronisation until the layer ends, as llama.cpp and
    KTransformers do. Taking tasks in turn (rather than a fixed share each) evens out workers that
    start late (one was routing or running the shared experts) or run slower.
    """

    def __init__(
        self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, experts: ExpertWeights, threads: int
    ) -> None:
        n, k = indices.shape
        self.shape = (n, k)
        self.weights = weights
        self._taken = itertools.count()  # next() on a count is atomic under the GIL
        stacked = getattr(experts, "stacked", None)
        stacks = stacked(x.dtype) if stacked is not None else None
        lock = None if getattr(experts, "thread_safe", False) else threading.Lock()
        kern = kernels.expert_kernels() if kernels.ExpertKernels.supports(x) else None
        parts = TASKS_PER_WORKER * threads if threads else 1
        if n * k <= DIRECT_PAIRS:
            # Decode: group the few (token, slot) pairs by expert in Python (a handful of tensor
            # ops fewer: with caches cold, each op costs tens of microseconds) and write each
            # expert's rows straight to their (token, slot) rows of out.
            slots: dict[int, list[int]] = {}
            for i, e in enumerate(itertools.chain.from_iterable(indices.tolist())):
                slots.setdefault(e, []).append(i)
            if kern is not None:
                pairs = kernels.int64s(list(itertools.chain.from_iterable(slots.values())))
                ends = list(itertools.accumulate(len(s) for s in slots.values()))
                self._native(kern, list(slots), ends, pairs, x, experts, stacks, lock, parts)
                return
            self.weighted = False
            self.out = out = x.new_empty(n * k, x.shape[1])
            self.tasks = [
                lambda e=e, s=s: _run_direct(e, s, k, x, out, experts, stacks, lock) for e, s in slots.items()
            ]
            return
        flat = indices.reshape(-1)
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=experts.num_experts)
        active = counts.nonzero().flatten()
        ids = active.tolist()
        ends = counts.index_select(0, active).cumsum(0).tolist()
        if kern is not None and n * k <= KERNEL_MAX_ROWS * len(ids):
            self._native(kern, ids, ends, order, x, experts, stacks, lock, parts)
            return
        # Each task gathers its own rows, weights its results and puts them back in (token, slot)
        # order itself: that work runs in parallel instead of before and after the experts.
        pairs = (order, order // k, weights.reshape(-1).index_select(0, order))
        self.out = out = x.new_empty(n * k, x.shape[1])
        self.tasks: list[Callable[[], object]] = [
            lambda first=first, last=last: _run_experts(
                ids[first:last], ends, first, last, pairs, x, out, experts, stacks, lock)
            for first, last in _partition(ends, parts)
        ]
        self.weighted = True

    def _native(
        self,
        kern: kernels.ExpertKernels,
        ids: list[int],
        ends: list[int],
        pairs: torch.Tensor | kernels.Addresses,
        x: torch.Tensor,
        experts: ExpertWeights,
        stacks: tuple[torch.Tensor, torch.Tensor] | None,
        lock: threading.Lock | None,
        parts: int,
    ) -> None:
        """Tasks that run runs of experts through the native kernels: each gathers its pairs'
        rows, runs its experts and writes their weighted rows of out, with no Python between
        experts when the weights are stacked."""
        n, k = self.shape
        # The kernels read where they are told: check what PyTorch's kernels would have.
        if min(ids) < 0 or max(ids) >= experts.num_experts:
            raise IndexError(f"expert index out of range [0, {experts.num_experts}): {min(ids)}..{max(ids)}")
        if stacks is not None and stacks[0].shape[2] != x.shape[1]:
            raise RuntimeError(f"hidden size mismatch: x has {x.shape[1]}, the experts {stacks[0].shape[2]}")
        self.weighted = True
        weights = self.weights.to(torch.float32).contiguous()
        ends_at = kernels.int64s(ends)
        pairs_at = pairs.data_ptr() if isinstance(pairs, torch.Tensor) else kernels.address(pairs)
        # The arrays the kernels read stay referenced by the plan until it is dropped.
        self._kept = (weights, ends_at, pairs)
        self.out = x.new_empty(n * k, x.shape[1])
        common = (kernels.address(ends_at), pairs_at, k, weights.data_ptr(), x, self.out)
        if stacks is not None and all(s.is_contiguous() for s in stacks):
            gate_up, down = stacks
            inter = gate_up.shape[1] // 2
            size = gate_up.element_size()
            base, step = gate_up.data_ptr(), gate_up.stride(0) * size
            gates = kernels.int64s([base + e * step for e in ids])
            ups = kernels.int64s([a + inter * gate_up.stride(1) * size for a in gates])
            base, step = down.data_ptr(), down.stride(0) * size
            downs = kernels.int64s([base + e * step for e in ids])
            self._kept += (gates, ups, downs)
            at = [kernels.address(a) for a in (gates, ups, downs)]
            self.tasks = [
                lambda first=first, last=last: kern.experts(
                    first, last, at[0] + 8 * first, at[1] + 8 * first, at[2] + 8 * first, *common, inter)
                for first, last in _partition(ends, parts)
            ]
            return

        packed_of = getattr(experts, "int4", None)

        def run(first: int, last: int) -> None:
            for j in range(first, last):
                packed = packed_of(ids[j]) if packed_of is not None else None
                if packed is not None and _run_int4(kern, j, packed, x, common):
                    continue
                gate_up, down = _expert_weights(ids[j], x.dtype, experts, None, lock)
                gate_up, down = gate_up.contiguous(), down.contiguous()
                if gate_up.shape[1] != x.shape[1]:
                    raise RuntimeError(f"hidden size mismatch: x has {x.shape[1]}, expert {ids[j]} {gate_up.shape[1]}")
                inter = gate_up.shape[0] // 2
                gate = gate_up.data_ptr()
                at = kernels.int64s([gate, gate + inter * gate_up.stride(0) * gate_up.element_size(), down.data_ptr()])
                base = kernels.address(at)
                kern.experts(j, j + 1, base, base + 8, base + 16, *common, inter)

        self.tasks = [lambda first=first, last=last: run(first, last) for first, last in _partition(ends, parts)]

    def drain(self) -> None:
        """Run tasks not yet taken by another thread until none is left."""
        for i in self._taken:
            if i >= len(self.tasks):
                return
            self.tasks[i]()

    def finish(self, shared_out: list[torch.Tensor]) -> torch.Tensor:
        """The weighted sum over each token's experts, plus the shared experts' outputs."""
        n, k = self.shape
        out = self.out.view(n, k, self.out.shape[1])
        if not self.weighted:
            # Weights stay float32 until the product is rounded, as the reference does.
            out.mul_(self.weights.unsqueeze(-1))
        y = out.sum(1)
        for part in shared_out:
            y += part
        return y


def _run_on_workers(jobs: list[Callable[[], object]], threads: int) -> None:
    """Run each job on an expert worker, in the caller's inference mode, and wait for all."""
    # Grad mode and inference mode are per thread: carry the caller's into the workers.
    _expert_pool(threads).run(jobs, torch.is_inference_mode_enabled())


def _moe_on_workers(layer: MoE, x: torch.Tensor, threads: int) -> torch.Tensor:
    """MoE.forward with everything but the final sum on the workers: a lead worker routes, calls
    the routing hooks and plans the dispatch while another runs the shared experts (which need
    no routing); then all take expert tasks in turn. One hand-off to the workers and one back:
    each costs a thread wake-up, which on a busy machine can cost more than the GEMVs."""
    plan: list[_Plan] = []
    shared_out: list[torch.Tensor] = []
    # Latches (held until released once; cheaper than Events): the plan is ready, the other
    # router half is computed.
    planned, other_done = threading.Lock(), threading.Lock()
    planned.acquire()
    other_done.acquire()
    gate = layer.gate
    # Many rows: the router GEMM is worth splitting (by experts) between the lead and a helper.
    split = x.shape[0] >= ROUTER_SPLIT_ROWS and type(gate) is Router
    other: list[torch.Tensor] = []
    # Whoever claims the other half first computes it: the lead never waits for a helper that has
    # not started (with concurrent callers sharing the pool it might never start).
    claim = itertools.count()

    def other_half() -> None:
        try:
            other.append(gate.logits(x, slice(gate.weight.shape[0] // 2, None)))
        finally:
            other_done.release()

    def lead() -> None:
        try:
            if split:
                mine = gate.logits(x, slice(None, gate.weight.shape[0] // 2))
                if next(claim) == 0:
                    other_half()
                other_done.acquire()
                if not other:  # the helper failed: fail here with its error
                    other_half()
                indices, weights = gate.select(torch.cat([mine, other[0]], dim=1))
            else:
                indices, weights = gate(x)
            for hook in layer.routing_hooks:
                hook(layer.layer_idx, indices)
            plan.append(_Plan(x, indices, weights, layer.experts, threads))
        finally:
            planned.release()  # also on failure, so that helpers stop waiting
        plan[0].drain()

    def helper(first: bool) -> None:
        if first and split and next(claim) == 0:
            other_half()
        if first and layer.shared_experts is not None:
            shared_out.append(_shared_task(layer.shared_experts, x)())
        planned.acquire()
        planned.release()  # for the next helper
        if plan:
            plan[0].drain()

    # The lead is submitted first, so it never waits behind a helper that waits for it, and it
    # waits for a helper only when that helper is already computing the other router half.
    _run_on_workers([lead] + [lambda j=j: helper(j == 0) for j in range(threads - 1)], threads)
    return plan[0].finish(shared_out)


def _run_int4(kern: kernels.ExpertKernels, j: int, packed: tuple[torch.Tensor, ...], x: torch.Tensor,
              common: tuple) -> bool:
    """Expert j of a plan from its packed INT4 weights (gate_up, scales, down, scales), without
    dequantising them; False, having run nothing, where they are not laid out as the kernels read."""
    gate_up, gate_up_scale, down, down_scale = packed
    hidden, inter = x.shape[1], gate_up.shape[0] // 2
    if not _int4_layout_fits(packed, hidden) or gate_up_scale.dtype not in kernels.DTYPES:
        return False
    gate, size = gate_up.data_ptr(), gate_up_scale.element_size()
    gate_scale = gate_up_scale.data_ptr()
    at = kernels.int64s([gate, gate + inter * (hidden // 8) * 4, down.data_ptr(),
                         gate_scale, gate_scale + inter * (hidden // INT4_GROUP) * size, down_scale.data_ptr()])
    base = kernels.address(at)
    scales = kernels.int64s([base + 24, base + 32, base + 40])
    kern.experts(j, j + 1, base, base + 8, base + 16, *common, inter,
                 scales=kernels.address(scales), scale_dtype=gate_up_scale.dtype)
    return True


def _partition(ends: list[int], parts: int) -> list[tuple[int, int]]:
    """Split the active experts into at most `parts` contiguous runs of about equal cost: an
    expert costs one read of its weights plus its rows / ROWS_PER_EXPERT_READ."""
    count = len(ends)
    if parts == 1 or count == 0:
        return [(0, count)]
    total = count + ends[-1] / ROWS_PER_EXPERT_READ
    bounds = [0]
    done = 0.0
    for i in range(count):
        if len(bounds) < parts and done >= total * len(bounds) / parts:
            bounds.append(i)
        done += 1.0 + (ends[i] - (ends[i - 1] if i else 0)) / ROWS_PER_EXPERT_READ
    bounds.append(count)
    return [(a, b) for a, b in zip(bounds, bounds[1:], strict=False) if b > a or a == 0]


def _shared_task(shared: nn.Module, x: torch.Tensor) -> Callable[[], torch.Tensor]:
    """shared(x) as a callable for a worker; a plain `MLP` runs through the kernels the routed
    experts use (GEMV for one row), anything else (or autograd) through its forward."""
    plain = (
        type(shared) is MLP
        and not torch.is_grad_enabled()
        and all(type(m) is Linear and m.weight.dtype == x.dtype for m in shared.children())
    )
    if not plain:
        return lambda: shared(x)
    kern = kernels.expert_kernels() if kernels.ExpertKernels.supports(x) else None
    weights = [m.weight for m in (shared.gate_proj, shared.up_proj, shared.down_proj)]
    if kern is not None and x.shape[0] <= KERNEL_MAX_ROWS and all(w.is_contiguous() for w in weights):

        def run_native() -> torch.Tensor:
            out = x.new_empty(x.shape)
            at = kernels.int64s([w.data_ptr() for w in weights] + [x.shape[0]])
            base = kernels.address(at)
            kern.experts(0, 1, base, base + 8, base + 16, base + 24, None, 1, None, x, out, weights[0].shape[0])
            return out

        return run_native

    def run() -> torch.Tensor:
        gate, up = shared.gate_proj.weight, shared.up_proj.weight
        out = x.new_empty(x.shape)
        _swiglu(gate, up, shared.down_proj.weight, x, out)
        return out

    return run


def _swiglu(
    gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, rows: torch.Tensor, out: torch.Tensor
) -> None:
    """out = (silu(rows @ gate^T) * (rows @ up^T)) @ down^T."""
    if rows.shape[0] == 1:
        # GEMV kernels: for bf16 far faster than a one-row GEMM.
        act = F.silu(torch.mv(gate, rows[0]), inplace=True).mul_(torch.mv(up, rows[0]))
        torch.mv(down, act, out=out[0])
    elif rows.dtype in WEIGHT_LEFT:
        act = F.silu(torch.mm(gate, rows.t()), inplace=True).mul_(torch.mm(up, rows.t()))
        torch.mm(down, act, out=out.t())
    else:
        act = F.silu(torch.mm(rows, gate.t()), inplace=True).mul_(torch.mm(rows, up.t()))
        torch.mm(act, down.t(), out=out)


def _expert_weights(
    e: int,
    dtype: torch.dtype,
    experts: ExpertWeights,
    stacks: tuple[torch.Tensor, torch.Tensor] | None,
    lock: threading.Lock | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(gate_up, down) of expert e: a view of the stacked weights, else from the provider
    (under `lock` when it is not thread-safe)."""
    if stacks is not None:
        return stacks[0][e], stacks[1][e]
    if lock is None:
        return experts.expert(e, dtype)
    with lock:
        return experts.expert(e, dtype)


def _expert_gemv(gate_up: torch.Tensor, down: torch.Tensor, row: torch.Tensor, out: torch.Tensor) -> None:
    """One token through one expert with GEMV kernels (for bf16 far faster than a 1-row GEMM)."""
    h = torch.mv(gate_up, row)
    inter = h.shape[0] // 2
    torch.mv(down, F.silu(h[:inter], inplace=True).mul_(h[inter:]), out=out)


def _run_direct(
    e: int,
    slots: list[int],
    k: int,
    x: torch.Tensor,
    out: torch.Tensor,
    experts: ExpertWeights,
    stacks: tuple[torch.Tensor, torch.Tensor] | None,
    lock: threading.Lock | None,
) -> None:
    """Expert e over the tokens of its (token, slot) pairs `slots` (token = slot // k), into
    those rows of out."""
    gate_up, down = _expert_weights(e, x.dtype, experts, stacks, lock)
    if len(slots) == 1:
        _expert_gemv(gate_up, down, x[slots[0] // k], out[slots[0]])
        return
    rows = x[[s // k for s in slots]]
    inter = gate_up.shape[0] // 2
    res = torch.empty_like(rows)
    _swiglu(gate_up[:inter], gate_up[inter:], down, rows, res)
    out[slots] = res


def _run_experts(
    ids: list[int],
    ends: list[int],
    first: int,
    last: int,
    sorted_pairs: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    x: torch.Tensor,
    out: torch.Tensor,
    experts: ExpertWeights,
    stacks: tuple[torch.Tensor, torch.Tensor] | None,
    lock: threading.Lock | None,
) -> None:
    """Active experts ids (= active[first:last]) over their rows of the pairs sorted by expert,
    `sorted_pairs` = (pair index in (token, slot) order, token, float32 weight), weighted, into
    the pairs' rows of out."""
    start = ends[first - 1] if first else 0
    stop = ends[last - 1] if last > first else start
    if not ids:
        return
    order, token, weight = (t[start:stop] for t in sorted_pairs)
    rows = x.index_select(0, token)
    weight_left = x.dtype in WEIGHT_LEFT
    if (
        stacks is not None
        and not weight_left
        and len(ids) > 1
        and ids[-1] + 1 - ids[0] <= GROUPED_MAX_SPAN * len(ids)
    ):
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
        act = F.silu(gate, inplace=True).mul_(up)
        res = torch._grouped_mm(act, down[lo:hi].transpose(1, 2), offs=offs)
    else:
        res = torch.empty_like(rows)
        row = 0
        for i, e in enumerate(ids):
            end = ends[first + i] - start
            gate_up, down = _expert_weights(e, x.dtype, experts, stacks, lock)
            dst = res[row:end]
            if end - row == 1:
                _expert_gemv(gate_up, down, rows[row], dst[0])
            elif weight_left:
                # (W @ x^T)^T: the weight as the left operand, which oneDNN runs faster for bf16.
                h = torch.mm(gate_up, rows[row:end].t())
                inter = h.shape[0] // 2
                act = F.silu(h[:inter], inplace=True).mul_(h[inter:])
                torch.mm(down, act, out=dst.t())
            else:
                h = torch.mm(rows[row:end], gate_up.t())
                gate, up = h.chunk(2, dim=-1)
                torch.mm(F.silu(gate, inplace=True).mul_(up), down.t(), out=dst)
            row = end
    # Routing weights stay float32 until the product is rounded, as the reference does.
    out.index_copy_(0, order, res.mul_(weight.unsqueeze(1)))


# A run of experts uses grouped GEMMs when it spans at most this many experts per active one
# (each expert in the span costs an empty group); sparse runs loop over their experts.
GROUPED_MAX_SPAN = 4
# Dtypes whose small GEMMs run faster with the weight as the left operand: oneDNN then packs only
# the few activation rows for its AMX kernel instead of the weight, which is why for these the
# per-expert loop also beats grouped GEMMs (measured at 100 and 512 tokens, bf16).
WEIGHT_LEFT = {torch.bfloat16}


class _Batch:
    """Jobs submitted together: the caller waits on `done` until the last one has run."""

    __slots__ = ("done", "errors", "finished", "inference", "size")

    def __init__(self, size: int, inference: bool) -> None:
        self.size = size
        self.inference = inference
        self.finished = itertools.count(1)  # next() on a count is atomic under the GIL
        self.errors: list[BaseException] = []
        self.done = threading.Lock()
        self.done.acquire()


class _Workers:
    """`threads` persistent threads whose torch ops run single-threaded, fed by one queue.

    Leaner than a ThreadPoolExecutor (a C queue and a lock per batch, no futures): at one token
    the layer's hand-offs are a good part of its time, and with caches cold after the previous
    layer every line of Python on the way costs.
    """

    def __init__(self, threads: int) -> None:
        self.size = threads
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        ready = threading.Barrier(threads + 1)
        cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        # One worker per CPU: left to the scheduler, both workers of a 2-CPU machine were often
        # woken onto the same CPU and stayed there for whole layers (1/8-token layers 1.4x slower
        # in one run of three). SWARMOE_PIN_EXPERT_WORKERS=0 leaves placement to the scheduler.
        pin = len(cpus) >= threads and os.environ.get("SWARMOE_PIN_EXPERT_WORKERS", "1") != "0"
        for i in range(threads):
            cpu = cpus[i] if pin else None
            threading.Thread(target=self._loop, args=(ready, cpu), name=f"swarmoe-experts-{i}", daemon=True).start()
        ready.wait()
        # torch.set_num_threads also sets the default that new threads start with: restore it.
        torch.set_num_threads(threads)

    def _loop(self, ready: threading.Barrier, cpu: int | None) -> None:
        if cpu is not None:
            os.sched_setaffinity(0, {cpu})  # 0: this thread
        torch.set_num_threads(1)
        ready.wait()
        get = self.queue.get
        while (item := get()) is not None:
            job, batch = item
            try:
                with torch.inference_mode(batch.inference), torch.no_grad():
                    job()
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                batch.errors.append(e)
            if next(batch.finished) == batch.size:
                batch.done.release()

    def run(self, jobs: list[Callable[[], object]], inference: bool) -> None:
        """Run the jobs, wait for all of them and raise the first failure."""
        batch = _Batch(len(jobs), inference)
        if not jobs:
            return
        for job in jobs:
            self.queue.put((job, batch))
        batch.done.acquire()
        if batch.errors:
            raise batch.errors[0]

    def stop(self) -> None:
        for _ in range(self.size):
            self.queue.put(None)


_pool: _Workers | None = None
_pool_lock = threading.Lock()


def _expert_pool(threads: int) -> _Workers:
    """`threads` persistent workers whose torch ops run single-threaded."""
    global _pool
    pool = _pool
    if pool is not None and pool.size == threads:
        return pool
    with _pool_lock:
        if _pool is None or _pool.size != threads:
            if _pool is not None:
                _pool.stop()
            _pool = _Workers(threads)
        return _pool


def _forget_pool() -> None:
    global _pool
    _pool = None


os.register_at_fork(after_in_child=_forget_pool)


def _dispatch_autograd(
    x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, experts: ExpertWeights
) -> torch.Tensor:
    """The same computation, differentiable (no `out=`, no in-place), on the calling thread:
    stacked full-precision experts as grouped GEMMs (`grouped.py`), others (INT4 or FP8
    experts, frozen under LoRA) one active expert at a time."""
    n, k = indices.shape
    flat = indices.reshape(-1)
    order = flat.argsort(stable=True)
    token = order // k
    counts = torch.bincount(flat, minlength=experts.num_experts)
    xs = x.index_select(0, token)
    ws = weights.reshape(-1).index_select(0, order)
    if isinstance(experts, DenseExperts) and grouped.available(x):
        out = grouped.grouped_swiglu(xs, experts.gate_up, experts.down, counts) * ws.unsqueeze(1)
        return torch.zeros_like(x).index_add_(0, token, out.to(x.dtype))
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


# Called with (layer index, indices [N,k]) for every layer call: on the calling thread once the
# native kernels have run the whole layer, else after routing and before the experts run (on an
# expert worker thread when the layer runs on the workers).
RoutingHook = Callable[[int, torch.Tensor], None]
# Called with (layer index, sigmoid scores [N,E] with their graph, indices [N,k]) for every
# layer call under autograd: what training needs for load balancing (`swarmoe.train.balance`).
ScoreHook = Callable[[int, torch.Tensor, torch.Tensor], None]


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
        self.score_hooks: list[ScoreHook] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            return self._forward_autograd(x)
        y = _moe_fused(self, x)
        if y is not None:
            return y
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        threads = _worker_threads(flat)
        if threads:
            return _moe_on_workers(self, flat, threads).view(shape)
        indices, weights = self.gate(flat)
        for hook in self.routing_hooks:
            hook(self.layer_idx, indices)
        y = dispatch(flat, indices, weights, self.experts, shared=self.shared_experts)
        return y.view(shape)

    def _forward_autograd(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        gate = self.gate
        scores = gate.logits(flat).sigmoid()
        indices, weights = gate.select(scores, scored=True)
        for hook in self.routing_hooks:
            hook(self.layer_idx, indices)
        for score_hook in self.score_hooks:
            score_hook(self.layer_idx, scores, indices)
        y = dispatch(flat, indices, weights, self.experts, shared=self.shared_experts)
        return y.view(shape)


def _moe_fused(layer: MoE, x: torch.Tensor) -> torch.Tensor | None:
    """The whole layer over x [..., H] (routing, shared and routed experts, the weighted sum) in
    one call of the native kernels, or None where they do not apply: autograd, other devices or
    dtypes, expert providers other than stacked full-precision, INT4 or FP8 weights, a custom router or shared
    module, batches large enough that the stock GEMMs do better, or shapes that do not fit (the
    PyTorch path then raises the usual error).

    INT4 and block-FP8 experts (`Int4Experts`, `Fp8Experts`, as K2.5 and K2 publish them) run as
    stored: the kernels dequantise each weight in registers as it streams in.

    Written for a layer whose caches are cold (the layers before it evicted them): every
    Python step and distinct torch call here costs microseconds, so modules and parameters are
    read from their dicts, and only the output is allocated unless routing hooks want indices."""
    kern = kernels.expert_kernels()
    if kern is None or torch.is_grad_enabled() or not kern.supports(x):
        return None
    modules = layer._modules
    gate, experts, shared = modules["gate"], modules["experts"], modules.get("shared_experts")
    if type(gate) is not Router:
        return None
    hidden = x.shape[-1]
    if type(experts) is DenseExperts:
        params = experts._parameters
        tensors, scales, form = [params["gate_up"], params["down"]], None, kernels.EXPERTS_DENSE
        e, inter2 = tensors[0].shape[:2]
        if tensors[0].shape[2] != hidden or tensors[1].shape != (e, hidden, inter2 // 2):
            return None
    elif type(experts) is Int4Experts:
        (tensors, scales), form = _int4_tensors(experts, x), kernels.EXPERTS_INT4
    elif type(experts) is Fp8Experts:
        (tensors, scales), form = _fp8_tensors(experts, hidden), kernels.EXPERTS_FP8
    else:
        return None
    if form != kernels.EXPERTS_DENSE and scales is None:
        return None
    if shared is not None:
        if type(shared) is not MLP or any(type(m) is not Linear for m in shared._modules.values()):
            return None  # e.g. LoRA-wrapped projections
        tensors += [m._parameters["weight"] for m in shared._modules.values()]
    router, bias = gate._parameters["weight"], gate._buffers["e_score_correction_bias"]
    n = x.numel() // hidden
    if (
        n * gate.top_k > KERNEL_MAX_ROWS * experts.num_experts
        or any(t.dtype != x.dtype or not t.is_contiguous() for t in tensors[2 if scales else 0:])
        or router.dtype != torch.float32
        or bias.dtype != torch.float32
        or router.shape != (experts.num_experts, hidden)
        or not router.is_contiguous()
        or bias.shape != (experts.num_experts,)
        or (shared is not None and tensors[2].shape[1] != hidden)
    ):
        return None
    y = torch.empty_like(x)
    hooks = layer.routing_hooks
    indices = torch.empty(n, gate.top_k, dtype=torch.int64) if hooks else None
    kern.moe(kernels.MoeArgs(
        n, hidden, tensors[0].shape[1] // 2, tensors[2].shape[0] if shared is not None else 0,
        experts.num_experts, gate.top_k, gate.n_group, gate.topk_group, torch.get_num_threads(),
        kernels.DTYPES[x.dtype], gate.norm_topk_prob, gate.scaling,
        router.data_ptr(), bias.data_ptr(), tensors[0].data_ptr(), tensors[1].data_ptr(),
        *([t.data_ptr() for t in tensors[2:]] if shared is not None else (None, None, None)),
        x.data_ptr(), y.data_ptr(), indices.data_ptr() if hooks else None,
        *((scales[0].data_ptr(), scales[1].data_ptr()) if scales else (None, None)), form,
    ))
    for hook in hooks:
        hook(layer.layer_idx, indices)
    return y


def _int4_tensors(experts: Int4Experts, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
    """([gate_up, down] packed, [their scales]) of INT4 experts as the kernels take them, or no
    scales where they do not fit x (shapes, dtypes, layout)."""
    buffers = experts._buffers
    packed = [buffers["gate_up_packed"], buffers["down_packed"]]
    scales = [buffers["gate_up_scale"], buffers["down_scale"]]
    fits = (
        all(t.dim() == 3 and t.shape[0] == experts.num_experts for t in (*packed, *scales))
        and scales[0].dtype == x.dtype
        and _int4_layout_fits((packed[0], scales[0], packed[1], scales[1]), x.shape[-1])
    )
    return packed, scales if fits else None


def _fp8_tensors(experts: Fp8Experts, hidden: int) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
    """([gate_up, down] in float8, [their block scales]) of FP8 experts as the kernels take them,
    or no scales where they do not fit (shapes, dtypes, layout)."""
    buffers = experts._buffers
    weights = [buffers["gate_up_fp8"], buffers["down_fp8"]]
    scales = [buffers["gate_up_scale_inv"], buffers["down_scale_inv"]]
    e, inter = experts.num_experts, weights[0].shape[1] // 2
    blocks_i, blocks_h = -(-inter // FP8_BLOCK), -(-hidden // FP8_BLOCK)
    fits = (
        weights[0].shape == (e, 2 * inter, hidden) and weights[1].shape == (e, hidden, inter)
        and scales[0].shape == (e, 2, blocks_i, blocks_h) and scales[1].shape == (e, blocks_h, blocks_i)
        and all(t.dtype == torch.float8_e4m3fn and t.is_contiguous() for t in weights)
        and all(t.dtype == torch.float32 and t.is_contiguous() for t in scales)
    )
    return weights, scales if fits else None


def _int4_layout_fits(packed: tuple[torch.Tensor, ...], hidden: int) -> bool:
    """Whether (gate_up, its scales, down, its scales), one expert or a stack of them, are packed
    INT4 as the kernels read them for activations of `hidden` values."""
    gate_up, gate_up_scale, down, down_scale = packed
    inter = gate_up.shape[-2] // 2
    return (
        hidden % INT4_GROUP == 0 and inter % INT4_GROUP == 0 and inter > 0
        and gate_up.shape[-2:] == (2 * inter, hidden // 8) and down.shape[-2:] == (hidden, inter // 8)
        and gate_up_scale.shape[-2:] == (2 * inter, hidden // INT4_GROUP)
        and down_scale.shape[-2:] == (hidden, inter // INT4_GROUP)
        and gate_up.dtype == down.dtype == torch.int32
        and gate_up_scale.dtype == down_scale.dtype
        and all(t.is_cpu and t.is_contiguous() for t in packed)
    )


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
    def dead(self) -> int:
        """Experts that received no token."""
        return int((self.tokens_per_expert == 0).sum())

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
                "max/mean": round(s.max_load / s.mean_load, 3) if s.mean_load else 0.0,
                "cv": round(s.cv, 3),
                "dead": s.dead,
            }
            for layer, s in sorted(self.layers.items())
        ]
