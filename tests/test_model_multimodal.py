"""Kimi K2.5 end to end against transformers, in float32.

The reference is transformers' own `Kimi_K25ForConditionalGeneration`, built here with random
weights (rounded to bf16, as a release stores them). Its state dict is converted to the release
layout (`language_model.model.*`, per-expert tensors, optionally INT4 pack-quantized by
compressed-tensors, `vision_tower.encoder.blocks.*` with fused interleaved `wqkv`,
`mm_projector.proj.*`), written as sharded safetensors with a release-spelling config.json and the
tiny tokenizer, and read back by swarmoe from disk. Logits must agree within
1e-4 x max|ref|; greedy decoding through `swarmoe.LLM` (several prompts in one `generate` call,
with and without an expert memory budget) must be token-identical to transformers' `generate`.
"""

from __future__ import annotations

import copy
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import DeepseekV3Config, Kimi_K25Config, Kimi_K25ForConditionalGeneration

from reference import (
    hf_k25_to_release,
    hf_text_model,
    hf_text_state,
    read_checkpoint,
    write_release_checkpoint,
)
from swarmoe import LLM, SamplingParams
from swarmoe.model import load_model
from swarmoe.testing import make_tiny_checkpoint, write_tiny_tokenizer
from swarmoe.text.media import process_images, process_videos

# Offsets of the K2 specials after the base vocabulary (as in the release tokenizer).
BOS, EOS, MEDIA_BEGIN, MEDIA_END, MEDIA_PAD, PAD = 0, 1, 18, 20, 21, 255

# A small K2.5: every dimension distinct where it can be, so that a transposed or misrouted
# tensor cannot pass by shape luck. Vision hidden (48) differs from text hidden (64).
TEXT = {
    "hidden_size": 64,
    "intermediate_size": 112,
    "moe_intermediate_size": 32,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "n_routed_experts": 12,
    "n_shared_experts": 1,
    "num_experts_per_tok": 4,
    "n_group": 1,
    "topk_group": 1,
    "norm_topk_prob": True,
    "routed_scaling_factor": 2.827,
    "first_k_dense_replace": 1,
    "q_lora_rank": 48,
    "kv_lora_rank": 32,
    "qk_nope_head_dim": 16,
    "qk_rope_head_dim": 8,
    "v_head_dim": 24,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "hidden_act": "silu",
    "attention_bias": False,
}
THETA = 50000.0
YARN = {
    "factor": 8.0,
    "original_max_position_embeddings": 256,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
}
VISION = {
    "patch_size": 14,
    "hidden_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 80,
    "pos_emb_height": 8,
    "pos_emb_width": 8,
    "pos_emb_time": 4,
    "merge_kernel_size": [2, 2],
}
PROJECTOR_EPS = 1e-5
INT4_CONFIG = {
    "quant_method": "compressed-tensors",
    "format": "pack-quantized",
    "quantization_status": "compressed",
    "config_groups": {
        "group_0": {
            "targets": ["Linear"],
            "weights": {
                "num_bits": 4, "type": "int", "symmetric": True, "strategy": "group",
                "group_size": 32, "dynamic": False, "observer": "minmax", "actorder": None,
            },
            "input_activations": None,
        }
    },
    "ignore": [
        "lm_head", "re:.*self_attn.*", "re:.*shared_experts.*",
        "re:.*mlp\\.(gate|up|gate_up|down)_proj.*",
    ],
    "kv_cache_scheme": None,
}
NEW_TOKENS = 12


def assert_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    diff = (ours.float() - ref.float()).abs().max().item()
    bound = 1e-4 * ref.abs().max().item()
    assert diff <= bound, f"max|diff| {diff:.3g} > {bound:.3g}"


# ---- the reference model and its release checkpoint ---------------------------------------


def release_config(vocab: int, int4: bool = False) -> dict:
    """config.json in the K2.5 release spelling for the model `hf_model` builds."""
    base = vocab - 256
    text = {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "kimi_k2",
        "vocab_size": vocab,
        **TEXT,
        "topk_method": "noaux_tc",
        "scoring_func": "sigmoid",
        "moe_layer_freq": 1,
        "seq_aux": True,
        "aux_loss_alpha": 0.001,
        "num_nextn_predict_layers": 0,
        "rope_theta": THETA,
        "rope_scaling": {"type": "yarn", **YARN},
        "bos_token_id": base + BOS,
        "eos_token_id": base + EOS,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }
    vision = {
        "patch_size": VISION["patch_size"],
        "init_pos_emb_height": VISION["pos_emb_height"],
        "init_pos_emb_width": VISION["pos_emb_width"],
        "init_pos_emb_time": VISION["pos_emb_time"],
        "pos_emb_type": "divided_fixed",
        "vt_num_attention_heads": VISION["num_attention_heads"],
        "vt_num_hidden_layers": VISION["num_hidden_layers"],
        "vt_hidden_size": VISION["hidden_size"],
        "vt_intermediate_size": VISION["intermediate_size"],
        "merge_kernel_size": VISION["merge_kernel_size"],
        "video_attn_type": "spatial_temporal",
        "merge_type": "sd2_tpool",
        "mm_projector_type": "patchmerger",
        "mm_hidden_size": VISION["hidden_size"],
        "projector_hidden_act": "gelu",
        "projector_ln_eps": PROJECTOR_EPS,
        "text_hidden_size": TEXT["hidden_size"],
    }
    config = {
        "architectures": ["KimiK25ForConditionalGeneration"],
        "auto_map": {
            "AutoConfig": "configuration_kimi_k25.KimiK25Config",
            "AutoModel": "modeling_kimi_k25.KimiK25ForConditionalGeneration",
            "AutoModelForCausalLM": "modeling_kimi_k25.KimiK25ForConditionalGeneration",
        },
        "model_type": "kimi_k25",
        "text_config": text,
        "vision_config": vision,
        "bos_token_id": base + BOS,
        "eos_token_id": base + EOS,
        "pad_token_id": base + PAD,
        "media_placeholder_token_id": base + MEDIA_PAD,
        "use_unified_vision_chunk": True,
        "video_placeholder": "<|kimi_k25_video_placeholder|>",
        "tie_word_embeddings": False,
        "dtype": "bfloat16",
    }
    if int4:
        config["quantization_config"] = text["quantization_config"] = INT4_CONFIG
    return config


def hf_model(vocab: int, seed: int) -> Kimi_K25ForConditionalGeneration:
    """transformers' K2.5 with random weights that make every tensor matter (norms away from 1,
    non-zero biases and router bias), rounded to bf16 so the release file holds them exactly."""
    base = vocab - 256
    text = DeepseekV3Config(
        vocab_size=vocab,
        **TEXT,
        rope_parameters={"rope_type": "yarn", "rope_theta": THETA, **YARN},
        bos_token_id=base + BOS,
        eos_token_id=base + EOS,
        pad_token_id=base + PAD,
        tie_word_embeddings=False,
        num_mtp_layers=0,
    )
    config = Kimi_K25Config(
        text_config=text,
        vision_config=dict(VISION),
        projection_hidden_size=VISION["hidden_size"],
        projection_layer_norm_eps=PROJECTOR_EPS,
        # The release has one placeholder id for images and video chunks.
        image_token_id=base + MEDIA_PAD,
        video_token_id=base + MEDIA_PAD,
        vision_start_token_id=base + MEDIA_BEGIN,
        vision_end_token_id=base + MEDIA_END,
        tie_word_embeddings=False,
        bos_token_id=base + BOS,
        eos_token_id=base + EOS,
        pad_token_id=base + PAD,
    )
    torch.manual_seed(seed)
    model = Kimi_K25ForConditionalGeneration(config).float().eval()
    assert model.lm_head.weight is not model.model.language_model.embed_tokens.weight
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            r = torch.randn(t.shape, generator=g)
            if name.endswith("e_score_correction_bias"):
                t.copy_(0.1 * r)  # the release keeps it in float32
                continue
            if "norm" in name and name.endswith("weight"):
                value = 1 + 0.2 * r
            elif name.endswith("bias"):
                value = 0.1 * r
            elif name.endswith("position_embeddings") or name.endswith("embed_tokens.weight"):
                value = 0.5 * r
            else:  # Linear [out, in], Conv2d [out, 3, p, p], stacked experts [E, out, in]
                fan_in = t.shape[-1] if t.dim() == 3 else t[0].numel()
                value = r / fan_in**0.5
            t.copy_(value.bfloat16().float())
    return model


def release_tensors(model: Kimi_K25ForConditionalGeneration, int4: bool) -> dict[str, torch.Tensor]:
    tensors = hf_k25_to_release(model.state_dict(), VISION["num_attention_heads"], int4=int4)
    return {
        k: v.bfloat16()
        if v.dtype == torch.float32 and not k.endswith("e_score_correction_bias")
        else v
        for k, v in tensors.items()
    }


def dequantised_reference(
    model: Kimi_K25ForConditionalGeneration, path: Path
) -> Kimi_K25ForConditionalGeneration:
    """The same model with its experts replaced by the checkpoint's INT4 experts, dequantised
    by compressed-tensors (`reference.hf_text_state`)."""
    ref = copy.deepcopy(model)
    text = hf_text_state(read_checkpoint(path), prefix="language_model.")
    state = {
        ("model.language_model." + k[len("model."):]) if k.startswith("model.") else k: v
        for k, v in text.items()
    }
    missing, unexpected = ref.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    assert all(m.startswith(("model.vision_tower.", "model.mm_projector.")) for m in missing), missing
    return ref


@dataclass
class K25:
    vocab: int
    hf: Kimi_K25ForConditionalGeneration
    hf_int4: Kimi_K25ForConditionalGeneration
    path: Path
    path_int4: Path

    @property
    def base(self) -> int:
        return self.vocab - 256


@pytest.fixture(scope="module")
def k25(tmp_path_factory) -> K25:
    root = tmp_path_factory.mktemp("k25")
    path, path_int4 = root / "bf16", root / "int4"
    path.mkdir()
    path_int4.mkdir()
    vocab = write_tiny_tokenizer(path)
    assert write_tiny_tokenizer(path_int4) == vocab
    hf = hf_model(vocab, seed=11)
    write_release_checkpoint(path, release_tensors(hf, int4=False), release_config(vocab))
    write_release_checkpoint(path_int4, release_tensors(hf, int4=True), release_config(vocab, int4=True))
    hf_int4 = dequantised_reference(hf, path_int4)
    # The INT4 comparison is not the bf16 one in disguise: quantisation moved the experts.
    e = "model.language_model.layers.1.mlp.experts.down_proj"
    assert not torch.equal(hf.state_dict()[e], hf_int4.state_dict()[e])
    return K25(vocab, hf, hf_int4, path, path_int4)


@pytest.fixture(scope="module")
def ours(k25):
    return load_model(k25.path, dtype=torch.float32)


# ---- inputs ---------------------------------------------------------------------------------


