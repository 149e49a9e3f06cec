"""One typed config for the K2 / K2.5 text model and the MoonViT vision tower.

Read from a checkpoint's `config.json` in the release spelling (K2: `model_type: kimi_k2`,
`rope_theta` + `rope_scaling`; K2.5: `kimi_k25` wrapping a `kimi_k2` text config and a MoonViT
vision config) and in the newer transformers spelling (`deepseek_v3`, `rope_parameters`,
`Kimi_K25VisionConfig` field names). Unknown or inconsistent fields fail with a message naming
them, because a silently ignored field is a silently wrong model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TEXT_MODEL_TYPES = ("kimi_k2", "deepseek_v3")
MULTIMODAL_MODEL_TYPES = ("kimi_k25",)

# Fields every `PreTrainedConfig` writes, or that only matter for training / other frameworks.
_GENERIC_FIELDS = {
    "_name_or_path", "architectures", "auto_map", "chunk_size_feed_forward", "dtype",
    "torch_dtype", "id2label", "label2id", "is_encoder_decoder", "output_attentions",
    "output_hidden_states", "problem_type", "return_dict", "transformers_version", "model_type",
    "use_cache", "initializer_range", "pretraining_tp", "attention_dropout", "tie_word_embeddings",
    "bos_token_id", "eos_token_id", "pad_token_id", "quantization_config", "_attn_implementation",
    "_attn_implementation_autoset", "use_return_dict", "name_or_path",
}
_TEXT_TRAINING_FIELDS = {
    "aux_loss_alpha", "seq_aux", "output_router_logits", "router_aux_loss_coef", "ep_size",
    "num_nextn_predict_layers", "num_mtp_layers", "head_dim", "qk_head_dim", "moe_layer_freq",
    "rope_interleave", "rope_theta", "rope_scaling", "rope_parameters", "topk_method",
    "scoring_func", "num_key_value_heads", "n_routed_experts", "num_local_experts",
}


class ConfigError(ValueError):
    """A config.json that cannot describe a model we can run."""


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters; `type` is "default" or "yarn"."""

    theta: float = 10000.0
    type: str = "default"
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    q_lora_rank: int | None = None
    moe_intermediate_size: int = 0
    n_routed_experts: int | None = None
    n_shared_experts: int = 0
    num_experts_per_tok: int = 0
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1
    max_position_embeddings: int = 4096
    rope: RopeConfig = field(default_factory=RopeConfig)
    rope_interleave: bool = True
    rms_norm_eps: float = 1e-6
    hidden_act: str = "silu"
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def is_moe_layer(self, layer: int) -> bool:
        return (
            self.n_routed_experts is not None
            and layer >= self.first_k_dense_replace
            and layer % self.moe_layer_freq == 0
        )


@dataclass(frozen=True)
class VisionConfig:
    patch_size: int = 14
    hidden_size: int = 1152
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    intermediate_size: int = 4304
    hidden_act: str = "gelu_pytorch_tanh"
    pos_emb_height: int = 64
    pos_emb_width: int = 64
    pos_emb_time: int = 4
    merge_kernel_size: tuple[int, int] = (2, 2)
    rope_theta: float = 10000.0
    projector_hidden_act: str = "gelu"
    projector_ln_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass(frozen=True)
class ModelConfig:
    """The whole checkpoint: a text model, and for K2.5 a vision tower and projector."""

    text: TextConfig
    vision: VisionConfig | None = None
    model_type: str = "kimi_k2"
    image_token_id: int | None = None
    video_token_id: int | None = None
    quantization: dict[str, Any] | None = None

    @property
    def is_multimodal(self) -> bool:
        return self.vision is not None


