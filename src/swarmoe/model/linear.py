"""Dense linear layers that run decode-sized inputs on the native kernels.

At decode a linear layer multiplies one row, or a few, by a weight that comes cold from memory,
so its speed is how fast the weight streams in. PyTorch's CPU GEMV read such weights at 16–21 GB/s
on a bus that streams 31–33 (docs/benchmarks.md); the native kernel (`swarmoe_linear`) reads each
weight row once, in memory order, on the MoE layer's threads. Everything else goes to F.linear:
autograd, other devices or dtypes, larger batches, small weights, or shapes that do not fit (which
F.linear then reports as usual).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from swarmoe.model import kernels

# Below about this many weight bytes the kernel's fixed costs (its checks in Python with the
# caches cold, waking a helper thread) take as long as it saves (measured: 1 MiB fp32 0.76x,
# 2.4 MiB bf16 1.25x, 4.7 MiB fp32 1.11x of F.linear's speed).
NATIVE_MIN_BYTES = 2 << 20


class Linear(nn.Linear):
    """nn.Linear (same parameters and checkpoint names) with the native path for decode."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.weight, self.bias
        kern = kernels.expert_kernels()
        if (
            kern is not None
            and self.in_features * self.out_features * x.element_size() >= NATIVE_MIN_BYTES
            and not torch.is_grad_enabled()
            and kern.supports(x)
            and weight.dim() == 2
            and 0 < x.numel() <= kernels.LINEAR_MAX_ROWS * weight.shape[1]
            and x.shape[-1] == weight.shape[1]
            and weight.dtype == x.dtype
            and weight.is_cpu
            and weight.is_contiguous()
            and (bias is None or (
                bias.dtype == x.dtype and bias.is_cpu and bias.shape == weight.shape[:1] and bias.is_contiguous()))
        ):
            return kern.linear(x, weight, bias)
        return F.linear(x, weight, bias)
