"""Load K2 / K2.5 checkpoints exactly as published: sharded safetensors, release tensor names.

Only safetensors are read (nothing is unpickled), memory-mapped through `safe_open`. Routed
experts are stored per expert in the release (`mlp.experts.E.{gate,up,down}_proj`) and stacked
per layer here; INT4 (`weight_packed`/`weight_scale`/`weight_shape`) and block-FP8
(`weight` + `weight_scale_inv`) experts stay packed and are dequantised when routed to. Other
quantised linears are dequantised once at load. Any missing, unexpected or misshapen tensor
fails with a `CheckpointError` that names it.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from swarmoe.checkpoints import resolve_checkpoint
from swarmoe.config import ModelConfig, load_config
from swarmoe.model.kimi import build_model
from swarmoe.model.moe import DenseExperts, MoE
from swarmoe.model.quant import Fp8Experts, Int4Experts, dequant_fp8, dequant_int4

INDEX_FILE = "model.safetensors.index.json"
_EXPERT = re.compile(
    r"^(?P<prefix>.+\.mlp\.experts)\.(?P<e>\d+)\.(?P<proj>gate|up|down)_proj\."
    r"(?P<kind>weight|weight_packed|weight_scale|weight_shape|weight_scale_inv)$"
)
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_QUANT_SUFFIXES = ("weight_packed", "weight_scale", "weight_shape", "weight_scale_inv")


class CheckpointError(ValueError):
    """A checkpoint that does not match its config; the message names the tensor."""


class Checkpoint:
    """The tensors of a checkpoint directory, by name, memory-mapped on demand."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"checkpoint directory {self.path} does not exist")
        index = self.path / INDEX_FILE
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index} has no weight_map")
            self.files = {name: self.path / file for name, file in weight_map.items()}
            for file in set(self.files.values()):
                if not file.is_file():
                    raise CheckpointError(f"{index} names {file.name}, which does not exist")
        else:
            shards = sorted(self.path.glob("*.safetensors"))
            if not shards:
                pickles = [p.name for p in self.path.glob("*.bin")] + [p.name for p in self.path.glob("*.pt")]
                hint = f" (found {pickles}: only safetensors are loaded)" if pickles else ""
                raise CheckpointError(f"no .safetensors files in {self.path}{hint}")
            self.files = {}
            for shard in shards:
                with safe_open(shard, framework="pt") as f:
                    for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                        self.files[name] = shard
        self._handles: dict[Path, object] = {}

    def names(self) -> set[str]:
        return set(self.files)

    def close(self) -> None:
        """Drop the memory maps, so that bytes read during loading leave the process."""
        self._handles.clear()

    def get(self, name: str) -> torch.Tensor:
        file = self.files[name]
        handle = self._handles.get(file)
        if handle is None:
            handle = self._handles[file] = safe_open(file, framework="pt")
        try:
            return handle.get_tensor(name)  # type: ignore[attr-defined]
        except Exception as exc:  # a corrupt shard surfaces here
            raise CheckpointError(f"cannot read tensor {name} from {file.name}: {exc}") from exc


@contextlib.contextmanager
def _skip_init() -> Iterator[None]:
    """Construct modules without running their random initialisers: every value is overwritten
    by the checkpoint, and initialising a large model would take minutes."""
    names = ["uniform_", "normal_", "kaiming_uniform_", "kaiming_normal_", "trunc_normal_",
             "xavier_uniform_", "xavier_normal_", "zeros_", "ones_", "constant_"]
    saved = {n: getattr(nn.init, n) for n in names}
    try:
        for n in names:
            setattr(nn.init, n, lambda t, *a, **k: t)
        yield
    finally:
        for n, fn in saved.items():
            setattr(nn.init, n, fn)


def expert_format(names: set[str], prefix: str) -> str:
    """"int4", "fp8" or "dense" for the experts under `prefix` (e.g. `model.layers.3.mlp.experts`)."""
    if f"{prefix}.0.gate_proj.weight_packed" in names:
        return "int4"
    if f"{prefix}.0.gate_proj.weight_scale_inv" in names:
        return "fp8"
    return "dense"


