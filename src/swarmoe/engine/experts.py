"""Expert memory management: routed experts that live on disk and visit memory when routed to.

With `expert_memory_gb=X`, at most X GB of expert weights are resident, in the form the
checkpoint stores them (packed INT4 stays packed). Experts are read from their safetensors
shard with positioned reads, not a memory map, so bytes that are not resident really are not
in the process. Attention, shared experts, dense layers and embeddings stay resident.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import threading
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
from swarmoe.model.quant import FP8_BLOCK, dequant_fp8, dequant_int4

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
        return self.read_cat([name])

    def read_cat(self, names: list[str]) -> torch.Tensor:
        """Tensors of one dtype and trailing shape, concatenated on dim 0, read straight into one
        buffer (no copy after the read)."""
        infos = [self.info(n) for n in names]
        dtype, shape = infos[0][0], infos[0][1]
        for name, (d, s, _, _) in zip(names, infos, strict=True):
            if d != dtype or s[1:] != shape[1:]:
                raise CheckpointError(f"tensor {name} does not stack with {names[0]}")
        total = sum(size for *_, size in infos)
        rows = sum(s[0] for _, s, _, _ in infos) if shape else 0
        out_shape = (rows, *shape[1:]) if shape else shape
        if not total:
            return torch.empty(out_shape, dtype=dtype)
        # An anonymous mapping of its own: when the tensor goes (evicted, or used once and not
        # admitted) its pages go back to the OS at once, so RSS follows the cache, not malloc's
        # heaps. (A process-wide malloc setting would do the same for every large activation too,
        # at a measured 20-100% slowdown of the engine.)
        buffer = mmap.mmap(-1, total)
        view = memoryview(buffer)
        at = 0
        for name, (_, _, offset, size) in zip(names, infos, strict=True):
            file = self.files[name]
            fd = self._fds.get(file)
            if fd is None:
                fd = self._fds[file] = os.open(file, os.O_RDONLY)
            done = 0
            while done < size:
                got = os.preadv(fd, [view[at + done : at + size]], offset + done)
                if got <= 0:
                    raise CheckpointError(f"{file.name} ends before tensor {name} does")
                done += got
            at += size
        return torch.frombuffer(buffer, dtype=dtype).view(out_shape)


class ExpertCache:
    """One cache of raw expert tensors for all layers, bounded in bytes.

    Eviction is least-recently-used; admission is frequency-gated (TinyLFU): when the cache is
    full, an expert that missed displaces the least recently used ones only if it has been routed
    to more often than each of them (counts halve periodically, so they follow the traffic). A
    plain LRU smaller than the experts one step touches evicts every expert just before its next
    use (all misses); the gate keeps a stable resident set instead, and still lets experts that
    are routed to again and again in.
    Safe to call from several threads: loads run outside the lock.
    """

    def __init__(self, budget_bytes: int) -> None:
        self.budget = budget_bytes
        self.entries: OrderedDict[tuple[str, int], dict[str, torch.Tensor]] = OrderedDict()
        self.sizes: dict[tuple[str, int], int] = {}
        self.freq: dict[tuple[str, int], int] = {}
        self.resident = 0
        self.hits = self.misses = self.bytes_loaded = 0
        self._accesses = 0
        self._lock = threading.Lock()

    def get(self, key: tuple[str, int], load: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        with self._lock:
            self._count(key)
            found = self.entries.get(key)
            if found is not None:
                self.hits += 1
                self.entries.move_to_end(key)
                return found
            self.misses += 1
        tensors = load()
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        with self._lock:
            self.bytes_loaded += size
            if key not in self.entries and size <= self.budget and self._make_room(key, size):
                self.entries[key] = tensors
                self.sizes[key] = size
                self.resident += size
        return tensors

    def _count(self, key: tuple[str, int]) -> None:
        self.freq[key] = self.freq.get(key, 0) + 1
        self._accesses += 1
        if self._accesses >= 4 * max(len(self.entries), 16):  # age: halve every count
            self._accesses = 0
            self.freq = {k: v // 2 for k, v in self.freq.items() if v > 1}

    def _make_room(self, key: tuple[str, int], size: int) -> bool:
        """Evict LRU entries to fit `size` bytes, if `key` is more frequent than all of them."""
        free = self.budget - self.resident
        victims = []
        want = self.freq.get(key, 0)
        for old in self.entries:
            if free >= size:
                break
            if self.freq.get(old, 0) >= want:
                return False
            victims.append(old)
            free += self.sizes[old]
        for old in victims:
            del self.entries[old]
            self.resident -= self.sizes.pop(old)
        return True

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
        # gate and up are read into one [2I, H] tensor, so one conversion gives the fused
        # weight; FP8 block scales stack only when the gate's rows fill whole blocks.
        self.fused = kind != "fp8" or inter % FP8_BLOCK == 0
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

    thread_safe = True  # the cache locks its bookkeeping; loads and conversions run in parallel

    def _load(self, e: int) -> dict[str, torch.Tensor]:
        base = f"{self.prefix}.{e}"
        groups = [("gate_up", ("gate", "up")), ("down", ("down",))] if self.fused else [
            ("gate", ("gate",)), ("up", ("up",)), ("down", ("down",))]
        return {
            f"{key}.{part}": self.reader.read_cat([f"{base}.{p}_proj.{part}" for p in projs]).to(self.device)
            for key, projs in groups for part in _PARTS[self.kind]
        }

    def int4(self, e: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """Expert e as the checkpoint packs it (gate_up, its scales, down, its scales), for kernels
        that run INT4 packed; None for other formats."""
        if self.kind != "int4":
            return None
        raw = self.cache.get((self.prefix, e), lambda: self._load(e))
        return tuple(raw[f"{key}.{part}"] for key in ("gate_up", "down") for part in ("weight_packed", "weight_scale"))

    def expert(self, e: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        raw = self.cache.get((self.prefix, e), lambda: self._load(e))

        def weight(key: str) -> torch.Tensor:
            if self.kind == "int4":
                return dequant_int4(raw[f"{key}.weight_packed"], raw[f"{key}.weight_scale"], dtype)
            if self.kind == "fp8":
                return dequant_fp8(raw[f"{key}.weight"], raw[f"{key}.weight_scale_inv"], dtype)
            return raw[f"{key}.weight"].to(dtype)

        gate_up = weight("gate_up") if self.fused else torch.cat([weight("gate"), weight("up")])
        return gate_up, weight("down")


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
