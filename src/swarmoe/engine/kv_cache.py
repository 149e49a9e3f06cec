"""Paged cache of MLA latents, with prefix sharing by chained block hashes.

Per token and layer the cache holds only what MLA needs: the normalised `kv_lora_rank` latent
and the roped `qk_rope_head_dim` key (576 values at K2.5 size, ~70 KB/token over 61 layers in
bf16), never per-head keys and values. Full blocks are identified by a hash chained over every
token before them, so two requests with a common prefix share its blocks; `fork` shares all full
blocks of a sequence and copies its partial last block (copy on write).

`kv_cache_dtype="fp8"` stores the latents as float8_e4m3fn with two float32 scales per layer
and slot, one for the `kv_lora_rank` latent and one for the rope key (their magnitudes differ):
about half the bytes of a bf16 cache, lossy (each part is divided by its absolute maximum / 448
and rounded to e4m3, 3 mantissa bits). Values are dequantised to the compute dtype when read.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass

import torch

from swarmoe.engine.sequence import Sequence
from swarmoe.model.loader import as_dtype

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite float8_e4m3fn
SCALE_DTYPE = torch.float32
_FP8_NAMES = ("fp8", "float8_e4m3fn")


def cache_dtype(value: str | torch.dtype | None) -> torch.dtype | None:
    """The latent cache's storage dtype for `LLM(kv_cache_dtype=value)`; None: the model's."""
    if value is None or value == "auto":
        return None
    if value in _FP8_NAMES or value == FP8:
        return FP8
    if value in ("float32", "fp32", "bfloat16", "bf16", "float16", "fp16"):
        return as_dtype(value)
    if value in (torch.float32, torch.bfloat16, torch.float16):
        return value
    raise ValueError(
        f"kv_cache_dtype must be 'auto', 'float32', 'bfloat16', 'float16' or 'fp8' "
        f"(float8_e4m3fn), got {value!r}"
    )


def quantise_fp8(x: torch.Tensor, split: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., W] -> (float8_e4m3fn values [..., W], float32 scales [..., 2]): one scale for
    columns [:split] and one for [split:], each that part's absolute maximum / 448."""
    x = x.float()
    parts = (x[..., :split], x[..., split:])
    amax = torch.stack([p.abs().amax(-1) for p in parts], -1)
    scales = (amax / FP8_MAX).clamp_(min=torch.finfo(SCALE_DTYPE).tiny)  # all-zero parts: 0 / tiny
    q = torch.cat([(p / scales[..., i, None]).clamp_(-FP8_MAX, FP8_MAX) for i, p in enumerate(parts)], -1)
    return q.to(FP8), scales


def fp8_as_half(q: torch.Tensor) -> torch.Tensor:
    """float8_e4m3fn values as float16 holding value / 256, exactly (NaN codes aside).

    e4m3's exponent and mantissa bits sit in fp16's at a 7-bit shift, its exponent bias 8 lower;
    a few integer ops over the bits replace torch's CPU fp8 conversion (a scalar loop, ~10x
    slower); fp16 then widens natively.
    """
    h = q.view(torch.int8).to(torch.int16)  # sign-extended
    h <<= 7  # exponent and mantissa to bits 7..13, the sign to bits 14 and 15
    h &= ~0x4000  # the sign belongs in bit 15 only
    return h.view(torch.float16)


def dequantise_fp8(q: torch.Tensor, scales: torch.Tensor, split: int, dtype: torch.dtype) -> torch.Tensor:
    """The inverse of `quantise_fp8`, in `dtype`."""
    x = fp8_as_half(q).to(SCALE_DTYPE)
    x[..., :split] *= scales[..., :1] * 256  # powers of two: exact
    x[..., split:] *= scales[..., 1:] * 256
    return x.to(dtype)