def load_config(source: str | Path | dict[str, Any]) -> ModelConfig:
    """Read a config from a checkpoint directory (or a shipped checkpoint's name), a
    config.json path, or a parsed dict."""
    if isinstance(source, dict):
        raw = source
    else:
        from swarmoe.checkpoints import resolve_checkpoint

        path = resolve_checkpoint(source)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ConfigError(f"no config.json at {path}")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path} is not valid JSON: {exc}") from exc
    return parse_config(raw)


def parse_config(raw: dict[str, Any]) -> ModelConfig:
    model_type = raw.get("model_type")
    if model_type in MULTIMODAL_MODEL_TYPES:
        return _parse_multimodal(raw)
    if model_type in TEXT_MODEL_TYPES:
        return ModelConfig(
            text=_parse_text(raw, "config"),
            model_type=model_type,
            quantization=raw.get("quantization_config"),
        )
    raise ConfigError(
        f"model_type {model_type!r} is not supported; expected one of "
        f"{TEXT_MODEL_TYPES + MULTIMODAL_MODEL_TYPES}"
    )


_MULTIMODAL_FIELDS = {
    "text_config", "vision_config", "media_placeholder_token_id", "image_token_id",
    "video_token_id", "vision_start_token_id", "vision_end_token_id", "use_unified_vision_chunk",
    "video_placeholder", "projection_hidden_size", "projection_layer_norm_eps", "ignore_index",
}


def _parse_multimodal(raw: dict[str, Any]) -> ModelConfig:
    _reject_unknown(raw, _GENERIC_FIELDS | _MULTIMODAL_FIELDS, "config")
    text_raw = raw.get("text_config")
    if not isinstance(text_raw, dict):
        raise ConfigError("kimi_k25 config needs a text_config object")
    text_type = text_raw.get("model_type", "kimi_k2")
    if text_type not in TEXT_MODEL_TYPES:
        raise ConfigError(f"text_config.model_type {text_type!r} is not one of {TEXT_MODEL_TYPES}")
    text = _parse_text(text_raw, "text_config")
    vision_raw = raw.get("vision_config")
    if not isinstance(vision_raw, dict):
        raise ConfigError("kimi_k25 config needs a vision_config object")
    vision = _parse_vision(vision_raw, raw, text)
    image_token_id = raw.get("media_placeholder_token_id", raw.get("image_token_id"))
    if image_token_id is None:
        raise ConfigError("kimi_k25 config needs media_placeholder_token_id (or image_token_id)")
    video_token_id = raw.get("video_token_id", image_token_id)
    for name, value in (("image_token_id", image_token_id), ("video_token_id", video_token_id)):
        # transformers places the video placeholder just past the vocabulary; both are masked
        # out before the embedding lookup, so only the sign is checked.
        if not isinstance(value, int) or value < 0:
            raise ConfigError(f"{name} must be a non-negative integer, got {value!r}")
    return ModelConfig(
        text=text,
        vision=vision,
        model_type="kimi_k25",
        image_token_id=int(image_token_id),
        video_token_id=int(video_token_id),
        quantization=raw.get("quantization_config") or text_raw.get("quantization_config"),
    )


_TEXT_FIELDS = {f for f in TextConfig.__dataclass_fields__} - {"rope"}


def _parse_text(raw: dict[str, Any], where: str) -> TextConfig:
    _reject_unknown(raw, _GENERIC_FIELDS | _TEXT_TRAINING_FIELDS | _TEXT_FIELDS, where)
    values = {k: raw[k] for k in _TEXT_FIELDS if k in raw and raw[k] is not None}
    experts = raw.get("n_routed_experts", raw.get("num_local_experts"))
    values["n_routed_experts"] = experts
    values["rope"] = _parse_rope(raw, where)
    missing = [
        k
        for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                  "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")
        if k not in values
    ]
    if "intermediate_size" not in values:
        missing.append("intermediate_size")
    if missing:
        raise ConfigError(f"{where} is missing required fields: {', '.join(missing)}")
    if values.get("n_group") is None:
        values["n_group"] = 1
    if values.get("topk_group") is None:
        values["topk_group"] = 1
    text = TextConfig(**values)
    _check_text(text, raw, where)
    return text


