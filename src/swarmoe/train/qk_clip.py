"""QK-clip, the clip of Kimi K2's MuonClip: keeps attention logits bounded by rescaling the query
and key weights of the heads whose logits grew too large.

Muon lets q·k logits grow until training diverges. After each optimizer step, every head whose
largest pre-softmax logit S in that step's forward passes exceeded tau gets gamma = tau / S
folded into its own weights: sqrt(gamma) into its q_nope and k_nope rows, gamma into its q_rope
rows. That scales exactly that head's logits by gamma. The rotary key is shared by all heads, so
it stays as it is.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.distributed as dist
from torch import nn

from swarmoe.model.attention import MLAttention


class QKClip:
    """Watches every MLAttention of `model` while it trains; `after_step()` (after
    `optimizer.step()`) clips the heads that exceeded `tau` since the previous call.

    `max_logit` (over layers and heads, before clipping) and `clipped_heads` describe the last
    step, for the training log. LoRA-wrapped query or key projections are refused: scaling the
    base weight would not scale what the layer computes."""

    def __init__(self, model: nn.Module, tau: float = 100.0) -> None:
        if not tau > 0:
            raise ValueError(f"QK-clip tau must be positive, got {tau}")
        self.tau = tau
        self.max_logit = float("nan")
        self.clipped_heads = 0
        self._layers = [(n, m) for n, m in model.named_modules() if isinstance(m, MLAttention)]
        if not self._layers:
            raise ValueError("QK-clip found no MLAttention layer in the model")
        self._seen: dict[int, torch.Tensor] = {}
        for i, (name, attn) in enumerate(self._layers):
            _projections(name, attn)  # refuse wrapped projections now rather than after a step
            attn.logit_observer = partial(self._observe, i)

    def _observe(self, layer: int, max_logits: torch.Tensor) -> None:
        if not self._layers[layer][1].training:  # evaluation passes do not count
            return
        seen = self._seen.get(layer)
        self._seen[layer] = max_logits if seen is None else torch.maximum(seen, max_logits)

    def remove(self) -> None:
        """Stop watching the model (its attention goes back to the plain forward)."""
        for _, attn in self._layers:
            attn.logit_observer = None
        self._seen.clear()

    @torch.no_grad()
    def after_step(self) -> None:
        """Clip the heads whose logits exceeded tau in the forward passes since the last call
        (all micro-batches of a step), and start watching the next step."""
        missing = [name for i, (name, _) in enumerate(self._layers) if i not in self._seen]
        if missing:
            raise RuntimeError(
                f"QK-clip saw no training forward pass of {missing[0]} since the last step "
                "(is the model in eval mode, or was after_step called twice?)"
            )
        maxima = torch.stack([self._seen[i] for i in range(len(self._layers))])  # [layers, H]
        self._seen.clear()
        if dist.is_available() and dist.is_initialized():
            # Every replica must clip alike, by the logits of the whole global batch.
            dist.all_reduce(maxima, op=dist.ReduceOp.MAX)
        over = maxima > self.tau
        self.max_logit = float(maxima.max())
        self.clipped_heads = int(over.sum())
        for (name, attn), layer_over, layer_max in zip(self._layers, over, maxima, strict=True):
            heads = layer_over.nonzero().flatten()
            if heads.numel():
                _clip(name, attn, heads, self.tau / layer_max[heads])


def _projections(name: str, attn: MLAttention) -> tuple[torch.Tensor, torch.Tensor]:
    """The query projection's weight and kv_b_proj's, which the clip rescales in place."""
    query = "q_proj" if attn.cfg.q_lora_rank is None else "q_b_proj"
    weights = []
    for attr in (query, "kv_b_proj"):
        proj = getattr(attn, attr)
        if not isinstance(proj, nn.Linear):
            kind = f"{type(proj).__module__}.{type(proj).__qualname__}"
            raise TypeError(
                f"QK-clip rescales rows of {name}.{attr}.weight, but {name}.{attr} is a {kind}, "
                "not a torch.nn.Linear (LoRA-wrapped?): scaling that weight would not scale what "
                "the layer computes; merge the adapter first or train without QK-clip"
            )
        weights.append(proj.weight)
    return weights[0], weights[1]


def _clip(name: str, attn: MLAttention, heads: torch.Tensor, gamma: torch.Tensor) -> None:
    """Scale the logits of `heads` by `gamma` [len(heads)] through their own weight rows."""
    c = attn.cfg
    q_weight, kv_weight = _projections(name, attn)
    nope = c.qk_nope_head_dim
    heads = heads.to(q_weight.device)
    gamma = gamma.to(q_weight.device, torch.float32)[:, None, None]
    root = gamma.sqrt()
    # Rows per head: queries [q_nope, q_rope] (the rope half interleaved within its own rows, so
    # one factor for all of them keeps the rotation as it is), kv_b_proj [k_nope, v].
    q = q_weight.view(c.num_attention_heads, c.qk_head_dim, -1)
    q[heads, :nope] *= root
    q[heads, nope:] *= gamma
    kv = kv_weight.view(c.num_attention_heads, nope + c.v_head_dim, -1)
    kv[heads, :nope] *= root
