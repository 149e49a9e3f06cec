"""MoonViT-3D, the K2.5 vision tower, and the patch-merger projector into the text model.

Images and video chunks arrive packed: `pixel_values` holds every patch of every item, one after
the other, and `grid_thw` says how the patches of item i are laid out (t frames of h x w patches,
raster order, frame-major). An image is an item with t == 1; a video is split by the processor
into chunks of up to `pos_emb_time` frames, each chunk its own item. Each item attends only to
itself; a chunk's frames are then averaged (temporal pooling) and every 2 x 2 patch
neighbourhood becomes one token for the language model.

Parameter names are the release's (`vision_tower.*` and `mm_projector.*` in the checkpoint
without those prefixes), so the loader maps checkpoint tensors 1:1 onto `state_dict` keys.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from swarmoe.config import VisionConfig

_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "silu": F.silu,
}


def _activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    try:
        return _ACTIVATIONS[name]
    except KeyError:
        raise ValueError(
            f"unsupported vision activation {name!r}; known: {sorted(_ACTIVATIONS)}"
        ) from None


def _kernel(merge_kernel: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(merge_kernel, int):
        return merge_kernel, merge_kernel
    kh, kw = merge_kernel
    return int(kh), int(kw)


def media_token_count(
    grid_thw_row: Sequence[int] | torch.Tensor, merge_kernel: int | Sequence[int]
) -> int:
    """Language-model tokens for one item: frames are pooled, so only h x w counts."""
    _, h, w = (int(v) for v in grid_thw_row)
    kh, kw = _kernel(merge_kernel)
    return (h // kh) * (w // kw)


def _grid_list(
    grid_thw: torch.Tensor | Sequence[Sequence[int]], kernel: tuple[int, int]
) -> list[tuple[int, int, int]]:
    """grid_thw as Python ints (one host sync), checked once for the whole forward."""
    rows = grid_thw.tolist() if isinstance(grid_thw, torch.Tensor) else list(grid_thw)
    if not rows or not all(isinstance(r, Sequence) and len(r) == 3 for r in rows):
        shape = tuple(grid_thw.shape) if isinstance(grid_thw, torch.Tensor) else len(rows)
        raise ValueError(f"grid_thw must be [items, 3] (t, h, w) rows, got {shape}")
    kh, kw = kernel
    grid = []
    for i, (t, h, w) in enumerate(rows):
        t, h, w = int(t), int(h), int(w)
        if min(t, h, w) < 1:
            raise ValueError(f"grid_thw[{i}] = {(t, h, w)} has a non-positive size")
        if h % kh or w % kw:
            raise ValueError(
                f"grid_thw[{i}] = {(t, h, w)}: h and w must be divisible by the merge kernel {kernel}"
            )
        grid.append((t, h, w))
    return grid


class PosEmb(nn.Module):
    """Learned spatial table, bicubically resized to each item's grid, plus a fixed temporal sinusoid.

    The temporal table is a non-persistent buffer: the release ships only `weight`.
    """

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        dim = cfg.hidden_size
        self.weight = nn.Parameter(torch.zeros(cfg.pos_emb_height, cfg.pos_emb_width, dim))
        # Frame f of a multi-frame chunk gets [sin(f w_i), cos(f w_i)], w_i = 10000^(-2i/dim).
        omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
        angles = torch.arange(cfg.pos_emb_time, dtype=torch.float64)[:, None] * 10000.0**-omega
        time_weight = torch.cat([angles.sin(), angles.cos()], dim=1).float()
        self.register_buffer("time_weight", time_weight, persistent=False)

    def spatial(self, h: int, w: int) -> torch.Tensor:
        """[h*w, dim] table for an h x w grid; the learned grid itself when it already fits."""
        if (h, w) == tuple(self.weight.shape[:2]):
            return self.weight.flatten(0, 1)
        table = self.weight.permute(2, 0, 1).unsqueeze(0).float()
        table = F.interpolate(table, size=(h, w), mode="bicubic", align_corners=False)
        return table[0].flatten(1).t().to(self.weight.dtype)

    def forward(self, grid: list[tuple[int, int, int]]) -> torch.Tensor:
        """[sum(t*h*w), dim] additive position embedding for the packed items."""
        num_frames = self.time_weight.shape[0]
        cache: dict[tuple[int, int], torch.Tensor] = {}
        parts = []
        for t, h, w in grid:
            if t > num_frames:
                raise ValueError(
                    f"a video chunk has {t} frames but the tower's temporal table has {num_frames}"
                )
            if (h, w) not in cache:
                cache[(h, w)] = self.spatial(h, w)
            table = cache[(h, w)]
            if t > 1:  # single frames (images) get no temporal term, as in the release
                time = self.time_weight[:t, None, :].to(table.dtype)
                table = (table.unsqueeze(0) + time).flatten(0, 1)
            parts.append(table)
        return parts[0] if len(parts) == 1 else torch.cat(parts)


class PatchEmbed(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        p = cfg.patch_size
        self.proj = nn.Conv2d(3, cfg.hidden_size, kernel_size=p, stride=p)
        self.pos_emb = PosEmb(cfg)

    def forward(self, pixel_values: torch.Tensor, grid: list[tuple[int, int, int]]) -> torch.Tensor:
        # A stride-p conv over a single p x p patch is a matmul over the flattened patch.
        x = F.linear(pixel_values.flatten(1), self.proj.weight.flatten(1), self.proj.bias)
        return x + self.pos_emb(grid).to(x.dtype)


def _rope_angles(
    grid: list[tuple[int, int, int]], head_dim: int, theta: float, device: torch.device
) -> torch.Tensor:
    """[patches, head_dim/2] rotation angles of the 2D rope.

    Rotation pair j of a head (dims 2j, 2j+1) turns with the patch's column for even j and its
    row for odd j, at frequency theta^(-4*(j//2)/head_dim); every frame of a chunk reuses its
    frame's positions.
    """
    sizes = torch.tensor(grid, device=device)
    t, h, w = sizes.unbind(1)
    counts = t * h * w
    total = int(counts.sum())
    item = torch.repeat_interleave(
        torch.arange(len(grid), device=device), counts, output_size=total
    )
    start = torch.cumsum(counts, 0) - counts
    in_frame = (torch.arange(total, device=device) - start[item]) % (h * w)[item]
    row = (in_frame // w[item]).float()
    col = (in_frame % w[item]).float()
    freqs = theta ** (-torch.arange(0, head_dim, 4, device=device, dtype=torch.float32) / head_dim)
    return torch.stack([col[:, None] * freqs, row[:, None] * freqs], dim=-1).flatten(1)


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs of x [patches, heads, head_dim] in float32 (the release's complex form)."""
    pairs = x.float().unflatten(-1, (-1, 2))
    even, odd = pairs.unbind(-1)
    cos, sin = cos[:, None, :], sin[:, None, :]
    out = torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1)
    return out.flatten(-2).to(x.dtype)


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.fc0 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc1 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = _activation(cfg.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc1(self.act(self.fc0(x)))


class EncoderBlock(nn.Module):
    """Pre-norm block: fused-qkv attention with 2D rope, then the MLP."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        if cfg.hidden_size % cfg.num_attention_heads or cfg.head_dim % 4:
            raise ValueError(
                f"vision hidden_size {cfg.hidden_size} must split into {cfg.num_attention_heads} "
                "heads whose size is a multiple of 4 (2D rope)"
            )
        self.num_heads = cfg.num_attention_heads
        self.head_dim = cfg.head_dim
        self.norm0 = nn.LayerNorm(cfg.hidden_size)
        self.norm1 = nn.LayerNorm(cfg.hidden_size)
        self.wqkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.wo = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.mlp = VisionMLP(cfg)

    def attention(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, groups: list[tuple[int, int]]
    ) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = self.wqkv(x).view(n, 3, self.num_heads, self.head_dim).unbind(1)
        q, k = _apply_rope(q, cos, sin), _apply_rope(k, cos, sin)
        outs = []
        start = 0
        # Items of equal length sit next to each other (see `_attention_order`), so each run of
        # `batch` items of `length` patches is one batched attention call with no mask.
        for batch, length in groups:
            end = start + batch * length
            qg, kg, vg = (
                y[start:end].view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
                for y in (q, k, v)
            )
            outs.append(
                F.scaled_dot_product_attention(qg, kg, vg).transpose(1, 2).reshape(end - start, -1)
            )
            start = end
        return self.wo(outs[0] if len(outs) == 1 else torch.cat(outs))

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, groups: list[tuple[int, int]]
    ) -> torch.Tensor:
        x = x + self.attention(self.norm0(x), cos, sin, groups)
        return x + self.mlp(self.norm1(x))


class Encoder(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(EncoderBlock(cfg) for _ in range(cfg.num_hidden_layers))
        self.final_layernorm = nn.LayerNorm(cfg.hidden_size)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, groups: list[tuple[int, int]]
    ) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, cos, sin, groups)
        return self.final_layernorm(x)


def _attention_order(
    lengths: list[int], device: torch.device
) -> tuple[torch.Tensor | None, list[tuple[int, int]]]:
    """Token permutation that puts items of equal length side by side, and the resulting runs.

    Returns (perm, runs): position i of the permuted sequence holds original token perm[i]
    (None when the packed order already groups them), and runs lists (items, length).
    """
    first_seen: dict[int, int] = {}
    for i, n in enumerate(lengths):
        first_seen.setdefault(n, i)
    order = sorted(range(len(lengths)), key=lambda i: (first_seen[lengths[i]], i))
    runs: list[tuple[int, int]] = []
    for i in order:
        if runs and runs[-1][1] == lengths[i]:
            runs[-1] = (runs[-1][0] + 1, lengths[i])
        else:
            runs.append((1, lengths[i]))
    if order == list(range(len(lengths))):
        return None, runs
    starts = [0]
    for n in lengths:
        starts.append(starts[-1] + n)
    perm = torch.cat([torch.arange(starts[i], starts[i + 1], device=device) for i in order])
    return perm, runs


def _merge_index(
    grid: list[tuple[int, int, int]], kernel: tuple[int, int], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather index [tokens, kh*kw, max_t] from packed patches to merged slots, and frames per token.

    Slot (m, j) of merged token m takes patch j of its kh x kw window (row-major) in every frame
    of its item; frames past the item's t point one past the last patch, at a zero row that the
    caller appends.
    """
    kh, kw = kernel
    max_t = max(t for t, _, _ in grid)
    pad = sum(t * h * w for t, h, w in grid)
    parts, frames = [], []
    offset = 0
    for t, h, w in grid:
        window = torch.arange(h * w, device=device).view(h // kh, kh, w // kw, kw)
        window = window.permute(0, 2, 1, 3).reshape(-1, 1, kh * kw, 1)
        step = torch.arange(max_t, device=device).view(1, 1, 1, -1) * (h * w)
        index = (offset + window + step).squeeze(1)
        index[..., t:] = pad
        parts.append(index)
        frames.append(torch.full((index.shape[0],), t, device=device))
        offset += t * h * w
    return torch.cat(parts), torch.cat(frames)


class VisionTower(nn.Module):
    """MoonViT-3D: patch embedding, encoder, temporal pooling and 2x2 merge (`vision_tower.*`)."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.kernel = _kernel(cfg.merge_kernel_size)
        self.patch_embed = PatchEmbed(cfg)
        self.encoder = Encoder(cfg)

    def forward(
        self, pixel_values: torch.Tensor, grid_thw: torch.Tensor | Sequence[Sequence[int]]
    ) -> torch.Tensor:
        """Merged features [tokens, kh*kw, hidden] of all items, item after item.

        pixel_values: [patches, 3, p, p] (as the processor makes it) or [patches, 3*p*p];
        grid_thw: [items, 3]. Item i owns the next `media_token_count(grid_thw[i])` rows.
        """
        cfg = self.cfg
        grid = _grid_list(grid_thw, self.kernel)
        lengths = [t * h * w for t, h, w in grid]
        p = cfg.patch_size
        patch_numel = 3 * p * p
        if pixel_values.shape[0] != sum(lengths) or pixel_values.shape[1:].numel() != patch_numel:
            raise ValueError(
                f"pixel_values {tuple(pixel_values.shape)} does not hold the {sum(lengths)} patches "
                f"of 3x{p}x{p} that grid_thw describes"
            )
        weight = self.patch_embed.proj.weight
        x = self.patch_embed(pixel_values.to(device=weight.device, dtype=weight.dtype), grid)

        angles = _rope_angles(grid, cfg.head_dim, cfg.rope_theta, x.device)
        perm, runs = _attention_order(lengths, x.device)
        if perm is not None:
            x, angles = x[perm], angles[perm]
        x = self.encoder(x, angles.cos(), angles.sin(), runs)

        index, frames = _merge_index(grid, self.kernel, x.device)
        if perm is not None:  # point at where each original token now sits
            where = torch.empty_like(perm)
            where[perm] = torch.arange(perm.numel(), device=perm.device)
            index = torch.cat([where, where.new_tensor([perm.numel()])])[index]
        if index.shape[-1] == 1:
            return x[index[..., 0]]
        padded = torch.cat([x, x.new_zeros(1, x.shape[1])])
        pooled = padded[index].float().sum(dim=2) / frames[:, None, None]
        return pooled.to(x.dtype)


class Projector(nn.Module):
    """Patch-merger MLP into the text model's hidden size (`mm_projector.*`)."""

    def __init__(self, vision_cfg: VisionConfig, text_hidden_size: int) -> None:
        super().__init__()
        kh, kw = _kernel(vision_cfg.merge_kernel_size)
        merged = vision_cfg.hidden_size * kh * kw
        self.pre_norm = nn.LayerNorm(vision_cfg.hidden_size, eps=vision_cfg.projector_ln_eps)
        act = vision_cfg.projector_hidden_act
        if act not in ("gelu", "gelu_pytorch_tanh", "gelu_new", "gelu_tanh"):
            raise ValueError(f"unsupported projector activation {act!r}")
        approximate = "none" if act == "gelu" else "tanh"
        self.proj = nn.Sequential(
            nn.Linear(merged, merged),
            nn.GELU(approximate=approximate),
            nn.Linear(merged, text_hidden_size),
        )

    def forward(self, merged: torch.Tensor) -> torch.Tensor:
        """[tokens, kh*kw, hidden] -> [tokens, text_hidden]."""
        x = self.pre_norm(merged)
        return self.proj(x.flatten(1))


def encode_media(
    tower: VisionTower,
    projector: Projector,
    pixel_values: torch.Tensor,
    grid_thw: torch.Tensor | Sequence[Sequence[int]],
) -> torch.Tensor:
    """Features [total_tokens, text_hidden] that replace the items' placeholder tokens, in item order."""
    return projector(tower(pixel_values, grid_thw))


__all__ = ["Projector", "VisionTower", "encode_media", "media_token_count"]
