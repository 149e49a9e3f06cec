"""Optimizers for `swarmoe train`: AdamW, or Muon for the hidden layers' matrices and AdamW for
the rest (embeddings, the output head, norms, biases, anything not a matrix).

torch.optim.Muon orthogonalises each 2-D update; the routed experts are stacked in one
[E, out, in] parameter per layer, which it refuses, so `ExpertMuon` gives each expert's matrix
torch's own Muon step, as if that matrix were a parameter alone. Both use Moonlight's "match the
RMS of AdamW" learning-rate adjustment, so one learning rate serves every group.
`CombinedOptimizer` makes the members one Optimizer, for LR schedulers and checkpoints.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim._muon import muon as muon_step  # the step torch.optim.Muon takes
from torch.optim.optimizer import ParamsT

from swarmoe.model.moe import DenseExperts

OptimizerName = Literal["adamw", "muon"]

# Momentum of the Muon groups (Moonlight's and torch's default).
MUON_MOMENTUM = 0.95
# Scales Muon's update to the RMS an AdamW update has, whatever the matrix's shape.
MUON_ADJUST_LR = "match_rms_adamw"

NamedParams = list[tuple[str, nn.Parameter]]
Closure = Callable[[], float]


def build_optimizer(
    model: nn.Module,
    name: OptimizerName,
    lr: float,
    weight_decay: float = 0.1,
    betas: tuple[float, float] = (0.9, 0.95),
) -> Optimizer:
    """One optimizer over the model's trainable parameters (buffers and frozen parameters are
    never in it). Norms and biases get no weight decay. Each param group carries a "name"
    ("muon", "muon_experts", "adamw", "adamw_no_decay") and its "param_names". Muon's updates
    are scaled to AdamW's RMS, so `lr` means the same for every group."""
    if name not in ("adamw", "muon"):
        raise ValueError(f"unknown optimizer {name!r}: expected 'adamw' or 'muon'")
    kinds = _classify(model)

    def adamw(decay: NamedParams) -> Optimizer | None:
        groups = _non_empty([
            {"name": "adamw", "params": decay, "weight_decay": weight_decay},
            {"name": "adamw_no_decay", "params": kinds["no_decay"], "weight_decay": 0.0},
        ])
        return torch.optim.AdamW(groups, lr=lr, betas=betas, **_fast_adamw(groups)) if groups else None

    if name == "adamw":
        only = adamw(kinds["matrix"] + kinds["experts"] + kinds["decay"])
        assert only is not None  # _classify found something to train
        return only
    muon: dict[str, Any] = {
        "lr": lr, "weight_decay": weight_decay, "momentum": MUON_MOMENTUM, "nesterov": True,
        "adjust_lr_fn": MUON_ADJUST_LR,
    }
    members: list[Optimizer] = []
    if kinds["matrix"]:
        members.append(torch.optim.Muon([{"name": "muon", "params": kinds["matrix"]}], **muon))
    if kinds["experts"]:
        members.append(ExpertMuon([{"name": "muon_experts", "params": kinds["experts"]}], **muon))
    if (rest := adamw(kinds["decay"])) is not None:
        members.append(rest)
    return CombinedOptimizer(members)


def _fast_adamw(groups: list[dict[str, Any]]) -> dict[str, bool]:
    """AdamW's fused kernel (one pass per tensor, CPU and CUDA) where every parameter allows it,
    else its multi-tensor (foreach) form. torch picks neither by itself for CPU tensors: its
    per-tensor loop of ~10 elementwise ops per parameter cost ~5% of a CPU training step."""
    params = [p for g in groups for _, p in g["params"]]
    fusable = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return {"fused": True} if fusable else {"foreach": True}