def _check_text(c: TextConfig, raw: dict[str, Any], where: str) -> None:
    def bad(msg: str) -> ConfigError:
        return ConfigError(f"{where}: {msg}")

    for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                 "kv_lora_rank", "qk_rope_head_dim", "v_head_dim", "intermediate_size"):
        if not isinstance(getattr(c, name), int) or getattr(c, name) <= 0:
            raise bad(f"{name} must be a positive integer, got {getattr(c, name)!r}")
    if c.qk_rope_head_dim % 2:
        raise bad(f"qk_rope_head_dim must be even, got {c.qk_rope_head_dim}")
    kv_heads = raw.get("num_key_value_heads")
    if kv_heads not in (None, c.num_attention_heads):
        raise bad(
            f"num_key_value_heads={kv_heads} must equal num_attention_heads="
            f"{c.num_attention_heads} (MLA expands the latent to every head)"
        )
    if c.hidden_act != "silu":
        raise bad(f"hidden_act {c.hidden_act!r} is not supported (K2 uses silu)")
    scoring = raw.get("scoring_func", "sigmoid")
    if scoring != "sigmoid":
        raise bad(f"scoring_func {scoring!r} is not supported (K2/DeepSeek-V3 use sigmoid)")
    method = raw.get("topk_method", "noaux_tc")
    if method != "noaux_tc":
        raise bad(f"topk_method {method!r} is not supported (K2/DeepSeek-V3 use noaux_tc)")
    if c.n_routed_experts is not None:
        e = c.n_routed_experts
        if not isinstance(e, int) or e <= 0:
            raise bad(f"n_routed_experts must be a positive integer, got {e!r}")
        if c.moe_intermediate_size <= 0:
            raise bad("moe_intermediate_size must be positive when n_routed_experts is set")
        if not 0 < c.num_experts_per_tok <= e:
            raise bad(f"num_experts_per_tok={c.num_experts_per_tok} must be in 1..{e}")
        if e % c.n_group:
            raise bad(f"n_routed_experts={e} is not divisible by n_group={c.n_group}")
        if not 0 < c.topk_group <= c.n_group:
            raise bad(f"topk_group={c.topk_group} must be in 1..n_group={c.n_group}")
        if c.n_group > 1 and e // c.n_group < 2:
            raise bad("group-limited routing needs at least 2 experts per group")
        if c.topk_group * (e // c.n_group) < c.num_experts_per_tok:
            raise bad(
                f"topk_group={c.topk_group} groups of {e // c.n_group} experts cannot hold "
                f"num_experts_per_tok={c.num_experts_per_tok}"
            )
    if c.moe_layer_freq <= 0:
        raise bad(f"moe_layer_freq must be positive, got {c.moe_layer_freq}")
    if c.rope.type == "yarn" and (c.rope.original_max_position_embeddings or 0) <= 0:
        raise bad("yarn rope needs original_max_position_embeddings")


_ROPE_KEYS = {
    "type", "rope_type", "rope_theta", "factor", "original_max_position_embeddings",
    "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "attention_factor", "truncate",
}


def _parse_rope(raw: dict[str, Any], where: str) -> RopeConfig:
    params = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"{where}: rope_parameters/rope_scaling must be an object")
    if params and set(params) & {"full_attention", "sliding_attention"}:
        raise ConfigError(f"{where}: per-layer-type rope parameters are not supported")
    unknown = set(params) - _ROPE_KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown rope parameter(s): {', '.join(sorted(unknown))}")
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ("default", "yarn"):
        raise ConfigError(f"{where}: rope type {kind!r} is not supported (default or yarn)")
    theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
    if kind == "default":
        return RopeConfig(theta=float(theta))
    factor = params.get("factor")
    original = params.get("original_max_position_embeddings")
    if factor is None and original:
        factor = raw.get("max_position_embeddings", original) / original
    return RopeConfig(
        theta=float(theta),
        type="yarn",
        factor=float(factor if factor is not None else 1.0),
        original_max_position_embeddings=original or raw.get("max_position_embeddings"),
        beta_fast=float(params.get("beta_fast") or 32),
        beta_slow=float(params.get("beta_slow") or 1),
        mscale=params.get("mscale"),
        mscale_all_dim=params.get("mscale_all_dim"),
        attention_factor=params.get("attention_factor"),
        truncate=bool(params.get("truncate", True)),
    )


