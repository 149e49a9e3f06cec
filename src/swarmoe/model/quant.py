"""INT4 pack-quantized and block-FP8 weights, as K2-Thinking / K2.5 and K2 publish them.

INT4 (compressed-tensors `pack-quantized`, symmetric, group 32): `weight_packed` int32
[out, in/8], eight 4-bit values per word with the first in the low bits, each stored +8;
`weight_scale` [out, in/32]. FP8 (K2): `weight` float8_e4m3fn [out, in] with
`weight_scale_inv` [ceil(out/128), ceil(in/128)] per 128x128 block.

Routed experts stay packed in memory: a 1T checkpoint is ~550 GiB packed and ~2 TB unpacked.
On the native kernels (moe.py, kernels.c) INT4 and FP8 experts run as stored, each weight
dequantised in registers as it streams in; elsewhere they are dequantised one expert at a time
when routed to.
"""

from __future__ import annotations

import torch
from torch import nn

INT4_GROUP = 32
FP8_BLOCK = 128
_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)


def unpack_int4(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """int32 [..., in/8] -> int8 values in [-8, 7], shape [..., in]."""
    nibbles = (packed[..., None] >> _SHIFTS.to(packed.device)) & 0xF
    return (nibbles.flatten(-2)[..., :in_features] - 8).to(torch.int8)


def pack_int4(values: torch.Tensor) -> torch.Tensor:
    """int values in [-8, 7], shape [..., in] (in % 8 == 0) -> int32 [..., in/8]."""
    nibbles = (values.to(torch.int64) + 8).view(*values.shape[:-1], -1, 8)
    words = (nibbles << _SHIFTS.to(values.device, torch.int64)).sum(-1)
    # Words with the top nibble >= 8 are negative as int32 (two's complement).
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def dequant_int4(packed: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    in_features = scale.shape[-1] * INT4_GROUP
    q = unpack_int4(packed, in_features).to(dtype)
    w = q.view(*q.shape[:-1], -1, INT4_GROUP) * scale.to(dtype)[..., None]
    return w.flatten(-2)


def quantize_int4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric group-32 quantisation (for tiny checkpoints): -> (packed int32, scale)."""
    groups = w.float().view(*w.shape[:-1], -1, INT4_GROUP)
    scale = groups.abs().amax(-1).clamp(min=1e-8) / 7.0
    q = (groups / scale[..., None]).round().clamp(-8, 7).flatten(-2)
    return pack_int4(q), scale


def dequant_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    out, inp = weight.shape[-2:]
    s = scale_inv.float().repeat_interleave(FP8_BLOCK, -2)[..., :out, :]
    s = s.repeat_interleave(FP8_BLOCK, -1)[..., :inp]
    return (weight.float() * s).to(dtype)


def quantize_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-128 FP8 quantisation (for tiny checkpoints): -> (fp8 weight, scale_inv)."""
    out, inp = w.shape
    rows, cols = -(-out // FP8_BLOCK), -(-inp // FP8_BLOCK)
    padded = torch.zeros(rows * FP8_BLOCK, cols * FP8_BLOCK)
    padded[:out, :inp] = w.float()
    blocks = padded.view(rows, FP8_BLOCK, cols, FP8_BLOCK)
    scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-8) / torch.finfo(torch.float8_e4m3fn).max
    q = (blocks / scale[:, None, :, None]).view_as(padded)[:out, :inp]
    return q.to(torch.float8_e4m3fn), scale


class Int4Experts(nn.Module):
    """Routed experts kept packed; gate and up stacked on the output dim as in DenseExperts."""

    def __init__(self, num_experts: int, hidden: int, inter: int) -> None:
        super().__init__()
        for dim, name in ((hidden, "hidden_size"), (inter, "moe_intermediate_size")):
            if dim % INT4_GROUP:
                raise ValueError(f"INT4 experts need {name} divisible by {INT4_GROUP}, got {dim}")
        self.num_experts = num_experts
        e = num_experts
        self.register_buffer("gate_up_packed", torch.zeros(e, 2 * inter, hidden // 8, dtype=torch.int32))
        self.register_buffer("gate_up_scale", torch.zeros(e, 2 * inter, hidden // INT4_GROUP))
        self.register_buffer("down_packed", torch.zeros(e, hidden, inter // 8, dtype=torch.int32))
        self.register_buffer("down_scale", torch.zeros(e, hidden, inter // INT4_GROUP))

    @classmethod
    def from_dense(cls, gate_up: torch.Tensor, down: torch.Tensor) -> Int4Experts:
        """Stacked full-precision experts (gate_up [E, 2I, H], down [E, H, I]) quantised as K2.5
        stores them: for tiny models, tests and benchmarks that start from dense weights."""
        e, hidden, inter = down.shape
        experts = cls(e, hidden, inter)
        with torch.no_grad():
            for name, w in (("gate_up", gate_up), ("down", down)):
                packed, scale = quantize_int4(w)
                getattr(experts, f"{name}_packed").copy_(packed)
                getattr(experts, f"{name}_scale").copy_(scale)
        return experts

    thread_safe = True  # expert() only reads: dispatch may call it from several threads

    def int4(self, e: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Expert e packed (gate_up, its scales, down, its scales), for kernels that run it so."""
        return self.gate_up_packed[e], self.gate_up_scale[e], self.down_packed[e], self.down_scale[e]

    def expert(self, e: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return (
            dequant_int4(self.gate_up_packed[e], self.gate_up_scale[e], dtype),
            dequant_int4(self.down_packed[e], self.down_scale[e], dtype),
        )


class Fp8Experts(nn.Module):
    """Routed experts kept in block-FP8; gate and up stacked on the output dim."""

    def __init__(self, num_experts: int, hidden: int, inter: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        e = num_experts
        blocks = lambda n: -(-n // FP8_BLOCK)  # noqa: E731
        self.register_buffer("gate_up_fp8", torch.zeros(e, 2 * inter, hidden, dtype=torch.float8_e4m3fn))
        # gate and up keep their own block grids, so their scales are stacked, not merged.
        self.register_buffer("gate_up_scale_inv", torch.ones(e, 2, blocks(inter), blocks(hidden), dtype=torch.float32))
        self.register_buffer("down_fp8", torch.zeros(e, hidden, inter, dtype=torch.float8_e4m3fn))
        self.register_buffer("down_scale_inv", torch.ones(e, blocks(hidden), blocks(inter), dtype=torch.float32))

    @classmethod
    def from_dense(cls, gate_up: torch.Tensor, down: torch.Tensor) -> Fp8Experts:
        """Stacked full-precision experts (gate_up [E, 2I, H], down [E, H, I]) quantised as K2
        stores them (gate and up on block grids of their own): for tests and benchmarks."""
        e, hidden, inter = down.shape
        experts = cls(e, hidden, inter)
        with torch.no_grad():
            for j in range(e):
                for half, w in enumerate(gate_up[j].float().chunk(2)):
                    q, scale_inv = quantize_fp8(w)
                    experts.gate_up_fp8[j, half * inter:(half + 1) * inter] = q
                    experts.gate_up_scale_inv[j, half] = scale_inv
                experts.down_fp8[j], experts.down_scale_inv[j] = quantize_fp8(down[j].float())
        return experts

    thread_safe = True  # expert() only reads: dispatch may call it from several threads

    def expert(self, e: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        gate, up = self.gate_up_fp8[e].chunk(2, dim=0)
        gate_up = torch.cat(
            [dequant_fp8(gate, self.gate_up_scale_inv[e, 0], dtype), dequant_fp8(up, self.gate_up_scale_inv[e, 1], dtype)]
        )
        return gate_up, dequant_fp8(self.down_fp8[e], self.down_scale_inv[e], dtype)