def image(seed: int, height: int, width: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def words(k25: K25, n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, k25.base, (n,), generator=g).tolist()


def media(k25: K25, tokens: int) -> list[int]:
    b = k25.base
    return [b + MEDIA_BEGIN] + [b + MEDIA_PAD] * tokens + [b + MEDIA_END]


def compare(k25: K25, ours_model, ids: list[int] | torch.Tensor, hf=None, **inputs) -> torch.Tensor:
    ids = torch.as_tensor(ids)
    ids = ids[None] if ids.dim() == 1 else ids
    with torch.no_grad():
        got = ours_model(ids, **inputs)
        ref = (hf or k25.hf)(input_ids=ids, **inputs).logits
    assert_close(got, ref)
    return got


# ---- logits ---------------------------------------------------------------------------------


def test_config_is_release_spelling_and_loads(k25, ours):
    raw = json.loads((k25.path / "config.json").read_text())
    assert raw["model_type"] == "kimi_k25" and raw["text_config"]["model_type"] == "kimi_k2"
    names = set(json.loads((k25.path / "model.safetensors.index.json").read_text())["weight_map"])
    assert "language_model.model.layers.1.mlp.experts.11.down_proj.weight" in names
    assert "vision_tower.encoder.blocks.1.wqkv.weight" in names
    assert "mm_projector.proj.2.bias" in names
    assert not any(".experts.gate_up_proj" in n or "model.vision_tower" in n for n in names)
    assert type(ours).__name__ == "KimiK25ForConditionalGeneration"


def test_one_image(k25, ours):
    batch = process_images([image(0, 60, 90)])  # padded to 84 x 112: grid 6 x 8, 12 tokens
    assert batch.token_counts == [12]
    ids = words(k25, 7, 1) + media(k25, 12) + words(k25, 5, 2)
    got = compare(k25, ours, ids, pixel_values=batch.pixel_values, image_grid_thw=batch.grid_thw)
    # The picture matters: another one changes the logits after it.
    other = process_images([image(1, 60, 90)])
    with torch.no_grad():
        moved = ours(torch.tensor([ids]), pixel_values=other.pixel_values, image_grid_thw=other.grid_thw)
    assert torch.equal(moved[0, :8], got[0, :8])
    assert (moved[0, 8:] - got[0, 8:]).abs().max() > 1e-2 * got.abs().max()


def test_two_images_of_different_sizes(k25, ours):
    # 40 x 170 -> grid 4 x 14 (wider than the 8 x 8 position grid); 100 x 60 -> grid 8 x 6.
    batch = process_images([image(2, 40, 170), image(3, 100, 60)])
    assert batch.grid_thw.tolist() == [[1, 4, 14], [1, 8, 6]]
    n1, n2 = batch.token_counts
    ids = words(k25, 3, 3) + media(k25, n1) + words(k25, 4, 4) + media(k25, n2) + words(k25, 6, 5)
    compare(k25, ours, ids, pixel_values=batch.pixel_values, image_grid_thw=batch.grid_thw)


def test_video_chunks(k25, ours):
    frames = np.random.default_rng(4).integers(0, 256, (18, 56, 84, 3), dtype=np.uint8)
    batch = process_videos([frames], fps=4.0)  # 9 frames at 2 fps: chunks of 4, 4 and 1
    assert batch.grid_thw.tolist() == [[4, 4, 6], [4, 4, 6], [1, 4, 6]]
    ids = words(k25, 2, 6)
    for i, n in enumerate(batch.token_counts):
        ids += words(k25, 3, 10 + i) + media(k25, n)
    ids += words(k25, 4, 7)
    compare(k25, ours, ids, pixel_values_videos=batch.pixel_values, video_grid_thw=batch.grid_thw)


def test_image_and_video_in_one_prompt_with_separate_video_id(k25, tmp_path):
    # transformers' spelling: a video placeholder id of its own, just past the vocabulary.
    path = tmp_path / "video_id"
    shutil.copytree(k25.path, path)
    raw = json.loads((path / "config.json").read_text())
    raw["video_token_id"] = k25.vocab
    (path / "config.json").write_text(json.dumps(raw))
    hf = copy.deepcopy(k25.hf)
    hf.config.video_token_id = k25.vocab
    assert hf.model.config.video_token_id == k25.vocab
    images = process_images([image(5, 30, 50)])
    videos = process_videos([np.random.default_rng(6).integers(0, 256, (8, 28, 56, 3), dtype=np.uint8)], fps=2.0)
    (ni,), (nv, nv2) = images.token_counts, videos.token_counts
    video = [k25.base + MEDIA_BEGIN] + [k25.vocab] * nv + [k25.base + MEDIA_END]
    video2 = [k25.base + MEDIA_BEGIN] + [k25.vocab] * nv2 + [k25.base + MEDIA_END]
    ids = words(k25, 3, 8) + video + media(k25, ni) + words(k25, 2, 9) + video2 + words(k25, 3, 9)
    compare(k25, load_model(path, dtype=torch.float32), ids, hf=hf,
            pixel_values=images.pixel_values, image_grid_thw=images.grid_thw,
            pixel_values_videos=videos.pixel_values, video_grid_thw=videos.grid_thw)


def test_batch_of_two_image_prompts_with_padding(k25, ours):
    batch = process_images([image(7, 50, 50), image(8, 80, 30)])
    n1, n2 = batch.token_counts
    row0 = words(k25, 4, 11) + media(k25, n1) + words(k25, 9, 12)
    row1 = words(k25, 6, 13) + media(k25, n2) + words(k25, 2, 14)
    width = max(len(row0), len(row1))
    assert len(row0) != len(row1)
    pad = k25.base + PAD
    ids = torch.tensor([row + [pad] * (width - len(row)) for row in (row0, row1)])
    mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in (row0, row1)])
    inputs = {"pixel_values": batch.pixel_values, "image_grid_thw": batch.grid_thw}
    with torch.no_grad():
        got = ours(ids, attention_mask=mask, **inputs)
        ref = k25.hf(input_ids=ids, attention_mask=mask, **inputs).logits
        alone = ours(torch.tensor([row1]), pixel_values=batch.pixel_values[n1 * 4:],
                     image_grid_thw=batch.grid_thw[1:])
    for i, row in enumerate((row0, row1)):
        assert_close(got[i, : len(row)], ref[i, : len(row)])
    # A row of a batch is computed as if alone.
    assert_close(got[1, : len(row1)], alone[0])