class LatentLayer:
    """One layer's cache as [blocks * block_size, width] slots: the runner writes new latents
    into slots and reads slots back in its compute dtype."""

    __slots__ = ("slots",)

    def __init__(self, slots: torch.Tensor) -> None:
        self.slots = slots

    def write(self, index: torch.Tensor, values: torch.Tensor) -> None:
        self.slots[index] = values.to(self.slots.dtype)

    def read(self, index: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        x = self.slots[index]
        return x if x.dtype == dtype else x.to(dtype)


class FP8LatentLayer(LatentLayer):
    """A layer of an fp8 cache: quantised on write, dequantised on read."""

    __slots__ = ("scales", "split")

    def __init__(self, slots: torch.Tensor, scales: torch.Tensor, split: int) -> None:
        super().__init__(slots)
        self.scales, self.split = scales, split

    def write(self, index: torch.Tensor, values: torch.Tensor) -> None:
        q, scales = quantise_fp8(values, self.split)
        self.slots[index] = q
        self.scales[index] = scales

    def read(self, index: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return dequantise_fp8(self.slots[index], self.scales[index], self.split, dtype)


class LatentCache:
    """Storage: [layers, blocks, block_size, kv_lora + rope]; for fp8 also `scales`
    [layers, blocks, block_size, 2] (latent part, rope part), float32."""

    def __init__(
        self, num_layers: int, num_blocks: int, block_size: int, width: int,
        dtype: torch.dtype, device: torch.device | str, kv_lora_rank: int | None = None,
    ) -> None:
        self.block_size = block_size
        self.data = torch.zeros(num_layers, num_blocks, block_size, width, dtype=dtype, device=device)
        self.scales: torch.Tensor | None = None
        self.split = kv_lora_rank
        if dtype == FP8:
            if kv_lora_rank is None or not 0 < kv_lora_rank < width:
                raise ValueError("an fp8 latent cache needs kv_lora_rank (where the rope key starts)")
            self.scales = torch.ones(num_layers, num_blocks, block_size, 2, dtype=SCALE_DTYPE, device=device)

    @staticmethod
    def bytes_per_token(num_layers: int, width: int, dtype: torch.dtype) -> int:
        """Cache bytes per token over all layers, the fp8 scales included."""
        per_layer = width * torch.tensor([], dtype=dtype).element_size()
        if dtype == FP8:
            per_layer += 2 * torch.tensor([], dtype=SCALE_DTYPE).element_size()
        return num_layers * per_layer

    @property
    def block_bytes(self) -> int:
        """Bytes of one block over all layers, the fp8 scales included."""
        layers, _, block_size, width = self.data.shape
        return block_size * self.bytes_per_token(layers, width, self.data.dtype)

    def layer(self, index: int) -> LatentLayer:
        """One layer's cache slots, to write and read."""
        slots = self.data[index].view(-1, self.data.shape[-1])
        if self.scales is None:
            return LatentLayer(slots)
        return FP8LatentLayer(slots, self.scales[index].view(-1, 2), self.split)

    def copy_block(self, src: int, dst: int) -> None:
        self.data[:, dst] = self.data[:, src]
        if self.scales is not None:
            self.scales[:, dst] = self.scales[:, src]


def slot_indices(block_table: list[int], start: int, end: int, block_size: int) -> torch.Tensor:
    """Flat cache slots of token positions [start, end) of a sequence."""
    pos = torch.arange(start, end)
    blocks = torch.tensor(block_table, dtype=torch.long)[pos // block_size]
    return blocks * block_size + pos % block_size


def chain_hash(previous: bytes, tokens: list[int]) -> bytes:
    h = hashlib.blake2b(previous, digest_size=16)
    h.update(array("q", tokens).tobytes())
    return h.digest()


def block_hashes(seq: Sequence, count: int, block_size: int) -> list[bytes]:
    """The chained hashes of `seq`'s first `count` full blocks, computed once per sequence."""
    hashes = seq.block_hashes
    while len(hashes) < count:
        i = len(hashes)
        tokens = seq.token_slice(i * block_size, (i + 1) * block_size)
        hashes.append(chain_hash(hashes[-1] if hashes else b"", tokens))
    return hashes


@dataclass
class Block:
    id: int
    ref_count: int = 0
    hash: bytes | None = None
    tokens: tuple[int, ...] = ()


class BlockManager:
    """Which cache blocks are free, shared or owned; prefix lookup by chained hash."""

    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True) -> None:
        self.block_size = block_size
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Free blocks, least recently freed first (a freed block keeps its hash until reused).
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.by_hash: dict[bytes, int] = {}
        self.prefix_caching = prefix_caching
        self.hits = 0
        self.lookups = 0
        self.peak_used = 0  # most blocks in use at once (reset it to measure a window)

    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def num_used(self) -> int:
        return len(self.blocks) - len(self.free)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, seq: Sequence) -> bool:
        shared, from_free = self._hits(seq)
        return self.blocks_needed(seq.num_tokens) - shared + from_free <= self.num_free

    def _cached_prefix(self, seq: Sequence) -> list[int]:
        """Ids of the cached blocks holding `seq`'s leading full blocks. The last token is always
        computed, since its logits are needed; a hash match is confirmed on the tokens."""
        if not (self.prefix_caching and seq.cacheable):
            return []
        bs = self.block_size
        hashes = block_hashes(seq, (seq.num_tokens - 1) // bs, bs)
        found = []
        for i, h in enumerate(hashes):
            bid = self.by_hash.get(h)
            if bid is None or self.blocks[bid].tokens != tuple(seq.token_slice(i * bs, (i + 1) * bs)):
                break
            found.append(bid)
        return found

    def _hits(self, seq: Sequence) -> tuple[int, int]:
        """Prefix blocks `allocate` would reuse, and how many of those sit in the free list."""
        found = self._cached_prefix(seq)
        return len(found), sum(self.blocks[bid].ref_count == 0 for bid in found)

    def allocate(self, seq: Sequence) -> None:
        """Blocks for all of `seq`'s current tokens, reusing cached prefix blocks."""
        assert not seq.block_table
        cached = 0
        found = self._cached_prefix(seq)
        if self.prefix_caching and seq.cacheable:
            # Lookups stop at the first miss: the hits, plus that miss when there was one.
            self.lookups += len(found) + (len(found) < (seq.num_tokens - 1) // self.block_size)
        for bid in found:
            self.hits += 1
            block = self.blocks[bid]
            if block.ref_count == 0:
                del self.free[bid]
                self.peak_used = max(self.peak_used, self.num_used)
            block.ref_count += 1
            seq.block_table.append(bid)
            cached += self.block_size
        seq.num_cached = seq.num_computed = cached
        while len(seq.block_table) < self.blocks_needed(seq.num_tokens):
            seq.block_table.append(self._take_fresh().id)

    def _take_fresh(self) -> Block:
        block = self.blocks[self.free.popitem(last=False)[0]]
        if block.hash is not None and self.by_hash.get(block.hash) == block.id:
            del self.by_hash[block.hash]
        block.hash, block.tokens, block.ref_count = None, (), 1
        self.peak_used = max(self.peak_used, self.num_used)
        return block

    def ensure(self, seq: Sequence, num_tokens: int) -> bool:
        """Grow `seq`'s block table to hold `num_tokens`; False when the cache is full."""
        need = self.blocks_needed(num_tokens) - len(seq.block_table)
        if need > self.num_free:
            return False
        for _ in range(need):
            seq.block_table.append(self._take_fresh().id)
        return True

    def register_full_blocks(self, seq: Sequence, upto: int) -> None:
        """Publish the hashes of the full blocks below token `upto`, for later requests.

        The scheduler calls this for tokens it has just scheduled: within a step every layer
        writes all new latents before any sequence attends, so a request admitted later in the
        same step may already share them.
        """
        if not (self.prefix_caching and seq.cacheable):
            return
        bs = self.block_size
        count = upto // bs
        if count <= seq.num_registered:
            return
        hashes = block_hashes(seq, count, bs)
        for i in range(seq.num_registered, count):
            block = self.blocks[seq.block_table[i]]
            if block.hash is None:
                block.hash, block.tokens = hashes[i], tuple(seq.token_slice(i * bs, (i + 1) * bs))
                self.by_hash.setdefault(hashes[i], block.id)
        seq.num_registered = count

    def free_sequence(self, seq: Sequence) -> None:
        computed = seq.num_computed // self.block_size
        for i in reversed(range(len(seq.block_table))):
            block = self.blocks[seq.block_table[i]]
            block.ref_count -= 1
            if block.ref_count:
                continue
            if i >= computed and block.hash is not None:
                # Published when scheduled, but preempted before it was computed.
                if self.by_hash.get(block.hash) == block.id:
                    del self.by_hash[block.hash]
                block.hash, block.tokens = None, ()
            # A computed block stays findable by hash until it is handed out again.
            self.free[block.id] = None
        seq.block_table = []
        seq.num_computed = 0
        seq.num_registered = 0

    def fork(self, parent: Sequence, child: Sequence, cache: LatentCache) -> bool:
        """Give `child` the parent's cache: full blocks shared, the partial block copied."""
        full, partial = divmod(parent.num_computed, self.block_size)
        if partial and not self.num_free:
            return False
        child.block_table = parent.block_table[:full]
        child.num_registered = 0
        for bid in child.block_table:
            self.blocks[bid].ref_count += 1
        if partial:
            block = self._take_fresh()
            cache.copy_block(parent.block_table[full], block.id)
            child.block_table.append(block.id)
        child.num_computed = parent.num_computed
        return True
