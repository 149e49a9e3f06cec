"""Expert load balancing as K2 and DeepSeek-V3 train it, and the load figures that show it.

Auxiliary-loss-free balancing: each MoE layer's router carries a bias per expert
(`e_score_correction_bias`) that only chooses experts, never weights them. After every step
the bias of each expert moves by a fixed amount against its load in that step,
`bias_e += γ·sign(mean load − load_e)`, so an overloaded expert is chosen a little less next
step without a loss term pulling on the router's scores. Beside it sits DeepSeek-V3's
sequence-wise balance loss, α·Σ_e f_e·P_e per sequence, kept tiny (or off) so it only stops
extreme imbalance inside one sequence.

Padding positions also pass through the router; they are left out of every count and of the
loss (the mask given to `begin`), since a padded row's tokens are all alike and would look like
one hot expert.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from swarmoe.model.moe import MoE


@dataclass(frozen=True)
class LayerLoad:
    """One MoE layer's expert load over some tokens."""

    layer: int
    counts: list[int]

    @property
    def mean(self) -> float:
        return sum(self.counts) / len(self.counts)

    @property
    def max_over_mean(self) -> float:
        """1.0 is perfectly balanced; the figure the balancing is judged by."""
        return max(self.counts) / self.mean if self.mean else 0.0

    @property
    def cv(self) -> float:
        """Coefficient of variation of the load."""
        mean = self.mean
        if not mean:
            return 0.0
        var = sum((c - mean) ** 2 for c in self.counts) / len(self.counts)
        return var**0.5 / mean

    @property
    def dead(self) -> int:
        """Experts that received no token."""
        return sum(1 for c in self.counts if c == 0)

    def as_dict(self) -> dict[str, float | int]:
        return {"layer": self.layer, "max_over_mean": round(self.max_over_mean, 4),
                "cv": round(self.cv, 4), "dead": self.dead, "max": max(self.counts),
                "mean": round(self.mean, 2)}


class LoadBalancer:
    """Counts each MoE layer's expert load during training steps, applies the bias update after
    each, and adds the sequence-wise balance loss when `alpha` > 0."""

    def __init__(self, model: nn.Module, *, gamma: float = 1e-3, alpha: float = 0.0,
                 update_bias: bool = True) -> None:
        if gamma < 0 or alpha < 0:
            raise ValueError(f"gamma and alpha must be >= 0, got gamma={gamma}, alpha={alpha}")
        self.moes = {m.layer_idx: m for m in model.modules() if isinstance(m, MoE)}
        self.gamma, self.alpha, self.update_bias = gamma, alpha, update_bias
        self._counts = {
            i: torch.zeros(m.gate.e_score_correction_bias.numel(), dtype=torch.int64)
            for i, m in self.moes.items()
        }
        self._mask: torch.Tensor | None = None
        self._shape: tuple[int, int] | None = None
        self._losses: list[torch.Tensor] = []
        for moe in self.moes.values():
            moe.score_hooks.append(self._record)

    def detach(self) -> None:
        for moe in self.moes.values():
            if self._record in moe.score_hooks:
                moe.score_hooks.remove(self._record)

    def begin(self, attention_mask: torch.Tensor) -> None:
        """Before a forward pass over a [B,T] batch: which positions are real tokens."""
        self._mask = attention_mask.reshape(-1).bool()
        self._shape = tuple(attention_mask.shape)  # type: ignore[assignment]
        self._losses = []

    def _record(self, layer: int, scores: torch.Tensor, indices: torch.Tensor) -> None:
        mask = self._mask
        if mask is None or mask.numel() != indices.shape[0]:
            raise RuntimeError("LoadBalancer.begin(attention_mask) must precede each forward pass")
        experts = scores.shape[-1]
        chosen = indices[mask.to(indices.device)].reshape(-1)
        self._counts[layer] += torch.bincount(chosen, minlength=experts).cpu()
        if self.alpha > 0:
            self._losses.append(self._sequence_loss(scores, indices))

    def _sequence_loss(self, scores: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """α·Σ_e f_e·P_e averaged over sequences: f_e is expert e's share of the sequence's
        choices scaled so that balance gives 1, P_e its mean normalised score."""
        assert self._shape is not None and self._mask is not None
        b, t = self._shape
        experts, k = scores.shape[-1], indices.shape[-1]
        real = self._mask.to(scores.device).view(b, t, 1).to(scores.dtype)
        tokens = real.sum(1).clamp(min=1)  # [B,1]
        normed = scores / scores.sum(-1, keepdim=True)
        p = (normed.view(b, t, experts) * real).sum(1) / tokens  # [B,E]
        hits = torch.zeros(b * t, experts, device=scores.device, dtype=scores.dtype)
        hits.scatter_(1, indices, 1.0)
        f = (hits.view(b, t, experts) * real).sum(1) * (experts / k) / tokens  # [B,E]
        return self.alpha * (f.detach() * p).sum(-1).mean()

    def loss(self) -> torch.Tensor | None:
        """The balance loss of the last forward pass, summed over layers (None when off)."""
        return torch.stack(self._losses).sum() if self._losses else None

    def step(self) -> list[LayerLoad]:
        """After the optimizer step: the loads of the step's tokens, per layer; the bias update
        applied from them (unless off). Counts then start again from zero."""
        loads = []
        with torch.no_grad():
            for layer, counts in sorted(self._counts.items()):
                loads.append(LayerLoad(layer, counts.tolist()))
                if self.update_bias and self.gamma and counts.sum() > 0:
                    bias = self.moes[layer].gate.e_score_correction_bias
                    load = counts.to(bias.device, torch.float32)
                    bias += self.gamma * torch.sign(load.mean() - load)
                counts.zero_()
        return loads


def summarize(loads: list[LayerLoad]) -> dict[str, float | int]:
    """The worst layer's figures, for a progress line."""
    if not loads:
        return {}
    worst = max(loads, key=lambda x: x.max_over_mean)
    return {"max_over_mean": round(worst.max_over_mean, 4), "cv": round(max(x.cv for x in loads), 4),
            "dead": sum(x.dead for x in loads)}