def _classify(model: nn.Module) -> dict[str, NamedParams]:
    """Trainable parameters by the update they get: "matrix" (2-D weights of the hidden layers),
    "experts" (stacked routed experts), "decay" (embeddings, the output head, other tensors of
    2 dims or more) and "no_decay" (norms and biases: 1-D)."""
    not_hidden = {
        id(p)
        for module_name, module in model.named_modules()
        if isinstance(module, nn.Embedding) or module_name.rsplit(".", 1)[-1] == "lm_head"
        for p in module.parameters()
    }
    stacked = {
        id(p)
        for module in model.modules()
        if isinstance(module, DenseExperts)
        for p in module.parameters(recurse=False)
    }
    kinds: dict[str, NamedParams] = {"matrix": [], "experts": [], "decay": [], "no_decay": []}
    for param_name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) in stacked and p.dim() == 3:
            kind = "experts"
        elif p.dim() == 2 and id(p) not in not_hidden:
            kind = "matrix"
        else:
            kind = "decay" if p.dim() >= 2 else "no_decay"
        kinds[kind].append((param_name, p))
    if not any(kinds.values()):
        raise ValueError("no parameter of the model requires grad: nothing to optimize")
    return kinds


def _non_empty(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [g for g in groups if g["params"]]


class ExpertMuon(Optimizer):
    """torch.optim.Muon for stacks of matrices [E, out, in] (the routed experts): every matrix of
    a stack gets exactly the step torch's Muon gives a 2-D parameter alone (momentum,
    Newton–Schulz, lr adjusted to that matrix's shape), by running torch's functional Muon on
    views of the stack. Per matrix rather than batched, so that it is torch's Muon bit for bit.

    Takes torch.optim.Muon's keyword arguments, with its defaults."""

    def __init__(self, params: ParamsT, **options: Any) -> None:
        # torch's Muon checks the options and fills in its defaults (on a throwaway matrix).
        defaults = torch.optim.Muon([torch.zeros(1, 1)], **options).defaults
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() != 3:
                    raise ValueError(
                        f"ExpertMuon takes stacks of matrices [E,out,in], got {tuple(p.shape)}"
                    )

    @torch.no_grad()
    def step(self, closure: Closure | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params: list[torch.Tensor] = []
            grads: list[torch.Tensor] = []
            buffers: list[torch.Tensor] = []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("ExpertMuon does not support sparse gradients")
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(
                        p.grad, memory_format=torch.preserve_format
                    )
                params += p.unbind()
                grads += p.grad.unbind()
                buffers += state["momentum_buffer"].unbind()
            muon_step(
                params, grads, buffers, lr=group["lr"], weight_decay=group["weight_decay"],
                momentum=group["momentum"], nesterov=group["nesterov"],
                ns_coefficients=group["ns_coefficients"], eps=group["eps"],
                ns_steps=group["ns_steps"], adjust_lr_fn=group["adjust_lr_fn"], has_complex=False,
            )
        return loss


class CombinedOptimizer(Optimizer):
    """Optimizers of disjoint parameters stepped as one. Their param groups (the very dicts) and
    their state are this optimizer's, so an LR scheduler drives them all and `state_dict()` /
    `load_state_dict()` cover them all."""

    def __init__(self, optimizers: Sequence[Optimizer]) -> None:
        if not optimizers:
            raise ValueError("CombinedOptimizer needs at least one optimizer")
        self.optimizers = list(optimizers)
        # With no defaults to fill in, Optimizer keeps each group dict as given: the members' own.
        super().__init__([g for o in self.optimizers for g in o.param_groups], defaults={})
        self._share()

    def _share(self) -> None:
        """Point each member at its slice of this optimizer's groups and at this state."""
        start = 0
        for member in self.optimizers:
            end = start + len(member.param_groups)
            member.param_groups = self.param_groups[start:end]
            member.state = self.state
            start = end

    def step(self, closure: Closure | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for member in self.optimizers:
            member.step()
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = [g.get("name") for g in state_dict["param_groups"]]
        mine = [g.get("name") for g in self.param_groups]
        if saved != mine:
            raise ValueError(f"optimizer state has param groups {saved}, this optimizer {mine}")
        # Optimizer.load_state_dict replaces the group dicts and the state: share the new ones.
        super().load_state_dict(state_dict)
        self._share()
