"""One engine step through the network: every scheduled token of every sequence at once.

Tokens of all sequences are concatenated, so embeddings, projections, the MoE and the dense
layers run as one batch (the experts see every sequence's tokens together). Attention is the
only per-sequence part: new latents are written to their cache slots, prefill chunks attend with
the latent expanded to per-head keys and values, and decode steps attend over the latent
directly with `kv_b_proj` absorbed into the query (the form that makes MLA's cache small).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from swarmoe.engine.kv_cache import LatentCache, slot_indices
from swarmoe.engine.sequence import Sequence
from swarmoe.model.attention import MLAttention
from swarmoe.model.kimi import KimiForCausalLM, check_token_ids


@dataclass
class Work:
    """Compute tokens [start, end) of `seq` this step."""

    seq: Sequence
    start: int
    end: int

    @property
    def is_decode(self) -> bool:
        return self.end - self.start == 1 and self.start > 0


class ModelRunner:
    def __init__(self, model: nn.Module, cache: LatentCache) -> None:
        self.model = model
        self.lm: KimiForCausalLM = getattr(model, "language_model", model)
        self.cache = cache
        self.cfg = self.lm.cfg
        self.device = next(model.parameters()).device
        self.dtype = self.lm.model.embed_tokens.weight.dtype

    @torch.inference_mode()
    def step(self, work: list[Work]) -> torch.Tensor:
        """Logits [len(work), vocab] at the last computed token of each item."""
        text = self.lm.model
        embeds, positions, slots = [], [], []
        bs = self.cache.block_size
        for w in work:
            positions.append(torch.arange(w.start, w.end))
            slots.append(slot_indices(w.seq.block_table, w.start, w.end, bs))
            if w.seq.prompt_embeds is not None and w.start < len(w.seq.prompt_ids):
                prompt_end = min(w.end, len(w.seq.prompt_ids))
                part = [w.seq.prompt_embeds[w.start : prompt_end].to(self.device, self.dtype)]
                if w.end > prompt_end:
                    part.append(text.embed(self._ids(w.seq.token_ids[prompt_end : w.end]))[0])
                embeds.append(torch.cat(part))
            else:
                embeds.append(text.embed(self._ids(w.seq.token_ids[w.start : w.end]))[0])
        x = torch.cat(embeds)[None]
        pos = torch.cat(positions).to(self.device)
        slot = torch.cat(slots).to(self.device)
        cos, sin = text.rotary(pos[None])
        spans, offset = [], 0
        for w in work:
            spans.append((offset, offset + w.end - w.start))
            offset += w.end - w.start
        for index, layer in enumerate(text.layers):
            h = layer.input_layernorm(x)
            x = x + self._attention(index, layer.self_attn, h, cos, sin, slot, work, spans)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        last = torch.tensor([end - 1 for _, end in spans], device=self.device)
        return self.lm.lm_head(text.norm(x[0, last]))

    def _ids(self, ids: list[int]) -> torch.Tensor:
        t = torch.tensor(ids, dtype=torch.long, device=self.device)
        check_token_ids(t, self.cfg.vocab_size)
        return t[None]

    def _attention(
        self, index: int, attn: MLAttention, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
        slot: torch.Tensor, work: list[Work], spans: list[tuple[int, int]],
    ) -> torch.Tensor:
        q_nope, q_rope = attn.queries(h, cos, sin)
        latent, k_rope = attn.latents(h, cos, sin)
        store = self.cache.layer(index)
        store[slot] = torch.cat([latent[0], k_rope[0]], dim=-1).to(store.dtype)
        out = torch.empty(h.shape[1], attn.o_proj.in_features, dtype=h.dtype, device=h.device)
        decodes = [i for i, w in enumerate(work) if w.is_decode]
        if decodes:
            rows = torch.tensor([spans[i][0] for i in decodes], device=h.device)
            out[rows] = self._decode(attn, store, q_nope[0, :, rows], q_rope[0, :, rows], [work[i] for i in decodes])
        for i, w in enumerate(work):
            if w.is_decode:
                continue
            a, b = spans[i]
            out[a:b] = self._prefill(attn, store, q_nope[:, :, a:b], q_rope[:, :, a:b], w)
        return attn.o_proj(out)[None]

    def _gather(self, store: torch.Tensor, seq: Sequence, length: int) -> torch.Tensor:
        return store[slot_indices(seq.block_table, 0, length, self.cache.block_size).to(store.device)]

    def _prefill(
        self, attn: MLAttention, store: torch.Tensor, q_nope: torch.Tensor, q_rope: torch.Tensor, w: Work
    ) -> torch.Tensor:
        c = self.cfg
        cached = self._gather(store, w.seq, w.end).to(q_nope.dtype)
        latent, k_rope = cached.split([c.kv_lora_rank, c.qk_rope_head_dim], dim=-1)
        mask = None
        if w.start:
            q_pos = torch.arange(w.start, w.end, device=q_nope.device)[:, None]
            mask = torch.arange(w.end, device=q_nope.device)[None] <= q_pos
        kv = attn.kv_b_proj(latent).view(w.end, c.num_attention_heads, -1).transpose(0, 1)
        k_nope, v = kv.split([c.qk_nope_head_dim, c.v_head_dim], dim=-1)
        k = torch.cat([k_nope, k_rope[None].expand(c.num_attention_heads, -1, -1)], dim=-1)
        q = torch.cat([q_nope[0], q_rope[0]], dim=-1)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=attn.scale)
        return o.transpose(0, 1).reshape(w.end - w.start, -1)

    def _decode(
        self, attn: MLAttention, store: torch.Tensor, q_nope: torch.Tensor, q_rope: torch.Tensor,
        work: list[Work],
    ) -> torch.Tensor:
        """Absorbed MLA over the latent: q_nope [H,B,nope], q_rope [H,B,rope] -> [B, H*v]."""
        c = self.cfg
        lengths = [w.end for w in work]
        longest = max(lengths)
        width = store.shape[-1]
        batch = torch.zeros(len(work), longest, width, dtype=q_nope.dtype, device=q_nope.device)
        for i, w in enumerate(work):
            batch[i, : w.end] = self._gather(store, w.seq, w.end)
        latent, k_rope = batch.split([c.kv_lora_rank, c.qk_rope_head_dim], dim=-1)
        valid = torch.arange(longest, device=q_nope.device)[None] < torch.tensor(lengths, device=q_nope.device)[:, None]
        w_uk, w_uv = attn.absorbed_weights()
        q_latent = torch.einsum("hbn,hnk->bhk", q_nope, w_uk)
        scores = torch.einsum("bhk,bsk->bhs", q_latent, latent) + torch.einsum("hbr,bsr->bhs", q_rope, k_rope)
        scores = (scores * attn.scale).masked_fill(~valid[:, None], float("-inf"))
        probs = torch.softmax(scores.float(), dim=-1).to(latent.dtype)
        context = torch.einsum("bhs,bsk->bhk", probs, latent)
        return torch.einsum("bhk,hvk->bhv", context, w_uv).reshape(len(work), -1)