def test_text_only_batch(k25, ours):
    ids = torch.tensor([words(k25, 23, 15), words(k25, 23, 16)])
    compare(k25, ours, ids)


def test_int4_experts(k25):
    model = load_model(k25.path_int4, dtype=torch.float32)
    batch = process_images([image(9, 70, 44)])
    ids = words(k25, 5, 17) + media(k25, batch.token_counts[0]) + words(k25, 8, 18)
    compare(k25, model, ids, hf=k25.hf_int4, pixel_values=batch.pixel_values,
            image_grid_thw=batch.grid_thw)


# ---- greedy decoding through the engine ---------------------------------------------------


def expert_budget_gb(path: Path, budget: str | None) -> float | None:
    """An `expert_memory_gb` from the checkpoint's stored expert bytes: "few" is 2.5 experts'
    worth (every step evicts), "most" is 75% of all routed experts (some stay resident, so the
    cache also serves hits). LRU over experts visited in id order thrashes whenever a step's
    working set exceeds the budget, so only the larger budget exercises hits."""
    if budget is None:
        return None
    tensors = read_checkpoint(path)
    layer = min(int(n.split(".layers.")[1].split(".")[0]) for n in tensors if ".experts." in n)
    one = sum(
        t.numel() * t.element_size()
        for n, t in tensors.items()
        if f".layers.{layer}.mlp.experts.0." in n and not n.endswith("weight_shape")
    )
    total = sum(1 for n in tensors if n.endswith((".down_proj.weight", ".down_proj.weight_packed"))
                and ".mlp.experts." in n)
    experts = {"few": 2.5, "most": 0.75 * total}[budget]
    return experts * one / 1e9


def hf_greedy(model, ids: list[int], eos: int, pad: int, **inputs) -> list[int]:
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            do_sample=False,
            max_new_tokens=NEW_TOKENS,
            eos_token_id=eos,
            pad_token_id=pad,
            **inputs,
        )
    return out[0, len(ids):].tolist()


def greedy(llm: LLM, prompts: list[dict]) -> list[list[int]]:
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=NEW_TOKENS))
    return [o.outputs[0].token_ids for o in outs]


# Engine setups: (expert budget, other LLM arguments). "chunked" splits prompts into 7-token
# prefill chunks that share steps with decodes; "preempt" gives the cache 4 blocks of 16 tokens,
# so running sequences are preempted and recomputed.
ENGINES = {
    "all-resident": (None, {}),
    "few-experts": ("few", {}),
    "most-experts": ("most", {}),
    "chunked": (None, {"max_num_batched_tokens": 7}),
    "preempt": (None, {"max_model_len": 64, "cache_memory_gb": 1e-9}),
}


def run_engine(path: Path, prompts: list[dict], engine: str) -> tuple[list[list[int]], LLM]:
    budget, kwargs = ENGINES[engine]
    budget_gb = expert_budget_gb(path, budget)
    llm = LLM(model=path, dtype="float32", expert_memory_gb=budget_gb, **kwargs)
    got = greedy(llm, prompts)
    check_budget(llm, budget, budget_gb)
    if engine == "preempt":
        assert llm.stats()["preemptions"] > 0
    return got, llm


