"""Images and video into the patch tensors that the K2.5 vision tower reads.

The output equals what transformers' `Kimi_K25` image and video processors make: images keep
their native resolution unless they exceed the patch budget (then they are scaled down,
never up), are zero-padded to a multiple of merge x patch pixels, scaled to [-1, 1], and cut
into patches in raster order. Videos are sampled at `sample_fps` and cut into chunks of
`chunk_frames` frames; each chunk is one item of the tower (one `grid_thw` row).

torch is imported inside the functions so that `swarmoe.text` stays importable without it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    import torch

ImageLike = Image.Image | np.ndarray
"""A PIL image, or a uint8 array [H, W], [H, W, 3] or [H, W, 4]."""


@dataclass(frozen=True)
class MediaConfig:
    """Preprocessing settings; the defaults are K2.5's."""

    patch_size: int = 14
    merge_size: int = 2
    max_patches: int = 16384
    max_patches_per_side: int = 512
    video_max_patches: int = 4096  # per frame
    sample_fps: float = 2.0
    chunk_frames: int = 4
    mean: float = 0.5
    std: float = 0.5


@dataclass
class MediaBatch:
    """Tower inputs for a list of items, plus what a prompt needs to reserve for them.

    For images an item is an image; for videos it is a chunk, and `chunks_per_video` and
    `chunk_timestamps` (chunk start, seconds into its video) describe how chunks map to videos.
    """

    pixel_values: torch.Tensor  # [patches, 3, patch, patch] float32
    grid_thw: torch.Tensor  # [items, 3] int64
    token_counts: list[int]  # language-model tokens per item
    chunks_per_video: list[int] = field(default_factory=list)
    chunk_timestamps: list[float] = field(default_factory=list)


