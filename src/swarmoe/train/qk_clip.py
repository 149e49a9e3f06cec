"""QK-clip, the clip of Kimi K2's MuonClip: keeps attention logits bounded by rescaling the query
and key weights of the heads whose logits grew too large.

Muon lets q·k logits grow until training diverges. A head whose largest pre-softmax logit S
exceeds tau gets gamma = tau / S folded into its own weights: sqrt(gamma) into its q_nope and
k_nope rows, gamma into its q_rope rows. That scales exactly that head's logits by gamma. The
rotary key is shared by all heads, so it stays as it is.

K2 applies the rule after each optimizer step, with the S of that step's forward passes (the
weights before the update). Only the logits of the old weights on the old batch are then bounded:
the next forward pass runs the updated weights on a new batch, and a head pinned at tau is
pushed past it again by the update (`guard=False` keeps exactly that rule, in `after_step`).
By default the clip checks the bound where it is needed instead: before each training forward
pass of an attention layer (the guard), the heads' logits of the current weights on the layer's
actual input are computed, and the heads over tau are rescaled by the same rule before the
forward uses them. Every training forward pass then sees logits <= tau, up to float rounding.
It costs one more q·k pass per layer, as the observer does; with tau = inf the guard is off and
the observer only measures. The guard changes weights in place before a layer's forward, so
every forward pass must be followed by its backward before the next one (as the trainer does).
"""

from __future__ import annotations

from functools import partial

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.hooks import RemovableHandle

from swarmoe.model.attention import MLAttention


class QKClip:
    """Watches every MLAttention of `model` while it trains. Before each training forward pass of
    a layer, the guard clips that layer's heads whose logits on the pass's input exceed `tau`.
    `after_step()` (after `optimizer.step()`) closes the step; with `guard=False` it applies
    K2's rule alone, clipping the heads whose observed logits exceeded `tau` since the last call.

    For the training log, of the last step: `max_logit` is the largest logit the forward passes
    computed (over layers and heads; <= tau with the guard, up to rounding), `max_logit_unclipped`
    the largest the guard found before clipping (what the forward passes would have seen without
    it), `clipped_heads` how many head rescalings the guard and `after_step` made. LoRA-wrapped
    query or key projections are refused: scaling the base weight would not scale what the
    layer computes."""

    def __init__(self, model: nn.Module, tau: float = 100.0, *, guard: bool = True) -> None:
        if not tau > 0:
            raise ValueError(f"QK-clip tau must be positive, got {tau}")
        self.tau = tau
        self.guard = guard and tau != float("inf")
        self.max_logit = float("nan")
        self.max_logit_unclipped = float("nan")
        self.clipped_heads = 0
        self._layers = [(n, m) for n, m in model.named_modules() if isinstance(m, MLAttention)]
        if not self._layers:
            raise ValueError("QK-clip found no MLAttention layer in the model")
        self._seen: dict[int, torch.Tensor] = {}
        self._unclipped: dict[int, torch.Tensor] = {}
        self._guard_clips = 0
        self._handles: list[RemovableHandle] = []
        for i, (name, attn) in enumerate(self._layers):
            _projections(name, attn)  # refuse wrapped projections now rather than after a step
            attn.logit_observer = partial(self._observe, i)
            if self.guard:
                self._handles.append(attn.register_forward_pre_hook(partial(self._check, i)))

    def _observe(self, layer: int, max_logits: torch.Tensor) -> None:
        if not self._layers[layer][1].training:  # evaluation passes do not count
            return
        seen = self._seen.get(layer)
        self._seen[layer] = max_logits if seen is None else torch.maximum(seen, max_logits)

    @torch.no_grad()
    def _check(self, layer: int, attn: MLAttention, args: tuple) -> None:
        """Forward pre-hook (the guard): the heads' logits of the current weights on this input
        (x, cos, sin, mask), and the heads over tau clipped before the forward uses them."""
        if not attn.training:
            return
        x, cos, sin = args[:3]
        mask = args[3] if len(args) > 3 else None
        q_nope, q_rope = attn.queries(x, cos, sin)
        latent, k_rope = attn.latents(x, cos, sin)
        maxima = attn.max_logits(q_nope, q_rope, latent, k_rope, mask)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(maxima, op=dist.ReduceOp.MAX)  # every replica clips alike
        seen = self._unclipped.get(layer)
        self._unclipped[layer] = maxima if seen is None else torch.maximum(seen, maxima)
        heads = (maxima > self.tau).nonzero().flatten()
        if heads.numel():
            self._guard_clips += int(heads.numel())
            _clip(self._layers[layer][0], attn, heads, self.tau / maxima[heads])

    def remove(self) -> None:
        """Stop watching the model (its attention goes back to the plain forward)."""
        for _, attn in self._layers:
            attn.logit_observer = None
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._seen.clear()
        self._unclipped.clear()

    @torch.no_grad()
    def after_step(self) -> None:
        """Without the guard, clip the heads whose logits exceeded tau in the forward passes since
        the last call (all micro-batches of a step: K2's rule); start watching the next step."""
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
        # With the guard, each pass already ran under tau and the next pass's guard checks the
        # updated weights on its own input, which bounds more than this rule would.
        over = maxima > self.tau if not self.guard else torch.zeros_like(maxima, dtype=torch.bool)
        self.max_logit = float(maxima.max())
        self.max_logit_unclipped = max([self.max_logit] + [float(u.max()) for u in self._unclipped.values()])
        self._unclipped.clear()
        self.clipped_heads = int(over.sum()) + self._guard_clips
        self._guard_clips = 0
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
