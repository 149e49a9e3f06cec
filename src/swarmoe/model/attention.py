"""Multi-head latent attention (MLA) with YaRN rope, as in DeepSeek-V3 / Kimi K2.

Keys and values are compressed into one `kv_lora_rank` latent per token plus a shared rotary
key of `qk_rope_head_dim`; that pair is all a cache needs to hold. This module computes the
latent and the queries, and attends with the latent expanded to per-head keys and values
(prefill form). A cache-owning engine can instead absorb `kv_b_proj` into the queries and attend
over the latent directly; `absorbed_weights` gives it the two halves of `kv_b_proj` to do so.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from swarmoe.config import RopeConfig, TextConfig
from swarmoe.model.linear import Linear


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


class RotaryEmbedding(nn.Module):
    """Rope frequencies (plain or YaRN) and the attention-scale correction YaRN implies."""

    def __init__(self, rope: RopeConfig, dim: int) -> None:
        super().__init__()
        base = rope.theta
        exponents = torch.arange(0, dim, 2, dtype=torch.float32) / dim
        inv_freq = 1.0 / (base**exponents)
        self.cos_sin_scale = 1.0
        if rope.type == "yarn":
            inv_freq, self.cos_sin_scale = _yarn_frequencies(rope, dim, inv_freq)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of shape [..., dim/2] for integer positions of any shape."""
        angles = positions.to(torch.float32)[..., None] * self.inv_freq
        return angles.cos() * self.cos_sin_scale, angles.sin() * self.cos_sin_scale


def _yarn_frequencies(rope: RopeConfig, dim: int, inv_freq: torch.Tensor) -> tuple[torch.Tensor, float]:
    factor = rope.factor
    original = rope.original_max_position_embeddings

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(rope.theta))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolate = 1 - ramp
    inv_freq = (inv_freq / factor) * (1 - extrapolate) + inv_freq * extrapolate
    if rope.attention_factor is not None:
        scale = float(rope.attention_factor)
    elif rope.mscale and rope.mscale_all_dim:
        scale = _yarn_mscale(factor, rope.mscale) / _yarn_mscale(factor, rope.mscale_all_dim)
    else:
        scale = _yarn_mscale(factor)
    return inv_freq, scale