def target_size(
    height: int,
    width: int,
    *,
    patch_size: int,
    merge_size: int,
    max_patches: int,
    max_patches_per_side: int,
) -> tuple[tuple[int, int], tuple[int, int]]:
    """(resized (h, w), padded (h, w)) for an image of height x width pixels.

    One scale, at most 1, brings the patch count under `max_patches` and each side under
    `max_patches_per_side` patches; the padded size is the next multiple of merge x patch.
    """
    if height < 1 or width < 1:
        raise ValueError(f"image has no pixels: {height}x{width}")
    patches = max(1.0, height // patch_size) * max(1.0, width // patch_size)
    side_px = max_patches_per_side * patch_size
    scale = min(1.0, math.sqrt(max_patches / patches), side_px / height, side_px / width)
    new_h = min(max(1, int(height * scale)), side_px)
    new_w = min(max(1, int(width * scale)), side_px)
    unit = merge_size * patch_size
    return (new_h, new_w), (-(-new_h // unit) * unit, -(-new_w // unit) * unit)


def format_timestamp(seconds: float) -> str:
    """`HH:MM:SS.fff`, the form that precedes each video chunk in a K2.5 prompt."""
    return time.strftime("%H:%M:%S", time.gmtime(seconds)) + f".{int(seconds % 1 * 1000):03d}"


def _rgb_array(image: ImageLike) -> np.ndarray:
    """uint8 [H, W, 3]; transparency is composited onto white, as the reference does."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise ValueError(f"image arrays must be uint8, got {image.dtype}")
        if image.ndim == 3 and image.shape[2] == 3:
            return image
        if image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (1, 4)):
            image = Image.fromarray(
                image.squeeze(2) if image.ndim == 3 and image.shape[2] == 1 else image
            )
        else:
            raise ValueError(
                f"image array must be [H, W], [H, W, 3] or [H, W, 4], got {image.shape}"
            )
    if not isinstance(image, Image.Image):
        raise ValueError(f"expected a PIL image or a uint8 array, got {type(image).__name__}")
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    return np.array(image.convert("RGB"))


def _patches(
    frames: np.ndarray, cfg: MediaConfig, max_patches: int
) -> tuple[torch.Tensor, list[int]]:
    """uint8 frames [T, H, W, 3] of one item -> ([T*gh*gw, 3, p, p] float32, [T, gh, gw])."""
    import torch
    import torch.nn.functional as F

    t, height, width, _ = frames.shape
    (new_h, new_w), (pad_h, pad_w) = target_size(
        height,
        width,
        patch_size=cfg.patch_size,
        merge_size=cfg.merge_size,
        max_patches=max_patches,
        max_patches_per_side=cfg.max_patches_per_side,
    )
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).contiguous()
    if (new_h, new_w) != (height, width):
        # torch's uint8 antialiased bicubic: what the reference (torchvision on CPU) runs.
        x = F.interpolate(
            x, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True
        )
    x = F.pad(x, (0, pad_w - new_w, 0, pad_h - new_h))
    x = (x.float() - cfg.mean * 255) / (cfg.std * 255)
    p = cfg.patch_size
    gh, gw = pad_h // p, pad_w // p
    x = x.view(t, 3, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5).reshape(t * gh * gw, 3, p, p)
    return x, [t, gh, gw]


def _batch(
    items: list[tuple[torch.Tensor, list[int]]], cfg: MediaConfig, **video: Any
) -> MediaBatch:
    import torch

    grids = [grid for _, grid in items]
    tokens = [(gh // cfg.merge_size) * (gw // cfg.merge_size) for _, gh, gw in grids]
    return MediaBatch(
        pixel_values=torch.cat([x for x, _ in items]),
        grid_thw=torch.tensor(grids, dtype=torch.int64),
        token_counts=tokens,
        **video,
    )


def process_images(images: Sequence[ImageLike], config: MediaConfig | None = None) -> MediaBatch:
    """Tower inputs for images, one item per image."""
    cfg = config or MediaConfig()
    if not images:
        raise ValueError("no images to process")
    items = [_patches(_rgb_array(im)[None], cfg, cfg.max_patches) for im in images]
    return _batch(items, cfg)


def sample_frame_indices(num_frames: int, fps: float, sample_fps: float) -> list[int]:
    """Evenly spaced frames at `sample_fps` (every frame if the video is slower than that)."""
    if num_frames < 1:
        raise ValueError("video has no frames")
    if fps <= 0:
        raise ValueError(f"video fps must be positive, got {fps}")
    keep = min(num_frames, max(1, int(num_frames / fps * sample_fps)))
    return [i * num_frames // keep for i in range(keep)]


def process_videos(
    videos: Sequence[Sequence[ImageLike] | np.ndarray],
    fps: float | Sequence[float],
    config: MediaConfig | None = None,
) -> MediaBatch:
    """Tower inputs for videos: each is its frames (PIL images, or uint8 [T, H, W, 3]) at `fps`.

    Every video becomes ceil(sampled frames / chunk_frames) items; all frames of a video must
    share one size.
    """
    cfg = config or MediaConfig()
    if not videos:
        raise ValueError("no videos to process")
    rates = [float(fps)] * len(videos) if isinstance(fps, int | float) else [float(f) for f in fps]
    if len(rates) != len(videos):
        raise ValueError(f"{len(videos)} videos but {len(rates)} fps values")
    items, chunks, stamps = [], [], []
    for v, (frames, rate) in enumerate(zip(videos, rates, strict=True)):
        keep = sample_frame_indices(len(frames), rate, cfg.sample_fps)
        arrays = [_rgb_array(frames[i]) for i in keep]
        if len({a.shape for a in arrays}) != 1:
            raise ValueError(f"video {v}: frames differ in size")
        clip = np.stack(arrays)
        starts = range(0, len(keep), cfg.chunk_frames)
        for s in starts:
            items.append(_patches(clip[s : s + cfg.chunk_frames], cfg, cfg.video_max_patches))
            stamps.append(keep[s] / rate)
        chunks.append(len(starts))
    return _batch(items, cfg, chunks_per_video=chunks, chunk_timestamps=stamps)
