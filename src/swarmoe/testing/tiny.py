"""Tiny random checkpoints in the exact release layout, for tests, docs and demos.

`make_tiny_checkpoint` writes `config.json` (release spelling: `kimi_k2`, or `kimi_k25` wrapping
a `kimi_k2` text config and a MoonViT vision config), sharded safetensors with
`model.safetensors.index.json` and release tensor names (per-expert tensors; INT4
`pack-quantized` or block-FP8 experts on request), and the tokenizer files. The weights are
random: such a model produces noise, which is all tests need.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from swarmoe.config import parse_config
from swarmoe.model.kimi import build_model
from swarmoe.model.moe import DenseExperts, MoE
from swarmoe.model.quant import quantize_fp8, quantize_int4
from swarmoe.testing.tokenizer_files import write_tiny_tokenizer

# Offsets of the specials after the base vocabulary, as in the release.
_BOS, _EOS, _MEDIA_PAD = 0, 1, 21


def tiny_config(
    vocab_size: int = 1024,
    multimodal: bool = False,
    int4: bool = False,
    fp8: bool = False,
    **text_overrides: Any,
) -> dict[str, Any]:
    """A small K2 (or K2.5) config.json dict; `text_overrides` replace text-config fields."""
    base = vocab_size - 256
    text: dict[str, Any] = {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "kimi_k2",
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 128,
        "moe_intermediate_size": 32,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "n_routed_experts": 16,
        "n_shared_experts": 1,
        "num_experts_per_tok": 4,
        "n_group": 1,
        "topk_group": 1,
        "topk_method": "noaux_tc",
        "scoring_func": "sigmoid",
        "norm_topk_prob": True,
        "routed_scaling_factor": 2.827,
        "first_k_dense_replace": 1,
        "moe_layer_freq": 1,
        "q_lora_rank": 48,
        "kv_lora_rank": 32,
        "qk_nope_head_dim": 16,
        "qk_rope_head_dim": 8,
        "v_head_dim": 16,
        "max_position_embeddings": 2048,
        "rope_theta": 50000.0,
        "rope_scaling": {
            "type": "yarn", "factor": 8.0, "original_max_position_embeddings": 256,
            "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0,
        },
        "rms_norm_eps": 1e-5,
        "hidden_act": "silu",
        "attention_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": base + _BOS,
        "eos_token_id": base + _EOS,
        "torch_dtype": "bfloat16",
    }
    text.update(text_overrides)
    quant = None
    if int4:
        quant = {
            "quant_method": "compressed-tensors",
            "format": "pack-quantized",
            "quantization_status": "compressed",
            "config_groups": {"group_0": {
                "targets": ["Linear"],
                "weights": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group",
                            "group_size": 32, "dynamic": False, "observer": "minmax", "actorder": None},
                "input_activations": None,
            }},
            "ignore": ["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*",
                       "re:.*mlp\\.(gate|up|gate_up|down)_proj.*"],
            "kv_cache_scheme": None,
        }
    elif fp8:
        quant = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                 "weight_block_size": [128, 128]}
    if not multimodal:
        if quant:
            text["quantization_config"] = quant
        return text
    config: dict[str, Any] = {
        "architectures": ["KimiK25ForConditionalGeneration"],
        "model_type": "kimi_k25",
        "text_config": text,
        "vision_config": {
            "patch_size": 14,
            "init_pos_emb_height": 8,
            "init_pos_emb_width": 8,
            "init_pos_emb_time": 4,
            "pos_emb_type": "divided_fixed",
            "vt_num_attention_heads": 4,
            "vt_num_hidden_layers": 2,
            "vt_hidden_size": 64,
            "vt_intermediate_size": 128,
            "merge_kernel_size": [2, 2],
            "video_attn_type": "spatial_temporal",
            "merge_type": "sd2_tpool",
            "mm_projector_type": "patchmerger",
            "mm_hidden_size": 64,
            "projector_hidden_act": "gelu",
            "projector_ln_eps": 1e-5,
            "text_hidden_size": text["hidden_size"],
        },
        "bos_token_id": base + _BOS,
        "eos_token_id": base + _EOS,
        "media_placeholder_token_id": base + _MEDIA_PAD,
        "tie_word_embeddings": False,
        "use_unified_vision_chunk": True,
        "video_placeholder": "<|kimi_k25_video_placeholder|>",
    }
    if quant:
        config["quantization_config"] = quant
        text["quantization_config"] = quant
    return config


def random_state_dict(config: dict[str, Any], seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under release tensor names (experts still stacked per layer)."""
    cfg = parse_config(config)
    torch.manual_seed(seed)
    model = build_model(cfg)
    _randomize(model)
    return model.state_dict()


def _randomize(model: nn.Module) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.normal_(0, 0.02)
            else:
                p.normal_(0, 0.5 / p.shape[-1] ** 0.5 if p.dim() > 1 else 0.02)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0, 0.05)


def _release_tensors(
    state: dict[str, torch.Tensor], config: dict[str, Any], int4: bool, fp8: bool
) -> dict[str, torch.Tensor]:
    """Split stacked experts into the release's per-expert names, quantising on request."""
    cfg = parse_config(config)
    model = build_model(cfg)
    inter = cfg.text.moe_intermediate_size
    out: dict[str, torch.Tensor] = {}
    stacked = set()
    for name, module in model.named_modules():
        if not isinstance(module, MoE) or not isinstance(module.experts, DenseExperts):
            continue
        prefix = f"{name}.experts"
        stacked |= {f"{prefix}.gate_up", f"{prefix}.down"}
        out.update(_split_experts(state, prefix, module.experts.num_experts, inter, int4, fp8))
    for name, tensor in state.items():
        if name not in stacked:
            out[name] = tensor.clone()
    return out