def load_model(
    path: str | Path,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """Build the network a checkpoint describes and fill it; returns it in eval mode. `path` is
    a checkpoint directory or the name of a shipped one (`swarmoe-mini`)."""
    path = resolve_checkpoint(path)
    dtype = as_dtype(dtype)
    cfg = load_config(path)
    ckpt = Checkpoint(path)
    model = instantiate(cfg, ckpt.names(), dtype, device)
    fill(model, cfg, ckpt)
    ckpt.close()
    return model.eval()


def as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, str):
        named = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                 "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
        if dtype not in named:
            raise ValueError(f"dtype {dtype!r} is not one of {sorted(named)}")
        return named[dtype]
    return dtype


def instantiate(
    cfg: ModelConfig,
    names: set[str],
    dtype: torch.dtype,
    device: str | torch.device,
    make_experts: Callable[[str], nn.Module] | None = None,
) -> nn.Module:
    """The empty network, with each MoE layer's experts in the checkpoint's format, or built by
    `make_experts(prefix)` (an engine's offloaded experts, which load themselves)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with _skip_init(), torch.device(device):
            model = build_model(cfg)
            for moe in (m for m in model.modules() if isinstance(m, MoE)):
                prefix = _module_names(model)[moe] + ".experts"
                if make_experts is not None:
                    moe.experts = make_experts(prefix)
                    continue
                kind = expert_format(names, prefix)
                args = (cfg.text.n_routed_experts, cfg.text.hidden_size, cfg.text.moe_intermediate_size)
                if kind == "int4":
                    moe.experts = Int4Experts(*args)
                elif kind == "fp8":
                    moe.experts = Fp8Experts(*args)
    finally:
        torch.set_default_dtype(previous)
    return model


def _module_names(model: nn.Module) -> dict[nn.Module, str]:
    return {m: n for n, m in model.named_modules()}


@dataclass
class _Target:
    tensor: torch.Tensor
    expected: tuple[int, ...]
    slot: tuple = ()


def _expected_tensors(model: nn.Module, cfg: ModelConfig, names: set[str]) -> dict[str, _Target]:
    """Every checkpoint tensor name this model needs -> where it goes and its shape."""
    targets: dict[str, _Target] = {}
    state = dict(model.state_dict(keep_vars=True))
    modules = _module_names(model)
    expert_keys: set[str] = set()
    inter, hidden = cfg.text.moe_intermediate_size, cfg.text.hidden_size
    for moe in (m for m in model.modules() if isinstance(m, MoE)):
        prefix = modules[moe] + ".experts"
        ex = moe.experts
        expert_keys |= {f"{prefix}.{k}" for k, _ in ex.state_dict().items()}
        if not isinstance(ex, DenseExperts | Int4Experts | Fp8Experts):
            continue  # loads itself
        for e in range(ex.num_experts):
            for proj, rows, cols in (("gate", inter, hidden), ("up", inter, hidden), ("down", hidden, inter)):
                base = f"{prefix}.{e}.{proj}_proj."
                half = {"gate": slice(0, inter), "up": slice(inter, 2 * inter), "down": slice(None)}[proj]
                stack = "down" if proj == "down" else "gate_up"
                if isinstance(ex, Int4Experts):
                    targets[base + "weight_packed"] = _Target(getattr(ex, f"{stack}_packed"), (rows, cols // 8), (e, half))
                    targets[base + "weight_scale"] = _Target(getattr(ex, f"{stack}_scale"), (rows, cols // 32), (e, half))
                    targets[base + "weight_shape"] = _Target(torch.tensor([rows, cols]), (2,), ("shape",))
                elif isinstance(ex, Fp8Experts):
                    targets[base + "weight"] = _Target(getattr(ex, f"{stack}_fp8"), (rows, cols), (e, half))
                    scale = getattr(ex, f"{stack}_scale_inv")
                    slot = (e,) if proj == "down" else (e, 0 if proj == "gate" else 1)
                    targets[base + "weight_scale_inv"] = _Target(scale, tuple(scale.shape[len(slot):]), slot)
                else:
                    targets[base + "weight"] = _Target(getattr(ex, stack), (rows, cols), (e, half))
    for key, tensor in state.items():
        if key in expert_keys:
            continue
        if cfg.text.tie_word_embeddings and key.endswith("lm_head.weight"):
            continue
        targets[key] = _Target(tensor, tuple(tensor.shape))
    return targets


def _ignorable(name: str, cfg: ModelConfig) -> bool:
    if name.endswith("rotary_emb.inv_freq"):
        return True
    layer = _LAYER.search(name)
    # DeepSeek-V3 ships its multi-token-prediction layers after the last decoder layer.
    return bool(layer and int(layer.group(1)) >= cfg.text.num_hidden_layers)


def fill(model: nn.Module, cfg: ModelConfig, ckpt: Checkpoint) -> None:
    names = ckpt.names()
    targets = _expected_tensors(model, cfg, names)
    # A non-expert linear may itself be stored quantised: its `.weight` comes from parts.
    quantised = {}
    for name in names:
        for suffix in _QUANT_SUFFIXES:
            base = name[: -len(suffix)] + "weight"
            if name.endswith("." + suffix) and base in targets and not _EXPERT.match(name):
                quantised.setdefault(base, set()).add(suffix)
    parts = {base[: -len("weight")] + s for base, suffixes in quantised.items() for s in suffixes}
    for module in model.modules():
        own = getattr(module, "checkpoint_names", None)  # modules that load themselves
        if own is not None:
            parts |= own()
    unexpected = sorted(
        n for n in names if n not in targets and n not in parts and not _ignorable(n, cfg)
    )
    if unexpected:
        raise CheckpointError(f"unexpected tensor(s) in checkpoint: {_few(unexpected)}")
    missing = sorted(n for n in targets if n not in names and n not in quantised)
    if missing:
        raise CheckpointError(f"missing tensor(s) in checkpoint: {_few(missing)}")
    with torch.no_grad():
        for name, target in targets.items():
            if name in quantised:
                value = _dequantised(ckpt, name, quantised[name], target.tensor.dtype)
            else:
                value = ckpt.get(name)
            _check_shape(name, value, target.expected)
            if target.slot == ("shape",):
                if value.tolist() != list(target.tensor.tolist()):
                    raise CheckpointError(f"{name} is {value.tolist()}, expected {target.tensor.tolist()}")
                continue
            _check_dtype(name, value, target.tensor)
            dest = target.tensor
            for index in target.slot:
                dest = dest[index]
            dest.copy_(value.to(dest.dtype) if value.dtype != dest.dtype else value)


def _dequantised(ckpt: Checkpoint, name: str, parts: set[str], dtype: torch.dtype) -> torch.Tensor:
    base = name[: -len("weight")]
    if "weight_packed" in parts:
        if "weight_scale" not in parts:
            raise CheckpointError(f"{base}weight_packed has no {base}weight_scale")
        return dequant_int4(ckpt.get(base + "weight_packed"), ckpt.get(base + "weight_scale"), dtype)
    if name not in ckpt.names():
        raise CheckpointError(f"{base}weight_scale_inv has no {name}")
    return dequant_fp8(ckpt.get(name), ckpt.get(base + "weight_scale_inv"), dtype)


def _check_shape(name: str, value: torch.Tensor, expected: tuple[int, ...]) -> None:
    if tuple(value.shape) != expected:
        raise CheckpointError(f"tensor {name} has shape {tuple(value.shape)}, expected {expected}")


def _check_dtype(name: str, value: torch.Tensor, dest: torch.Tensor) -> None:
    if dest.is_floating_point() != value.is_floating_point():
        raise CheckpointError(f"tensor {name} has dtype {value.dtype}, expected {dest.dtype}")
    if dest.dtype == torch.float8_e4m3fn and value.dtype != dest.dtype:
        raise CheckpointError(f"tensor {name} has dtype {value.dtype}, expected float8_e4m3fn")


def _few(names: list[str], limit: int = 8) -> str:
    more = f" … and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more