def softmax_scale(cfg: TextConfig) -> float:
    scale = cfg.qk_head_dim**-0.5
    if cfg.rope.type == "yarn" and cfg.rope.mscale_all_dim:
        m = _yarn_mscale(cfg.rope.factor, cfg.rope.mscale_all_dim)
        scale *= m * m
    return scale


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotate the last dim of x. Interleaved input pairs (0,1),(2,3)… as the K2 weights expect;
    the output is laid out as [rotated evens, rotated odds], which leaves q·k unchanged as long as
    queries and keys (and any cache) share the layout."""
    if interleaved:
        a, b = x[..., 0::2], x[..., 1::2]
    else:
        half = x.shape[-1] // 2
        a, b = x[..., :half], x[..., half:]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)


# Query rows per block when the observed logits are computed, so that a long sequence never
# holds all [B, H, T, T] logits at once.
_LOGIT_BLOCK_ROWS = 256


class MLAttention(nn.Module):
    # Training only (QK-clip): when set, forward passes it each head's largest pre-softmax logit
    # [H] (float32, no grad). The engine's paths (queries / latents / attend) never call it.
    logit_observer: Callable[[torch.Tensor], None] | None = None

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.cfg = cfg
        h = cfg.num_attention_heads
        bias = cfg.attention_bias
        if cfg.q_lora_rank is None:
            self.q_proj = Linear(cfg.hidden_size, h * cfg.qk_head_dim, bias=False)
        else:
            self.q_a_proj = Linear(cfg.hidden_size, cfg.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank)
            self.q_b_proj = Linear(cfg.q_lora_rank, h * cfg.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = Linear(
            cfg.hidden_size, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=bias
        )
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank)
        self.kv_b_proj = Linear(cfg.kv_lora_rank, h * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)
        self.o_proj = Linear(h * cfg.v_head_dim, cfg.hidden_size, bias=bias)
        self.scale = softmax_scale(cfg)

    def queries(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q_nope [B,H,T,nope] and roped q_rope [B,H,T,rope]."""
        c = self.cfg
        b, t, _ = x.shape
        if c.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(b, t, c.num_attention_heads, c.qk_head_dim).transpose(1, 2)
        q_nope, q_rope = q.split([c.qk_nope_head_dim, c.qk_rope_head_dim], dim=-1)
        return q_nope, apply_rope(q_rope, cos[:, None], sin[:, None], c.rope_interleave)

    def latents(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What a cache stores per token: normalised latent [B,T,kv_lora] and roped key [B,T,rope]."""
        c = self.cfg
        kv, k_rope = self.kv_a_proj_with_mqa(x).split([c.kv_lora_rank, c.qk_rope_head_dim], dim=-1)
        return self.kv_a_layernorm(kv), apply_rope(k_rope, cos, sin, c.rope_interleave)

    def attend(
        self,
        q_nope: torch.Tensor,
        q_rope: torch.Tensor,
        latent: torch.Tensor,
        k_rope: torch.Tensor,
        mask: torch.Tensor | None,
        causal: bool,
    ) -> torch.Tensor:
        """Attention with the latent expanded to per-head K/V; returns [B,Tq,hidden]."""
        c = self.cfg
        b, s, _ = latent.shape
        kv = self.kv_b_proj(latent).view(b, s, c.num_attention_heads, -1).transpose(1, 2)
        k_nope, v = kv.split([c.qk_nope_head_dim, c.v_head_dim], dim=-1)
        k = torch.cat([k_nope, k_rope[:, None].expand(-1, c.num_attention_heads, -1, -1)], dim=-1)
        q = torch.cat([q_nope, q_rope], dim=-1)
        v_dim = v.shape[-1]
        if v_dim != q.shape[-1]:
            # SDPA's fused (flash) kernels want one head dim for q, k and v; MLA's values are
            # narrower, and a mismatch falls back to the math kernel, which materialises every
            # [T, T] score (~5x slower forward+backward at 2k tokens). Zero columns pad v to the
            # query width and are sliced off again: the same output, and no gradient to them.
            v = F.pad(v, (0, q.shape[-1] - v_dim))
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal and mask is None, scale=self.scale
        )[..., :v_dim]
        t = q.shape[2]
        return self.o_proj(out.transpose(1, 2).reshape(b, t, c.num_attention_heads * c.v_head_dim))

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        q_nope, q_rope = self.queries(x, cos, sin)
        latent, k_rope = self.latents(x, cos, sin)
        if self.logit_observer is not None:
            self.logit_observer(self.max_logits(q_nope, q_rope, latent, k_rope, mask))
        return self.attend(q_nope, q_rope, latent, k_rope, mask, causal=True)

    @torch.no_grad()
    def max_logits(
        self,
        q_nope: torch.Tensor,
        q_rope: torch.Tensor,
        latent: torch.Tensor,
        k_rope: torch.Tensor,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """Per head, the largest scale * q·k over the batch and the positions `attend` lets a
        query see (causal, or `mask`: additive or boolean, as SDPA reads it): [H], in float32
        even under autocast."""
        c = self.cfg
        b, s, _ = latent.shape
        h = c.num_attention_heads
        k_nope = self.kv_b_proj(latent).view(b, s, h, -1)[..., : c.qk_nope_head_dim]
        keys = torch.cat([k_nope.transpose(1, 2), k_rope[:, None].expand(-1, h, -1, -1)], dim=-1)
        keys = keys.float().transpose(-1, -2)
        queries = torch.cat([q_nope, q_rope], dim=-1).float()
        t = queries.shape[2]
        causal = torch.ones(t, s, dtype=torch.bool, device=latent.device).tril(s - t)
        best = queries.new_full((h,), float("-inf"))
        with torch.autocast(latent.device.type, enabled=False):  # float32 logits under autocast too
            for i in range(0, t, _LOGIT_BLOCK_ROWS):
                rows = slice(i, i + _LOGIT_BLOCK_ROWS)
                logits = (queries[:, :, rows] @ keys) * self.scale
                if mask is None:
                    logits = logits.masked_fill(~causal[rows], float("-inf"))
                elif mask.dtype == torch.bool:
                    logits = logits.masked_fill(~mask[..., rows, :], float("-inf"))
                else:
                    logits = logits + mask[..., rows, :]
                best = torch.maximum(best, logits.amax(dim=(0, 2, 3)))
        return best

    def absorbed_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """kv_b_proj split per head: W_uk [H,nope,kv_lora] (absorbed into queries) and
        W_uv [H,v,kv_lora] (applied after attending over the latent)."""
        c = self.cfg
        w = self.kv_b_proj.weight.view(c.num_attention_heads, c.qk_nope_head_dim + c.v_head_dim, c.kv_lora_rank)
        return w[:, : c.qk_nope_head_dim], w[:, c.qk_nope_head_dim :]
