"""MoonViT-3D + projector against transformers' Kimi_K25 modules, and media.py against its processors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from swarmoe.config import VisionConfig
from swarmoe.model.vision import Projector, VisionTower, encode_media, media_token_count
from swarmoe.text.media import (
    MediaConfig,
    format_timestamp,
    process_images,
    process_videos,
    sample_frame_indices,
    target_size,
)

transformers = pytest.importorskip("transformers")

from reference import hf_to_release  # noqa: E402 - needs transformers

HIDDEN, HEADS, LAYERS, TEXT_HIDDEN = 64, 4, 2, 48
PATCH = 14


@pytest.fixture(scope="module")
def models():
    from transformers import Kimi_K25Config
    from transformers.models.kimi_k25.modeling_kimi_k25 import (
        Kimi_K25MultimodalProjection,
        Kimi_K25VisionModel,
    )

    torch.manual_seed(0)
    hf_cfg = Kimi_K25Config(
        vision_config=dict(
            hidden_size=HIDDEN,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            intermediate_size=96,
            pos_emb_height=8,
            pos_emb_width=8,
            pos_emb_time=4,
            patch_size=PATCH,
        ),
        text_config=dict(
            model_type="deepseek_v3",
            hidden_size=TEXT_HIDDEN,
            num_hidden_layers=1,
            vocab_size=64,
            intermediate_size=64,
            moe_intermediate_size=16,
            num_attention_heads=2,
            n_routed_experts=4,
            num_experts_per_tok=2,
            kv_lora_rank=16,
            q_lora_rank=16,
            qk_nope_head_dim=8,
            qk_rope_head_dim=8,
            v_head_dim=8,
        ),
        projection_hidden_size=HIDDEN,
    )
    hf_cfg.vision_config._attn_implementation = "sdpa"
    hf_tower = Kimi_K25VisionModel(hf_cfg.vision_config).float().eval()
    hf_proj = Kimi_K25MultimodalProjection(hf_cfg).float().eval()
    with torch.no_grad():  # make every tensor matter: non-trivial norms, biases and positions
        for p in list(hf_tower.parameters()) + list(hf_proj.parameters()):
            p.copy_(
                torch.randn_like(p) * (0.2 if p.ndim > 1 else 0.5)
                + (1.0 if p.ndim == 1 and p.shape[0] == HIDDEN else 0.0)
            )
    hf_sd = {f"vision_tower.{k}": v for k, v in hf_tower.state_dict().items()}
    hf_sd |= {f"mm_projector.{k}": v for k, v in hf_proj.state_dict().items()}
    release = hf_to_release(hf_sd, HEADS)

    cfg = VisionConfig(
        patch_size=PATCH,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=96,
        pos_emb_height=8,
        pos_emb_width=8,
        pos_emb_time=4,
    )
    tower, proj = VisionTower(cfg).eval(), Projector(cfg, TEXT_HIDDEN).eval()
    for prefix, module in (("vision_tower.", tower), ("mm_projector.", proj)):
        own = {k[len(prefix) :]: v for k, v in release.items() if k.startswith(prefix)}
        module.load_state_dict(own, strict=True)
    return hf_tower, hf_proj, tower, proj


def _compare(models, grid: list[list[int]]) -> None:
    hf_tower, hf_proj, tower, proj = models
    grid_thw = torch.tensor(grid)
    n = int(grid_thw.prod(-1).sum())
    pixel_values = torch.randn(n, 3, PATCH, PATCH)
    with torch.no_grad():
        ref_merged = hf_tower(pixel_values, grid_thw=grid_thw).pooler_output
        ref = hf_proj(ref_merged).reshape(-1, TEXT_HIDDEN)
        merged = tower(pixel_values, grid_thw)
        out = encode_media(tower, proj, pixel_values, grid_thw)
    assert merged.shape == ref_merged.shape
    assert (merged - ref_merged).abs().max() <= 1e-4 * ref_merged.abs().max()
    assert out.shape == (sum(media_token_count(r, 2) for r in grid), TEXT_HIDDEN)
    assert (out - ref).abs().max() <= 1e-4 * ref.abs().max()


@pytest.mark.parametrize(
    "grid",
    [
        pytest.param([[1, 8, 8]], id="one-image"),
        pytest.param([[1, 4, 6], [1, 12, 10], [1, 2, 2], [1, 6, 4]], id="images-mixed-sizes"),
        pytest.param([[4, 6, 8], [4, 6, 8], [2, 6, 8]], id="video-chunks"),
        pytest.param(
            [[1, 10, 12], [4, 4, 6], [4, 4, 6], [1, 4, 6], [3, 4, 6], [1, 2, 4]], id="mixed"
        ),
    ],
)
def test_matches_transformers(models, grid):
    _compare(models, grid)


def test_release_parameter_names():
    cfg = VisionConfig(
        hidden_size=HIDDEN,
        num_hidden_layers=1,
        num_attention_heads=HEADS,
        intermediate_size=96,
        pos_emb_height=8,
        pos_emb_width=8,
    )
    block = ["norm0", "norm1", "wqkv", "wo", "mlp.fc0", "mlp.fc1"]
    assert set(VisionTower(cfg).state_dict()) == {
        "patch_embed.proj.weight",
        "patch_embed.proj.bias",
        "patch_embed.pos_emb.weight",
        "encoder.final_layernorm.weight",
        "encoder.final_layernorm.bias",
        *(f"encoder.blocks.0.{m}.{k}" for m in block for k in ("weight", "bias")),
    }
    assert set(Projector(cfg, TEXT_HIDDEN).state_dict()) == {
        f"{m}.{k}" for m in ("pre_norm", "proj.0", "proj.2") for k in ("weight", "bias")
    }


def test_pixel_values_flat_or_patched(models):
    _, _, tower, _ = models
    grid = torch.tensor([[1, 4, 4]])
    pv = torch.randn(16, 3, PATCH, PATCH)
    with torch.no_grad():
        assert torch.equal(tower(pv, grid), tower(pv.flatten(1), grid))


@pytest.mark.parametrize(
    ("n_patches", "grid", "message"),
    [
        (15, [[1, 4, 4]], "patches"),
        (12, [[1, 3, 4]], "divisible"),
        (80, [[5, 4, 4]], "frames"),
        (0, [[0, 4, 4]], "non-positive"),
    ],
)
def test_bad_input(models, n_patches, grid, message):
    _, _, tower, _ = models
    with pytest.raises(ValueError, match=message):
        tower(torch.randn(n_patches, 3, PATCH, PATCH), torch.tensor(grid))


def test_bad_grid_shape(models):
    _, _, tower, _ = models
    with pytest.raises(ValueError, match="grid_thw"):
        tower(torch.randn(16, 3, PATCH, PATCH), torch.tensor([1, 4, 4]))


# ---- media.py -----------------------------------------------------------------------------


def _image(rng: np.random.Generator, h: int, w: int, mode: str = "RGB") -> Image.Image:
    channels = 4 if mode == "RGBA" else 3
    im = Image.fromarray(
        rng.integers(0, 256, (h, w, channels), dtype=np.uint8), "RGBA" if channels == 4 else "RGB"
    )
    return im if mode in ("RGB", "RGBA") else im.convert(mode)


def test_target_size_rule():
    kw = dict(patch_size=14, merge_size=2, max_patches=16384, max_patches_per_side=512)
    assert target_size(80, 100, **kw) == ((80, 100), (84, 112))  # native, padded to 28
    assert target_size(8000, 300, **kw) == ((7168, 268), (7168, 280))  # 512 patches a side
    assert target_size(3000, 2500, **kw) == ((1967, 1639), (1988, 1652))  # patch budget
    assert target_size(5, 7000, **kw) == ((5, 7000), (28, 7000))


def test_image_patches_are_the_padded_normalised_image():
    rng = np.random.default_rng(1)
    im = _image(rng, 30, 45)
    batch = process_images([im])
    assert batch.grid_thw.tolist() == [[1, 4, 4]] and batch.token_counts == [4]
    # undo the patching: [gh, gw, 3, p, p] -> [3, gh*p, gw*p]
    canvas = (
        batch.pixel_values.view(4, 4, 3, PATCH, PATCH).permute(2, 0, 3, 1, 4).reshape(3, 56, 56)
    )
    expected = torch.full((3, 56, 56), -1.0)
    expected[:, :30, :45] = torch.from_numpy(np.asarray(im)).permute(2, 0, 1).float() / 127.5 - 1.0
    assert torch.allclose(canvas, expected, atol=1e-6)


def test_video_sampling_and_chunks():
    assert sample_frame_indices(10, 4.0, 2.0) == [0, 2, 4, 6, 8]
    assert sample_frame_indices(3, 1.0, 2.0) == [0, 1, 2]  # slower than 2 fps: every frame
    frames = np.random.default_rng(2).integers(0, 256, (10, 60, 90, 3), dtype=np.uint8)
    batch = process_videos([frames, list(frames[:4])], fps=[4.0, 2.0])
    assert batch.grid_thw.tolist() == [[4, 6, 8], [1, 6, 8], [4, 6, 8]]
    assert batch.token_counts == [12, 12, 12]
    assert batch.chunks_per_video == [2, 1]
    assert batch.chunk_timestamps == [0.0, 2.0, 0.0]
    assert batch.pixel_values.shape == (9 * 48, 3, PATCH, PATCH)
    assert format_timestamp(3725.25) == "01:02:05.250"


def test_media_errors():
    with pytest.raises(ValueError, match="uint8"):
        process_images([np.zeros((4, 4, 3), dtype=np.float32)])
    frames = [np.zeros((28, 28, 3), np.uint8), np.zeros((28, 56, 3), np.uint8)]
    with pytest.raises(ValueError, match="differ in size"):
        process_videos([frames], fps=2.0)


def test_media_matches_transformers_processors():
    pytest.importorskip("torchvision", exc_type=ImportError)  # the reference processors need it
    from transformers import Kimi_K25ImageProcessor, Kimi_K25VideoProcessor

    rng = np.random.default_rng(0)
    images = [
        _image(rng, 100, 80),
        _image(rng, 31, 500),
        _image(rng, 57, 57, "L"),
        _image(rng, 40, 70, "RGBA"),
        _image(rng, 2500, 3000),
    ]
    ref = Kimi_K25ImageProcessor()(images=images, return_tensors="pt")
    ours = process_images(images)
    assert torch.equal(ours.grid_thw, ref["image_grid_thw"])
    assert torch.equal(ours.pixel_values, ref["pixel_values"])

    video = rng.integers(0, 256, (23, 700, 1300, 3), dtype=np.uint8)
    ref = Kimi_K25VideoProcessor()(
        videos=[video], video_metadata=[{"fps": 6.0, "total_num_frames": 23}], return_tensors="pt"
    )
    ours = process_videos([video], fps=6.0)
    assert torch.equal(ours.grid_thw, ref["video_grid_thw"])
    assert torch.equal(ours.pixel_values, ref["pixel_values_videos"])
    assert ours.chunks_per_video == ref["num_chunks_per_video"].tolist()


def test_media_config_is_k25():
    cfg = MediaConfig()
    assert (cfg.patch_size, cfg.merge_size, cfg.max_patches, cfg.max_patches_per_side) == (
        14,
        2,
        16384,
        512,
    )
    assert (cfg.sample_fps, cfg.chunk_frames, cfg.mean, cfg.std) == (2.0, 4, 0.5, 0.5)
