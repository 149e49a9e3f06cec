"""Routed experts for training: one grouped GEMM per projection, forward and backward.

Tokens arrive sorted by expert, so every expert's rows are one contiguous run. Forward and
backward each make a few grouped GEMMs over all runs at once (`torch._grouped_mm`, which skips
experts without tokens), never a Python loop over experts. The backward is written out rather
than left to autograd: it needs the weight gradients as grouped GEMMs over the token dimension,
and keeping only the gate/up activations (not the SwiGLU intermediates) halves what a step holds.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def available(x: torch.Tensor) -> bool:
    """Whether grouped GEMMs run for x: any CPU dtype; on CUDA, bfloat16 only."""
    return hasattr(torch, "_grouped_mm") and (x.is_cpu or x.dtype == torch.bfloat16)


class _GroupedSwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, xs: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
                offsets: torch.Tensor) -> torch.Tensor:
        h = torch._grouped_mm(xs, gate_up.transpose(1, 2), offs=offsets)
        gate, up = h.chunk(2, dim=-1)
        y = torch._grouped_mm(F.silu(gate) * up, down.transpose(1, 2), offs=offsets)
        ctx.save_for_backward(xs, gate_up, down, offsets, h)
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):  # type: ignore[override]
        xs, gate_up, down, offsets, h = ctx.saved_tensors
        gate, up = h.chunk(2, dim=-1)
        sig = torch.sigmoid(gate)
        silu = gate * sig
        dy = dy.contiguous()
        d_down = torch._grouped_mm(dy.t(), silu * up, offs=offsets)
        da = torch._grouped_mm(dy, down, offs=offsets)
        dh = torch.cat([da * up * sig * (1 + gate * (1 - sig)), da * silu], dim=-1)
        d_gate_up = torch._grouped_mm(dh.t(), xs, offs=offsets)
        dxs = torch._grouped_mm(dh, gate_up, offs=offsets)
        return dxs, d_gate_up, d_down, None


def grouped_swiglu(
    xs: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, counts: torch.Tensor
) -> torch.Tensor:
    """SwiGLU experts over rows sorted by expert: xs [M,H], gate_up [E,2I,H], down [E,H,I],
    counts [E] rows per expert (summing to M) -> [M,H]. Under CPU autocast the GEMMs run in the
    autocast dtype, with gradients flowing back to the full-precision weights."""
    if torch.is_autocast_enabled("cpu") and xs.is_cpu:
        dtype = torch.get_autocast_dtype("cpu")
        xs, gate_up, down = xs.to(dtype), gate_up.to(dtype), down.to(dtype)
    elif gate_up.dtype != xs.dtype:
        xs = xs.to(gate_up.dtype)
    offsets = counts.cumsum(0).to(torch.int32)
    with torch.autocast("cpu", enabled=False):
        return _GroupedSwiGLU.apply(xs.contiguous(), gate_up, down, offsets)
