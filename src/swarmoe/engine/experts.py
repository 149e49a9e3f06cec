"""Expert memory management: routed experts that live on disk and visit memory when routed to.

With `expert_memory_gb=X`, at most X GB of expert weights are resident, in the form the
checkpoint stores them (packed INT4 stays packed). Experts are read from their safetensors
shard with positioned reads, not a memory map, so bytes that are not resident really are not
in the process. Attention, shared experts, dense layers and embeddings stay resident.
"""

from __future__ import annotations

import json
import os
import struct
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from swarmoe.config import load_config
from swarmoe.model.loader import (
    Checkpoint,
    CheckpointError,
    as_dtype,
    expert_format,
    fill,
    instantiate,
)
from swarmoe.model.quant import dequant_fp8, dequant_int4

_DTYPES = {
    "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I32": torch.int32,
    "I64": torch.int64, "I8": torch.int8, "U8": torch.uint8, "F8_E4M3": torch.float8_e4m3fn,
}


class TensorReader:
    """Reads single tensors out of safetensors shards with pread: no mapping, no pickle."""

    def __init__(self, files: dict[str, Path]) -> None:
        self.files = files
        self._headers: dict[Path, tuple[int, dict]] = {}
        self._fds: dict[Path, int] = {}

    def _header(self, file: Path) -> tuple[int, dict]:
        if file not in self._headers:
            with open(file, "rb") as f:
                (size,) = struct.unpack("<Q", f.read(8))
                self._headers[file] = (8 + size, json.loads(f.read(size)))
        return self._headers[file]

    def info(self, name: str) -> tuple[torch.dtype, tuple[int, ...], int, int]:
        file = self.files[name]
        base, header = self._header(file)
        entry = header[name]
        begin, end = entry["data_offsets"]
        return _DTYPES[entry["dtype"]], tuple(entry["shape"]), base + begin, end - begin

    def read(self, name: str) -> torch.Tensor:
        dtype, shape, offset, size = self.info(name)
        file = self.files[name]
        fd = self._fds.get(file)
        if fd is None:
            fd = self._fds[file] = os.open(file, os.O_RDONLY)
        buffer = bytearray(size)
        view = memoryview(buffer)
        done = 0
        while done < size:
            got = os.preadv(fd, [view[done:]], offset + done)
            if got <= 0:
                raise CheckpointError(f"{file.name} ends before tensor {name} does")
            done += got
        return torch.frombuffer(buffer, dtype=dtype).view(shape) if size else torch.empty(shape, dtype=dtype)