# Release name (remote code, vLLM) -> our name; transformers' names are ours already.
_VISION_ALIASES = {
    "vt_hidden_size": "hidden_size",
    "vt_num_hidden_layers": "num_hidden_layers",
    "vt_num_attention_heads": "num_attention_heads",
    "vt_intermediate_size": "intermediate_size",
    "init_pos_emb_height": "pos_emb_height",
    "init_pos_emb_width": "pos_emb_width",
    "init_pos_emb_time": "pos_emb_time",
}
_VISION_ACCEPTED = {
    # Values we check rather than store: the only ones K2.5 ships.
    "pos_emb_type", "video_attn_type", "merge_type", "mm_projector_type", "mm_hidden_size",
    "text_hidden_size", "rope_parameters",
}
_VISION_FIXED = {
    "pos_emb_type": "divided_fixed",
    "video_attn_type": "spatial_temporal",
    "merge_type": "sd2_tpool",
    "mm_projector_type": "patchmerger",
}


def _parse_vision(raw: dict[str, Any], top: dict[str, Any], text: TextConfig) -> VisionConfig:
    fields = set(VisionConfig.__dataclass_fields__)
    _reject_unknown(
        raw, _GENERIC_FIELDS | fields | set(_VISION_ALIASES) | _VISION_ACCEPTED, "vision_config"
    )
    values: dict[str, Any] = {}
    for key, value in raw.items():
        name = _VISION_ALIASES.get(key, key)
        if name in fields and value is not None:
            values[name] = value
    for key, expected in _VISION_FIXED.items():
        if raw.get(key, expected) != expected:
            raise ConfigError(f"vision_config.{key}={raw[key]!r} is not supported ({expected!r})")
    rope = raw.get("rope_parameters") or {}
    if "rope_theta" in rope:
        values["rope_theta"] = float(rope["rope_theta"])
    if "projection_layer_norm_eps" in top:
        values["projector_ln_eps"] = float(top["projection_layer_norm_eps"])
    if "merge_kernel_size" in values:
        values["merge_kernel_size"] = tuple(values["merge_kernel_size"])
    vision = VisionConfig(**values)
    if vision.hidden_size % vision.num_attention_heads:
        raise ConfigError(
            f"vision_config: hidden_size={vision.hidden_size} is not divisible by "
            f"num_attention_heads={vision.num_attention_heads}"
        )
    if vision.head_dim % 4:
        raise ConfigError("vision_config: head dim must be a multiple of 4 for 2D rope")
    for key in ("mm_hidden_size",):
        if raw.get(key) not in (None, vision.hidden_size):
            raise ConfigError(f"vision_config.{key}={raw[key]} must equal hidden_size")
    if top.get("projection_hidden_size") not in (None, vision.hidden_size):
        raise ConfigError(
            f"projection_hidden_size={top['projection_hidden_size']} must equal the vision "
            f"hidden_size={vision.hidden_size}"
        )
    if raw.get("text_hidden_size") not in (None, text.hidden_size):
        raise ConfigError(
            f"vision_config.text_hidden_size={raw['text_hidden_size']} does not match "
            f"text_config.hidden_size={text.hidden_size}"
        )
    return vision


def _reject_unknown(raw: dict[str, Any], known: set[str], where: str) -> None:
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"{where} has unknown field(s): {', '.join(unknown)}")
