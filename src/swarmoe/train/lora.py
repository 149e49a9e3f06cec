"""LoRA fine-tuning of K2-architecture models: adapters on attention and the shared experts.

The recipe people use for K2 (QLoRA-style): every base weight frozen, low-rank adapters on the
MLA projections and the shared experts, routed experts (INT4 as K2.5 ships them) and the router
untouched, so they stay packed and the per-token compute of the adapters is tiny. The adapters
are peft's own LoRA layers, injected into swarmoe's modules in place (`Linear` is an
`nn.Linear`, so peft wraps it and the wrapped layer keeps its native inference path), and saved
in peft's adapter format under transformers' DeepseekV3 names. (peft 0.21 on transformers 5
loads the attention adapters onto that model, but reads `*.gate_proj`/`up_proj`/`down_proj`
targets as its fused routed experts, so shared-expert adapters load only here.)
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from pathlib import Path

import torch
from peft import (
    LoraConfig,
    NoMatchingPeftModuleError,
    PeftType,
    get_peft_model_state_dict,
    inject_adapter_in_model,
    set_peft_model_state_dict,
)
from peft.tuners.lora import LoraLayer
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from swarmoe.model.loader import Checkpoint, CheckpointError, load_model
from swarmoe.model.saver import save_checkpoint

# Module-name suffixes peft matches (`name == t or name.endswith("." + t)`): the MLA projections
# (`q_proj` where a model has no q LoRA) and the shared experts; the dense first layers'
# `mlp.{gate,up,down}_proj` do not match.
LORA_TARGETS: tuple[str, ...] = (
    "self_attn.q_a_proj",
    "self_attn.q_b_proj",
    "self_attn.q_proj",
    "self_attn.kv_a_proj_with_mqa",
    "self_attn.kv_b_proj",
    "self_attn.o_proj",
    "shared_experts.gate_proj",
    "shared_experts.up_proj",
    "shared_experts.down_proj",
)
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# peft saves from a PeftModel, whose tensor names carry this prefix; its loader expects it.
_PEFT_PREFIX = "base_model.model."
_ADAPTER = "default"


def apply_lora(
    model: nn.Module,
    rank: int,
    alpha: float | None = None,
    dropout: float = 0.0,
    *,
    targets: Sequence[str] = LORA_TARGETS,
) -> nn.Module:
    """Freeze every parameter and add rank-`rank` adapters to the `targets`; returns `model`.

    `alpha` defaults to `rank` (scale alpha/rank = 1). Adapters start as the identity (B = 0)
    and are kept in float32 on a bf16/fp16 model, where small optimizer steps would round away.
    Call `model.train()` for dropout to act (`load_model` returns the model in eval mode).
    """
    if rank < 1:
        raise ValueError(f"LoRA rank must be at least 1, got {rank}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
    config = LoraConfig(
        r=rank, lora_alpha=float(rank if alpha is None else alpha), lora_dropout=dropout,
        target_modules=list(targets), bias="none", task_type="CAUSAL_LM",
    )
    return _inject(model, config)


def _inject(model: nn.Module, config: LoraConfig) -> nn.Module:
    """peft's injection, which also freezes everything but the adapters."""
    if _lora_layers(model):
        raise ValueError("model already has LoRA adapters: merge_lora it first or start from the base")
    try:
        inject_adapter_in_model(config, model, adapter_name=_ADAPTER)
    except NoMatchingPeftModuleError as exc:
        targets = config.target_modules
        shown = targets if isinstance(targets, str) else sorted(targets)
        raise ValueError(f"no module of {type(model).__name__} matches the LoRA targets {shown}") from exc
    for name, param in model.named_parameters():
        if "lora_" in name and param.dtype in (torch.bfloat16, torch.float16):
            param.data = param.data.float()
    return model


def _lora_layers(model: nn.Module) -> dict[str, LoraLayer]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def _require_lora(model: nn.Module) -> None:
    if not _lora_layers(model) or not hasattr(model, "peft_config"):
        raise ValueError(f"{type(model).__name__} has no LoRA adapters (apply_lora or load_adapter first)")


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors only, under peft's names (`<module>.lora_A.weight`, no adapter name)."""
    _require_lora(model)
    return {k: v.detach() for k, v in get_peft_model_state_dict(model, adapter_name=_ADAPTER).items()}


def save_adapter(model: nn.Module, directory: str | Path, base: str | Path | None = None) -> Path:
    """Write the adapters as peft does: `adapter_model.safetensors` + `adapter_config.json`
    (rank, alpha, targets, and `base` as `base_model_name_or_path`); returns `directory`."""
    _require_lora(model)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {_PEFT_PREFIX + k: v.cpu().contiguous() for k, v in lora_state_dict(model).items()}
    save_file(tensors, str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    config = copy.copy(model.peft_config[_ADAPTER])
    config.base_model_name_or_path = None if base is None else str(base)
    config.save_pretrained(str(directory))
    return directory


def load_adapter(model: nn.Module, directory: str | Path) -> nn.Module:
    """Add the adapters saved in `directory` (by `save_adapter`, or peft) to `model`."""
    directory = Path(directory)
    for file in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (directory / file).is_file():
            raise FileNotFoundError(f"{directory} has no {file}: not a LoRA adapter directory")
    peft_type = json.loads((directory / ADAPTER_CONFIG).read_text()).get("peft_type")
    if peft_type != PeftType.LORA.value:
        raise ValueError(f"{directory / ADAPTER_CONFIG} is a {peft_type} adapter, not LORA")
    weights = {k.removeprefix(_PEFT_PREFIX): v for k, v in load_file(directory / ADAPTER_WEIGHTS).items()}
    _inject(model, LoraConfig.from_pretrained(str(directory)))
    expected = lora_state_dict(model)
    missing, unexpected = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
    problem = None
    if missing or unexpected:
        problem = (f"adapter {directory} does not fit this model: missing {_few(missing)}; "
                   f"unexpected {_few(unexpected)}")
    else:
        bad = next((n for n in sorted(weights) if weights[n].shape != expected[n].shape), None)
        if bad is not None:
            problem = (f"adapter tensor {bad} has shape {tuple(weights[bad].shape)}, "
                       f"the model expects {tuple(expected[bad].shape)}")
    if problem is not None:
        _remove_adapters(model, merge=False)  # leave the model as it came
        raise ValueError(problem)
    set_peft_model_state_dict(model, weights, adapter_name=_ADAPTER)
    return model


def _few(names: list[str], limit: int = 4) -> str:
    if not names:
        return "none"
    return ", ".join(names[:limit]) + (f" … and {len(names) - limit} more" if len(names) > limit else "")


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold each adapter into its base weight and put the plain layer back; returns `model`,
    whose modules and state-dict names are then those of the base model again."""
    _require_lora(model)
    _remove_adapters(model, merge=True)
    return model


def _remove_adapters(model: nn.Module, merge: bool) -> None:
    with torch.no_grad():
        for name, layer in _lora_layers(model).items():
            if merge:
                layer.merge(safe_merge=True)  # raises on a non-finite merged weight
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, layer.get_base_layer())
    del model.peft_config


def merge_checkpoint(base: str | Path, adapter: str | Path, out: str | Path) -> Path:
    """Write base + adapter as one release-layout checkpoint at `out`.

    The base is loaded as stored (its dtype, INT4/FP8 experts packed), so only the adapted
    weights change; everything else is written back bit for bit, with the base's tokenizer.
    """
    base = Path(base)
    config = json.loads((base / "config.json").read_text())
    model = load_model(base, dtype=_stored_dtype(base), device="cpu")
    merge_lora(load_adapter(model, adapter))
    return save_checkpoint(model, config, out, tokenizer_from=base)


def _stored_dtype(path: Path) -> torch.dtype:
    """The dtype a checkpoint stores its dense weights in (its token embedding's)."""
    ckpt = Checkpoint(path)
    name = next((n for n in sorted(ckpt.names()) if n.endswith("embed_tokens.weight")), None)
    if name is None:
        raise CheckpointError(f"checkpoint {path} has no embed_tokens.weight")
    with safe_open(ckpt.files[name], framework="pt") as f:
        return f.get_slice(name)[:1].dtype
