"""The MoE block: sigmoid router with `noaux_tc` selection, routed experts, shared experts.

Dispatch never loops over all experts: (token, expert) pairs are sorted by expert, only experts
that received tokens run (one fused gate/up GEMM and one down GEMM each), and results are
combined with `index_add_`. Expert weights come from an `ExpertWeights` provider, so the same
dispatch serves full-precision stacked weights, packed INT4 / FP8 experts dequantised on use,
and an engine's offloaded expert cache.
"""

from __future__ import annotations

from collections.abc import Callable
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

    def expert(self, e: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return self.gate_up[e].to(dtype), self.down[e].to(dtype)


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
    x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, experts: ExpertWeights
) -> torch.Tensor:
    """Run each token through its chosen experts; x [N,H], indices/weights [N,k]."""
    n, k = indices.shape
    flat = indices.reshape(-1)
    order = flat.argsort(stable=True)
    counts = torch.bincount(flat, minlength=experts.num_experts).tolist()
    token = order // k
    xs = x.index_select(0, token)
    ws = weights.reshape(-1).index_select(0, order)
    out = torch.empty_like(xs)
    start = 0
    for e, count in enumerate(counts):
        if count == 0:
            continue
        end = start + count
        gate_up, down = experts.expert(e, x.dtype)
        gate, up = F.linear(xs[start:end], gate_up).chunk(2, dim=-1)
        h = F.linear(F.silu(gate) * up, down)
        out[start:end] = h * ws[start:end, None].to(h.dtype)
        start = end
    return torch.zeros_like(x).index_add_(0, token, out)


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
        y = dispatch(flat, indices, weights, self.experts)
        if self.shared_experts is not None:
            y = y + self.shared_experts(flat)
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
