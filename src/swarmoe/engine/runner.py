"""One engine step through the network: every scheduled token of every sequence at once.

Tokens of all sequences are concatenated, so embeddings, projections, the MoE and the dense
layers run as one batch (the experts see every sequence's tokens together). Attention is the
only per-sequence part. New latents are written to their cache slots first; then each query
attends in one of two forms, whichever costs fewer operations:

- expanded (long prefill chunks): the cached latent goes through `kv_b_proj` to per-head keys and
  values, and SDPA runs causally;
- absorbed (decode steps and short chunks over a long context): `kv_b_proj` is folded into the
  query, which attends over the latent directly (the form that makes MLA's cache small). Queries
  of sequences that share cached prefix blocks score that prefix together, in one GEMM over a
  single copy of it, and their own blocks in a batched GEMM; the two parts are merged with their
  log-sum-exp (exact, only the summation order changes).

Everything that depends only on the schedule (slots, masks, groups) is built once per step, not
per layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from swarmoe.engine.kv_cache import LatentCache, LatentLayer
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


@dataclass
class _Group:
    """Absorbed rows whose sequences share the cache slots `slots` (their first positions)."""

    rows: torch.Tensor | None  # indices into the absorbed rows; None: all of them
    slots: torch.Tensor  # [S] cache slots of the shared positions


@dataclass
class _Plan:
    """What attention needs in every layer, built once per step."""

    write_slots: torch.Tensor  # [T] where each new token's latent goes
    # Expanded items: (row span in the step's tokens, cache slots [0, end), start, end)
    expanded: list[tuple[int, int, torch.Tensor, int, int]]
    # Absorbed rows
    rows: torch.Tensor | None = None  # [R] indices into the step's tokens
    private_slots: torch.Tensor | None = None  # [R, P] slots of each row's own keys
    private_bias: torch.Tensor | None = None  # [R, 1, P] 0 where the row may attend, else -inf
    groups: list[_Group] | None = None


class ModelRunner:
    def __init__(self, model: nn.Module, cache: LatentCache) -> None:
        self.model = model
        self.lm: KimiForCausalLM = getattr(model, "language_model", model)
        self.cache = cache
        self.cfg = self.lm.cfg
        self.device = next(model.parameters()).device
        self.dtype = self.lm.model.embed_tokens.weight.dtype
        self._absorbed: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    @torch.inference_mode()
    def step(self, work: list[Work]) -> torch.Tensor:
        """Logits [len(work), vocab] at the last computed token of each item."""
        text = self.lm.model
        x = self._embed(work)
        positions = [p for w in work for p in range(w.start, w.end)]
        pos = torch.tensor(positions, device=self.device)
        cos, sin = text.rotary(pos[None])
        plan = self._plan(work)
        for index, layer in enumerate(text.layers):
            h = layer.input_layernorm(x)
            x = x + self._attention(index, layer.self_attn, h, cos, sin, plan)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        last, offset = [], 0
        for w in work:
            offset += w.end - w.start
            last.append(offset - 1)
        return self.lm.lm_head(text.norm(x[0, torch.tensor(last, device=self.device)]))

    # -- inputs -------------------------------------------------------------------------------

    def _embed(self, work: list[Work]) -> torch.Tensor:
        """[1, T, hidden]: token embeddings, with multimodal prompts' own embeddings spliced in."""
        ids: list[int] = []
        spliced: list[tuple[int, torch.Tensor]] = []
        for w in work:
            seq = w.seq
            n_prompt = len(seq.prompt_ids)
            if seq.prompt_embeds is not None and w.start < n_prompt:
                prompt_end = min(w.end, n_prompt)
                spliced.append((len(ids), seq.prompt_embeds[w.start:prompt_end]))
                ids.extend([0] * (prompt_end - w.start))
                ids.extend(seq.output_ids[: w.end - prompt_end])
            elif w.start >= n_prompt:
                ids.extend(seq.output_ids[w.start - n_prompt : w.end - n_prompt])
            else:
                ids.extend(seq.prompt_ids[w.start : min(w.end, n_prompt)])
                ids.extend(seq.output_ids[: max(w.end - n_prompt, 0)])
        t = torch.tensor(ids, dtype=torch.long, device=self.device)
        check_token_ids(t, self.cfg.vocab_size)
        x = self.lm.model.embed_tokens(t)
        for at, embeds in spliced:
            x[at : at + embeds.shape[0]] = embeds.to(self.device, x.dtype)
        return x[None]

    def _absorb_cheaper(self, w: Work, shared: int) -> bool:
        """Multiply-adds per head of attending over `w.end` positions with `w.end - w.start`
        queries: expanding the latent to per-head keys and values, against folding kv_b_proj into
        the queries; `shared` leading positions are scored together with other sequences (their
        cost there is left out: it is paid once for all of them)."""
        c = self.cfg
        tq, ctx = w.end - w.start, w.end
        fold = c.kv_lora_rank * (c.qk_nope_head_dim + c.v_head_dim)
        expanded = ctx * fold + tq * ctx * (c.qk_head_dim + c.v_head_dim)
        absorbed = tq * fold + tq * (ctx - shared) * (2 * c.kv_lora_rank + c.qk_rope_head_dim)
        return absorbed < expanded

    def _groups(self, work: list[Work], candidates: list[int]) -> dict[int, tuple[list[int], list[int]]]:
        """Items that share leading cache blocks: group id -> (items, shared block ids).

        Sequences are grouped by their first cache block; a group shares the longest run of
        blocks common to all its members that lies wholly before every member's new tokens.
        """
        bs = self.cache.block_size
        by_first: dict[int, list[int]] = {}
        for i in candidates:
            if work[i].start >= bs:
                by_first.setdefault(work[i].seq.block_table[0], []).append(i)
        groups = {}
        for first_block, members in by_first.items():
            if len(members) < 2:
                continue
            tables = [work[i].seq.block_table for i in members]
            limit = min(work[i].start // bs for i in members)
            common = 0
            first = tables[0]
            while common < limit and all(t[common] == first[common] for t in tables):
                common += 1
            if common:
                groups[first_block] = (members, first[:common])
        return groups

    def _plan(self, work: list[Work]) -> _Plan:
        bs = self.cache.block_size
        dev = self.device
        write: list[int] = []
        spans = []
        offset = 0
        for w in work:
            table = w.seq.block_table
            write.extend(table[p // bs] * bs + p % bs for p in range(w.start, w.end))
            spans.append(offset)
            offset += w.end - w.start
        groups = self._groups(work, list(range(len(work))))
        shared = [0] * len(work)
        for members, blocks in groups.values():
            for i in members:
                shared[i] = len(blocks) * bs
        absorbed = [i for i, w in enumerate(work) if w.is_decode or self._absorb_cheaper(w, shared[i])]
        if len(absorbed) < len(work):  # expanded items leave their groups
            groups = self._groups(work, absorbed)
        expanded = []
        for i in sorted(set(range(len(work))) - set(absorbed)):
            w, table = work[i], work[i].seq.block_table
            slots = torch.tensor([table[p // bs] * bs + p % bs for p in range(w.end)], device=dev)
            expanded.append((spans[i], spans[i] + w.end - w.start, slots, w.start, w.end))
        plan = _Plan(torch.tensor(write, device=dev), expanded)
        if absorbed:
            self._plan_absorbed(plan, work, absorbed, spans, groups)
        return plan

    def _plan_absorbed(
        self, plan: _Plan, work: list[Work], absorbed: list[int], spans_all: list[int],
        by_item: dict[int, tuple[list[int], list[int]]],
    ) -> None:
        """Rows, private keys and shared-prefix groups of the absorbed items."""
        bs = self.cache.block_size
        dev = self.device
        index = {i: j for j, i in enumerate(absorbed)}
        items = [work[i] for i in absorbed]
        spans = [spans_all[i] for i in absorbed]
        shared_blocks = [0] * len(items)
        groups: list[tuple[list[int], list[int]]] = []
        for members, blocks in by_item.values():
            local = [index[i] for i in members]
            for j in local:
                shared_blocks[j] = len(blocks)
            groups.append((local, blocks))
        # Private keys: positions [shared, end) of each item, padded to the longest.
        starts = [shared_blocks[j] * bs for j in range(len(items))]
        width = max(w.end - s for w, s in zip(items, starts, strict=True))
        longest_table = max(len(w.seq.block_table) for w in items)
        tables = torch.tensor([w.seq.block_table + [0] * (longest_table - len(w.seq.block_table)) for w in items])
        first_pos = torch.tensor(starts)
        ends = torch.tensor([w.end for w in items])
        key_pos = first_pos[:, None] + torch.arange(width)[None]  # [items, P]
        clamped = torch.minimum(key_pos, ends[:, None] - 1)
        slots = tables.gather(1, clamped // bs) * bs + clamped % bs
        counts = [w.end - w.start for w in items]
        if all(n == 1 for n in counts):
            rows = torch.tensor(spans)
            q_pos = ends - 1
            item_of_row = None
        else:
            rows = torch.tensor([s + k for s, n in zip(spans, counts, strict=True) for k in range(n)])
            q_pos = torch.tensor([w.start + k for w in items for k in range(w.end - w.start)])
            item_of_row = torch.repeat_interleave(torch.arange(len(items)), torch.tensor(counts))
            slots, key_pos = slots[item_of_row], key_pos[item_of_row]
        plan.rows = rows.to(dev)
        plan.private_slots = slots.to(dev)
        hidden = key_pos > q_pos[:, None]
        if bool(hidden.any()):
            bias = torch.zeros(hidden.shape, dtype=self.dtype).masked_fill_(hidden, float("-inf"))
            plan.private_bias = bias[:, None].to(dev)
        if not groups:
            return
        row_first = [0]
        for n in counts:
            row_first.append(row_first[-1] + n)
        plan.groups = []
        for members, blocks in groups:
            block_ids = torch.tensor(blocks)
            shared = (block_ids[:, None] * bs + torch.arange(bs)[None]).flatten().to(dev)
            if len(members) == len(items):
                plan.groups.append(_Group(None, shared))
                continue
            member_rows = [r for j in members for r in range(row_first[j], row_first[j + 1])]
            plan.groups.append(_Group(torch.tensor(member_rows, device=dev), shared))

    # -- attention ------------------------------------------------------------------------------

    def _attention(
        self, index: int, attn: MLAttention, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
        plan: _Plan,
    ) -> torch.Tensor:
        q_nope, q_rope = attn.queries(h, cos, sin)
        latent, k_rope = attn.latents(h, cos, sin)
        store = self.cache.layer(index)
        store.write(plan.write_slots, torch.cat([latent[0], k_rope[0]], dim=-1))
        if not plan.expanded and plan.rows is not None and len(plan.rows) == h.shape[1]:
            # Every token is absorbed (a decode step): rows are the tokens in order.
            out = self._absorbed_rows(index, attn, store, q_nope[0], q_rope[0], plan)
            return attn.o_proj(out)[None]
        out = torch.empty(h.shape[1], attn.o_proj.in_features, dtype=h.dtype, device=h.device)
        if plan.rows is not None:
            out[plan.rows] = self._absorbed_rows(
                index, attn, store, q_nope[0, :, plan.rows], q_rope[0, :, plan.rows], plan)
        for a, b, slots, start, end in plan.expanded:
            out[a:b] = self._expanded(attn, store, q_nope[:, :, a:b], q_rope[:, :, a:b], slots, start, end)
        return attn.o_proj(out)[None]

    def _expanded(
        self, attn: MLAttention, store: LatentLayer, q_nope: torch.Tensor, q_rope: torch.Tensor,
        slots: torch.Tensor, start: int, end: int,
    ) -> torch.Tensor:
        c = self.cfg
        heads = c.num_attention_heads
        cached = store.read(slots, q_nope.dtype)
        latent, k_rope = cached.split([c.kv_lora_rank, c.qk_rope_head_dim], dim=-1)
        kv = attn.kv_b_proj(latent).view(end, heads, -1).transpose(0, 1)
        k_nope, v = kv.split([c.qk_nope_head_dim, c.v_head_dim], dim=-1)
        k = torch.cat([k_nope, k_rope[None].expand(heads, -1, -1)], dim=-1)
        q = torch.cat([q_nope[0], q_rope[0]], dim=-1)
        # 4-D, one head size for q, k and v (v zero-padded) and an additive mask: the form that
        # PyTorch's CPU flash kernel takes; otherwise SDPA falls back to its math path, 5-10x slower.
        pad = c.qk_head_dim - c.v_head_dim
        if pad > 0:
            v = F.pad(v, (0, pad))
        mask = None
        if start:
            visible = torch.arange(end, device=q.device)[None] <= torch.arange(start, end, device=q.device)[:, None]
            mask = torch.zeros(visible.shape, dtype=q.dtype, device=q.device).masked_fill_(~visible, float("-inf"))
        o = F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask, is_causal=mask is None,
                                           scale=attn.scale)[0]
        return o[..., : c.v_head_dim].transpose(0, 1).reshape(end - start, -1)

    def _absorbed_weights(self, index: int, attn: MLAttention) -> tuple[torch.Tensor, torch.Tensor]:
        """W_uk [H, nope, L] and W_uv^T [H, L, v], contiguous, kept per layer."""
        found = self._absorbed.get(index)
        weight = attn.kv_b_proj.weight
        if found is None or found[0].dtype != weight.dtype:
            w_uk, w_uv = attn.absorbed_weights()
            found = (w_uk.contiguous(), w_uv.transpose(1, 2).contiguous())
            self._absorbed[index] = found
        return found

    def _absorbed_rows(
        self, index: int, attn: MLAttention, store: LatentLayer, q_nope: torch.Tensor, q_rope: torch.Tensor,
        plan: _Plan,
    ) -> torch.Tensor:
        """Absorbed MLA for the plan's rows: q_nope [H,R,nope], q_rope [H,R,rope] -> [R, H*v].

        Each row attends to its own keys (batched, masked) and, in a group, to the group's shared
        prefix; the parts are merged by log-sum-exp: absorbed ones in the latent space, before
        W_uv, an expanded one (its values already per head) after it.
        """
        c = self.cfg
        w_uk, w_uv_t = self._absorbed_weights(index, attn)
        heads, rows = q_nope.shape[0], q_nope.shape[1]
        # Queries in the cache's space: [R, H, lora + rope], pre-scaled.
        q = (torch.cat([torch.bmm(q_nope, w_uk), q_rope], dim=-1).transpose(0, 1) * attn.scale).contiguous()
        keys = store.read(plan.private_slots, q.dtype)
        context, lse = self._latent_attention(q, keys, plan.private_bias)  # [R, H, lora], [R, H, 1]
        expanded = []
        for g in plan.groups or []:
            shared = store.read(g.slots, q.dtype)
            qg = q if g.rows is None else q.index_select(0, g.rows)
            if self._absorb_shared(qg.shape[0]):
                n = qg.shape[0]
                ctx_g, lse_g = self._latent_attention(qg.reshape(1, n * heads, -1), shared[None], None)
                mine_ctx, mine_lse = (context, lse) if g.rows is None else (context[g.rows], lse[g.rows])
                merged = _merge(mine_ctx, mine_lse, ctx_g.view(n, heads, -1), lse_g.view(n, heads, 1))
                if g.rows is None:
                    context = merged
                else:
                    context[g.rows] = merged
            else:
                nope = q_nope if g.rows is None else q_nope[:, g.rows]
                rope = q_rope if g.rows is None else q_rope[:, g.rows]
                expanded.append((g.rows, *self._expanded_shared(attn, shared, nope, rope)))
        out = torch.bmm(context.transpose(0, 1), w_uv_t).transpose(0, 1)  # [R, H, v]
        for g_rows, out_g, lse_g in expanded:
            if g_rows is None:
                out = _merge(out, lse, out_g, lse_g)
            else:
                out[g_rows] = _merge(out[g_rows], lse[g_rows], out_g, lse_g)
        return out.reshape(rows, heads * c.v_head_dim)

    def _absorb_shared(self, rows: int) -> bool:
        """Absorbed, a (row, head) pays 2*lora + rope per shared key; expanding the shared latents
        once costs lora * (nope + v) per key and head, after which a (row, head) pays
        nope + rope + v. Many rows (a prefill chunk per sequence) make expanding cheaper."""
        c = self.cfg
        absorbed = rows * (2 * c.kv_lora_rank + c.qk_rope_head_dim)
        expanded = c.kv_lora_rank * (c.qk_nope_head_dim + c.v_head_dim) + rows * (c.qk_head_dim + c.v_head_dim)
        return absorbed <= expanded

    def _expanded_shared(
        self, attn: MLAttention, shared: torch.Tensor, q_nope: torch.Tensor, q_rope: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows q_nope [H,Rg,nope] / q_rope [H,Rg,rope] over the shared entries [S, lora + rope],
        expanded to per-head keys and values: (output [Rg, H, v], log-sum-exp [Rg, H, 1])."""
        c = self.cfg
        heads, s_len = c.num_attention_heads, shared.shape[0]
        latent, k_rope = shared.split([c.kv_lora_rank, c.qk_rope_head_dim], dim=-1)
        kv = attn.kv_b_proj(latent).view(s_len, heads, -1).transpose(0, 1)  # [H, S, nope + v]
        k_nope, v = kv.split([c.qk_nope_head_dim, c.v_head_dim], dim=-1)
        pad = c.qk_head_dim - c.v_head_dim  # the flash kernel wants one head size for q, k and v
        if _FLASH_CPU is not None and q_nope.device.type == "cpu" and pad >= 0:
            k = torch.cat([k_nope, k_rope[None].expand(heads, -1, -1)], dim=-1)
            qf = torch.cat([q_nope, q_rope], dim=-1)
            vp = F.pad(v, (0, pad)) if pad else v
            out, lse = _FLASH_CPU(qf[None], k[None], vp[None], 0.0, False, scale=attn.scale)[:2]
            return out[0, ..., : c.v_head_dim].transpose(0, 1), lse[0].transpose(0, 1)[..., None].float()
        s = torch.bmm(q_nope, k_nope.transpose(1, 2)) + (q_rope @ k_rope.t())  # [H, Rg, S]
        s = (s * attn.scale).float().transpose(0, 1)  # [Rg, H, S]
        lse = torch.logsumexp(s, -1, keepdim=True)
        out = torch.bmm(torch.exp(s - lse).transpose(0, 1).to(v.dtype), v).transpose(0, 1)  # [Rg, H, v]
        return out, lse

    def _latent_attention(
        self, q: torch.Tensor, keys: torch.Tensor, bias: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q [B, M, W] (pre-scaled) over keys [B, S, W], whose first kv_lora_rank columns are also
        the values; bias [B, 1, S] additive or None -> (context [B, M, lora], lse [B, M, 1] float32)."""
        lora = self.cfg.kv_lora_rank
        if _FLASH_CPU is not None and q.device.type == "cpu":
            # The keys serve as values whole (one head size for q, k and v); the rope columns of
            # the output are dropped.
            kv = keys[:, None]
            mask = None if bias is None else bias[:, None]
            out, lse = _FLASH_CPU(q[:, None], kv, kv, 0.0, False, attn_mask=mask, scale=1.0)[:2]
            return out[:, 0, :, :lora], lse[:, 0, :, None].float()
        s = torch.bmm(q, keys.transpose(1, 2)).float()
        if bias is not None:
            s = s + bias
        lse = torch.logsumexp(s, -1, keepdim=True)
        return torch.bmm(torch.exp(s - lse).to(q.dtype), keys[..., :lora]), lse


def _merge(a: torch.Tensor, lse_a: torch.Tensor, b: torch.Tensor, lse_b: torch.Tensor) -> torch.Tensor:
    """Softmax-weighted outputs over two disjoint key sets -> the output over their union."""
    top = torch.maximum(lse_a, lse_b)
    wa, wb = torch.exp(lse_a - top), torch.exp(lse_b - top)
    return ((a.float() * wa + b.float() * wb) / (wa + wb)).to(a.dtype)


# CPU flash attention with its log-sum-exp (a private ATen op; absent -> the unfused path).
_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