def _split_experts(
    state: dict[str, torch.Tensor], prefix: str, num_experts: int, inter: int, int4: bool, fp8: bool
) -> dict[str, torch.Tensor]:
    """One layer's stacked `gate_up` / `down` -> per-expert release tensors."""
    gate_up, down = state[f"{prefix}.gate_up"], state[f"{prefix}.down"]
    out: dict[str, torch.Tensor] = {}
    for e in range(num_experts):
        for proj, w in (("gate", gate_up[e, :inter]), ("up", gate_up[e, inter:]), ("down", down[e])):
            base = f"{prefix}.{e}.{proj}_proj."
            if int4:
                packed, scale = quantize_int4(w)
                out[base + "weight_packed"] = packed
                out[base + "weight_scale"] = scale.to(torch.bfloat16)
                out[base + "weight_shape"] = torch.tensor(list(w.shape), dtype=torch.int32)
            elif fp8:
                q, scale_inv = quantize_fp8(w)
                out[base + "weight"] = q
                out[base + "weight_scale_inv"] = scale_inv
            else:
                out[base + "weight"] = w.clone()
    return out


def make_tiny_checkpoint(
    path: str | Path,
    *,
    multimodal: bool = False,
    int4: bool = False,
    fp8: bool = False,
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    shards: int = 2,
    config: dict[str, Any] | None = None,
    stream: bool = False,
    **text_overrides: Any,
) -> Path:
    """Write a random checkpoint in the release layout to `path` and return it.

    `config` replaces the generated config.json wholesale (its vocabulary must hold the tiny
    tokenizer's specials, i.e. be at least the size `write_tiny_tokenizer` returns).
    `stream=True` writes the routed experts one MoE layer at a time (one shard per layer, the
    rest in one shard), so checkpoints far larger than memory can be made; its random values
    differ from the default path's for the same seed.
    """
    if int4 and fp8:
        raise ValueError("choose int4 or fp8 experts, not both")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    vocab_size = write_tiny_tokenizer(path)
    if config is None:
        config = tiny_config(vocab_size, multimodal=multimodal, int4=int4, fp8=fp8, **text_overrides)
    if stream:
        _stream_checkpoint(path, config, int4, fp8, seed, dtype)
    else:
        tensors = _release_tensors(random_state_dict(config, seed), config, int4, fp8)
        _write_shards(path, _stored(tensors, dtype), shards)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return path


def _stored(tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {
        k: v.to(dtype) if v.is_floating_point() and v.dtype != torch.float8_e4m3fn
        and not _keeps_fp32(k) else v
        for k, v in tensors.items()
    }


class _NoExperts(nn.Module):
    def __init__(self, num_experts: int) -> None:
        super().__init__()
        self.num_experts = num_experts


def _stream_checkpoint(
    path: Path, config: dict[str, Any], int4: bool, fp8: bool, seed: int, dtype: torch.dtype
) -> None:
    """Non-expert weights in one shard, then each MoE layer's experts generated and written
    on their own: peak memory is the non-expert model plus one layer of experts."""
    from swarmoe.model.loader import instantiate

    cfg = parse_config(config)
    text = cfg.text
    torch.manual_seed(seed)
    prefixes: list[str] = []

    def no_experts(prefix: str) -> nn.Module:
        prefixes.append(prefix)
        return _NoExperts(text.n_routed_experts)

    model = instantiate(cfg, set(), torch.float32, "cpu", make_experts=no_experts)
    _randomize(model)
    weight_map: dict[str, str] = {}
    total = 0
    files = 1 + len(prefixes)

    def write(index: int, tensors: dict[str, torch.Tensor]) -> None:
        nonlocal total
        file = f"model-{index:05d}-of-{files:05d}.safetensors"
        tensors = {n: t.contiguous() for n, t in _stored(tensors, dtype).items()}
        save_file(tensors, str(path / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file))
        total += sum(t.numel() * t.element_size() for t in tensors.values())

    write(1, dict(model.state_dict()))
    del model
    e, h, inter = text.n_routed_experts, text.hidden_size, text.moe_intermediate_size
    for i, prefix in enumerate(prefixes):
        layer = {
            f"{prefix}.gate_up": torch.randn(e, 2 * inter, h) * (0.5 / h**0.5),
            f"{prefix}.down": torch.randn(e, h, inter) * (0.5 / inter**0.5),
        }
        write(2 + i, _split_experts(layer, prefix, e, inter, int4, fp8))
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )


def _keeps_fp32(name: str) -> bool:
    return name.endswith(("mlp.gate.weight", "e_score_correction_bias", "weight_scale_inv"))


def _write_shards(path: Path, tensors: dict[str, torch.Tensor], shards: int) -> None:
    names = sorted(tensors)
    per = -(-len(names) // max(shards, 1))
    weight_map = {}
    for i in range(0, len(names), per):
        file = f"model-{i // per + 1:05d}-of-{-(-len(names) // per):05d}.safetensors"
        chunk = {n: tensors[n].contiguous() for n in names[i : i + per]}
        save_file(chunk, str(path / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(chunk, file))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )
