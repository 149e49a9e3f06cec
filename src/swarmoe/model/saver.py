"""Write a model back as a release-layout checkpoint: what `load_model` reads, and transformers.

The tensor names and slots are the loader's own (`_expected_tensors`), walked the other way, so
a saved checkpoint cannot drift from what loading expects: routed experts are split back into
per-expert tensors (INT4 and FP8 experts as stored, never requantised), the router and its
correction bias stay float32 as the release keeps them, and everything else is cast to `dtype`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from swarmoe.config import parse_config
from swarmoe.model.loader import INDEX_FILE, _expected_tensors

# Kept in float32 whatever the checkpoint dtype, as the release stores them.
_FLOAT32_SUFFIXES = ("mlp.gate.weight", "e_score_correction_bias", "weight_scale_inv")
TOKENIZER_FILES = ("tiktoken.model", "tokenizer_config.json", "chat_template.jinja",
                   "tokenizer.json", "special_tokens_map.json", "generation_config.json")
SHARD_BYTES = 2 << 30


def release_tensors(model: nn.Module, config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The model's tensors under release names, as the loader would place them."""
    cfg = parse_config(config)
    out: dict[str, torch.Tensor] = {}
    for name, target in _expected_tensors(model, cfg, set()).items():
        value = target.tensor.detach()
        if target.slot == ("shape",):
            value = value.to(torch.int32)  # the release's dtype for `weight_shape`
        for index in target.slot if target.slot != ("shape",) else ():
            value = value[index]
        out[name] = value
    return out


def _stored(name: str, value: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    keep = (
        dtype is None
        or not value.is_floating_point()
        or value.dtype == torch.float8_e4m3fn
        or name.endswith(_FLOAT32_SUFFIXES)
        or name.endswith("weight_scale")  # INT4 scales keep their stored dtype
    )
    value = value if keep else value.to(dtype)
    if name.endswith(_FLOAT32_SUFFIXES) and value.dtype != torch.float32:
        value = value.float()
    return value.cpu().contiguous().clone()


def save_checkpoint(
    model: nn.Module,
    config: dict[str, Any],
    path: str | Path,
    *,
    dtype: torch.dtype | None = None,
    tokenizer_from: str | Path | None = None,
    shard_bytes: int = SHARD_BYTES,
) -> Path:
    """Write `model` to `path`: sharded safetensors with an index, `config.json` (`config` as
    given, with `torch_dtype` updated when `dtype` is), and the tokenizer files found in
    `tokenizer_from`. Files are written beside and then renamed, so an interrupted save never
    leaves a checkpoint that looks whole."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {n: _stored(n, t, dtype) for n, t in release_tensors(model, config).items()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(tensors):
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += nbytes
    weight_map: dict[str, str] = {}
    for old in path.glob("model-*.safetensors"):
        old.unlink()
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path / f".{file}.tmp"), metadata={"format": "pt"})
        (path / f".{file}.tmp").replace(path / file)
        weight_map.update(dict.fromkeys(shard, file))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    _write_json(path / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map})
    config = dict(config)
    if dtype is not None:
        _set_dtype(config, dtype)
    _write_json(path / "config.json", config)
    if tokenizer_from is not None and Path(tokenizer_from).resolve() != path.resolve():
        for name in TOKENIZER_FILES:
            source = Path(tokenizer_from) / name
            if source.is_file():
                shutil.copyfile(source, path / name)
    return path


def _set_dtype(config: dict[str, Any], dtype: torch.dtype) -> None:
    name = str(dtype).removeprefix("torch.")
    config["torch_dtype"] = name
    if isinstance(config.get("text_config"), dict):
        config["text_config"] = {**config["text_config"], "torch_dtype": name}


def _write_json(path: Path, value: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value, indent=2))
    tmp.replace(path)