class ExpertCache:
    """One LRU of raw expert tensors for all layers, bounded in bytes."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget = budget_bytes
        self.entries: OrderedDict[tuple[str, int], dict[str, torch.Tensor]] = OrderedDict()
        self.resident = 0
        self.hits = self.misses = self.bytes_loaded = 0

    def get(self, key: tuple[str, int], load: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        found = self.entries.get(key)
        if found is not None:
            self.hits += 1
            self.entries.move_to_end(key)
            return found
        self.misses += 1
        tensors = load()
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        self.bytes_loaded += size
        while self.entries and self.resident + size > self.budget:
            _, old = self.entries.popitem(last=False)
            self.resident -= sum(t.numel() * t.element_size() for t in old.values())
        self.entries[key] = tensors
        self.resident += size
        return tensors

    def stats(self) -> dict[str, float]:
        total = self.hits + self.misses
        return {
            "expert_hit_rate": self.hits / total if total else 0.0,
            "expert_hits": self.hits,
            "expert_misses": self.misses,
            "expert_bytes_loaded": self.bytes_loaded,
            "expert_resident_bytes": self.resident,
            "expert_budget_bytes": self.budget,
        }


_PARTS = {"dense": ("weight",), "int4": ("weight_packed", "weight_scale"), "fp8": ("weight", "weight_scale_inv")}


class OffloadedExperts(nn.Module):
    """An `ExpertWeights` provider that fetches each expert through the shared cache."""

    def __init__(self, reader: TensorReader, prefix: str, kind: str, num_experts: int,
                 hidden: int, inter: int, cache: ExpertCache, device: torch.device) -> None:
        super().__init__()
        self.reader, self.prefix, self.kind, self.cache = reader, prefix, kind, cache
        self.num_experts = num_experts
        self.device = device
        for e in range(num_experts):
            for proj, shape in (("gate", (inter, hidden)), ("up", (inter, hidden)), ("down", (hidden, inter))):
                name = f"{prefix}.{e}.{proj}_proj.{_PARTS[kind][0]}"
                if name not in reader.files:
                    raise CheckpointError(f"missing tensor(s) in checkpoint: {name}")
                got = reader.info(name)[1]
                want = shape if kind != "int4" else (shape[0], shape[1] // 8)
                if got != want:
                    raise CheckpointError(f"tensor {name} has shape {got}, expected {want}")

    def checkpoint_names(self) -> set[str]:
        parts = _PARTS[self.kind] + (("weight_shape",) if self.kind == "int4" else ())
        return {f"{self.prefix}.{e}.{p}_proj.{s}" for e in range(self.num_experts)
                for p in ("gate", "up", "down") for s in parts}

    def _load(self, e: int) -> dict[str, torch.Tensor]:
        return {
            f"{proj}.{part}": self.reader.read(f"{self.prefix}.{e}.{proj}_proj.{part}").to(self.device)
            for proj in ("gate", "up", "down") for part in _PARTS[self.kind]
        }

    def expert(self, e: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        raw = self.cache.get((self.prefix, e), lambda: self._load(e))

        def weight(proj: str) -> torch.Tensor:
            if self.kind == "int4":
                return dequant_int4(raw[f"{proj}.weight_packed"], raw[f"{proj}.weight_scale"], dtype)
            if self.kind == "fp8":
                return dequant_fp8(raw[f"{proj}.weight"], raw[f"{proj}.weight_scale_inv"], dtype)
            return raw[f"{proj}.weight"].to(dtype)

        return torch.cat([weight("gate"), weight("up")]), weight("down")


def expert_bytes(reader: TensorReader, prefix: str, kind: str) -> int:
    """Stored bytes of one expert (expert 0 of the layer under `prefix`)."""
    return sum(reader.info(f"{prefix}.0.{p}_proj.{s}")[3] for p in ("gate", "up", "down") for s in _PARTS[kind])


def load_model_with_expert_budget(
    path: str | Path, expert_memory_gb: float, dtype: str | torch.dtype = "float32", device: str = "cpu"
) -> tuple[nn.Module, ExpertCache]:
    """The model with routed experts served from disk through a cache of `expert_memory_gb`."""
    if not isinstance(expert_memory_gb, int | float) or expert_memory_gb <= 0:
        raise ValueError(f"expert_memory_gb must be a positive number, got {expert_memory_gb!r}")
    cfg = load_config(path)
    ckpt = Checkpoint(path)
    reader = TensorReader(ckpt.files)
    cache = ExpertCache(int(expert_memory_gb * 1e9))
    names = ckpt.names()
    text = cfg.text
    smallest: list[int] = []

    def make(prefix: str) -> OffloadedExperts:
        kind = expert_format(names, prefix)
        smallest.append(expert_bytes(reader, prefix, kind))
        return OffloadedExperts(reader, prefix, kind, text.n_routed_experts, text.hidden_size,
                                text.moe_intermediate_size, cache, torch.device(device))

    model = instantiate(cfg, names, as_dtype(dtype), device, make_experts=make)
    if smallest and cache.budget < max(smallest):
        raise ValueError(
            f"expert_memory_gb={expert_memory_gb} is below the size of one expert "
            f"({max(smallest) / 1e9:.6f} GB): no expert could ever be resident"
        )
    fill(model, cfg, ckpt)
    ckpt.close()
    return model.eval(), cache