def check_budget(llm: LLM, budget: str | None, budget_gb: float | None) -> None:
    stats = llm.stats()
    if budget is None:
        assert "expert_budget_bytes" not in stats
        return
    assert stats["expert_resident_bytes"] <= stats["expert_budget_bytes"] == int(budget_gb * 1e9)
    # The budget was binding: experts were evicted and read again.
    assert stats["expert_bytes_loaded"] > stats["expert_budget_bytes"]
    assert stats["expert_misses"] > 0
    if budget == "most":
        assert stats["expert_hits"] > 0


@pytest.fixture(scope="module")
def k25_prompts(k25):
    """An image prompt, two text prompts and a video prompt, with transformers' greedy tokens."""
    b = k25.base
    eos, pad = b + EOS, b + PAD
    img = process_images([image(20, 64, 90)])
    vid = process_videos([np.random.default_rng(21).integers(0, 256, (6, 40, 40, 3), dtype=np.uint8)], fps=2.0)
    img_ids = words(k25, 6, 22) + media(k25, img.token_counts[0]) + words(k25, 3, 23)
    vid_ids = words(k25, 2, 24)
    for n in vid.token_counts:
        vid_ids += media(k25, n)
    image_data = {"pixel_values": img.pixel_values, "image_grid_thw": img.grid_thw}
    video_data = {"pixel_values_videos": vid.pixel_values, "video_grid_thw": vid.grid_thw}
    cases = [
        (img_ids, image_data),
        (words(k25, 4, 25), None),
        (words(k25, 29, 26), None),
        (vid_ids, video_data),
    ]
    assert len({len(ids) for ids, _ in cases}) == len(cases)
    prompts, expected = [], []
    for ids, data in cases:
        prompt = {"prompt_token_ids": ids}
        if data:
            prompt["multi_modal_data"] = data
        prompts.append(prompt)
        expected.append(hf_greedy(k25.hf, ids, eos, pad, **(data or {})))
    return prompts, expected


@pytest.mark.parametrize("engine", list(ENGINES))
def test_engine_greedy_multimodal_matches_generate(k25, k25_prompts, engine):
    prompts, expected = k25_prompts
    got, _ = run_engine(k25.path, prompts, engine)
    assert got == expected


@pytest.fixture(scope="module", params=["bf16", "int4"])
def text_case(request, tmp_path_factory):
    """A K2 text checkpoint, prompts of different lengths (two sharing a 32-token prefix), and
    transformers' greedy tokens for each."""
    int4 = request.param == "int4"
    path = make_tiny_checkpoint(tmp_path_factory.mktemp(request.param), int4=int4, seed=5 + int4)
    raw = json.loads((path / "config.json").read_text())
    base = raw["vocab_size"] - 256
    g = torch.Generator().manual_seed(30)
    shared = torch.randint(0, base, (32,), generator=g).tolist()
    prompts = [
        torch.randint(0, base, (3,), generator=g).tolist(),
        torch.randint(0, base, (17,), generator=g).tolist(),
        shared + torch.randint(0, base, (9,), generator=g).tolist(),
        shared + torch.randint(0, base, (2,), generator=g).tolist(),
    ]
    hf = hf_text_model(path)
    expected = [hf_greedy(hf, ids, raw["eos_token_id"], base + PAD) for ids in prompts]
    return path, prompts, expected


@pytest.mark.parametrize("engine", list(ENGINES))
def test_engine_greedy_text_matches_generate(text_case, engine):
    path, prompts, expected = text_case
    got, llm = run_engine(path, [{"prompt_token_ids": p} for p in prompts], engine)
    assert got == expected
    if engine == "all-resident":
        # Again on the same engine: the prompts' full blocks now come from the prefix cache.
        hits = llm.stats()["prefix_block_hits"]
        assert greedy(llm, [{"prompt_token_ids": p} for p in prompts]) == expected
        assert llm.stats()["prefix_block_hits"] > hits
