"""Native expert kernels (kernels.c): built with the system C compiler on first use, cached.

The MoE dispatch uses them for CPU experts in float32 and bfloat16 when they are available, and
so do the model's dense linear layers for decode-sized inputs (`model/linear.py`); both use
PyTorch's kernels otherwise: no compiler, not x86-64 Linux, a CPU without AVX-512, or
`SWARMOE_EXPERT_KERNELS=0`.
The library is compiled for the machine it runs on (`-march=native`) into
`$XDG_CACHE_HOME/swarmoe` (default `~/.cache/swarmoe`), keyed by the source, the compiler and
the CPU, so a change to any of them builds afresh; building takes about a second.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("kernels.c")
FLAGS = ["-O3", "-march=native", "-shared", "-fPIC"]
DTYPES = {torch.float32: 0, torch.bfloat16: 1}

log = logging.getLogger(__name__)

Addresses = ctypes.Array  # int64 addresses or indices, as ctypes arrays


class MoeArgs(ctypes.Structure):
    """`swarmoe_moe_args` of kernels.c: one MoE layer's shapes, routing settings and tensors."""

    _fields_ = [
        *((name, ctypes.c_int64) for name in (
            "tokens", "hidden", "inter", "shared_inter", "experts", "top_k", "groups", "top_groups", "threads")),
        ("dtype", ctypes.c_int32),
        ("norm_top_k", ctypes.c_int32),
        ("scaling", ctypes.c_float),
        *((name, ctypes.c_void_p) for name in (
            "router", "bias", "gate_up", "down", "shared_gate", "shared_up", "shared_down", "x", "y", "indices",
            "gate_up_scale", "down_scale")),
        ("format", ctypes.c_int32),
    ]


# How a layer's routed experts are stored (swarmoe_moe_args.format).
EXPERTS_DENSE, EXPERTS_INT4, EXPERTS_FP8 = 0, 1, 2


class LinearArgs(ctypes.Structure):
    """`swarmoe_linear_args` of kernels.c: y [rows, out] = x [rows, in] @ w [out, in]^T (+ bias)."""

    _fields_ = [
        *((name, ctypes.c_int64) for name in ("rows", "in_features", "out_features", "threads")),
        ("dtype", ctypes.c_int32),
        *((name, ctypes.c_void_p) for name in ("x", "weight", "bias", "y")),
    ]


# Most input rows the linear kernel takes: its tiles are made for a few rows (ROW_BY_ROW_MAX in
# kernels.c); larger batches are GEMMs that PyTorch's kernels do well.
LINEAR_MAX_ROWS = 12


class ExpertKernels:
    """`swarmoe_experts`, `swarmoe_moe` and `swarmoe_linear` of kernels.c, typed."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        fn = lib.swarmoe_experts
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        fn.argtypes = [i64, i64, ptr, ptr, ptr, ptr, ptr, i64, ptr, ptr, ptr, i64, i64, ctypes.c_int, ptr, ctypes.c_int]
        fn.restype = ctypes.c_int
        self._experts = fn
        self._moe = lib.swarmoe_moe
        self._moe.argtypes = [ctypes.POINTER(MoeArgs)]
        self._moe.restype = ctypes.c_int
        self._linear = lib.swarmoe_linear
        self._linear.argtypes = [ctypes.POINTER(LinearArgs)]
        self._linear.restype = ctypes.c_int

    def moe(self, args: MoeArgs) -> None:
        """One whole MoE layer; the tensors behind `args` must stay alive until it returns."""
        status = self._moe(ctypes.byref(args))
        if status == -1:
            raise MemoryError("expert kernels: no memory for the layer's buffers")
        if status:
            raise ValueError("expert kernels: invalid MoE layer shape")

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """F.linear over x [..., in] of at most LINEAR_MAX_ROWS rows; x, weight and bias must be
        contiguous CPU tensors of one supported dtype, with matching sizes (the caller checks)."""
        rows = x.numel() // weight.shape[1]
        y = x.new_empty((*x.shape[:-1], weight.shape[0]))
        args = LinearArgs(
            rows, weight.shape[1], weight.shape[0], torch.get_num_threads(), DTYPES[x.dtype],
            x.data_ptr(), weight.data_ptr(), None if bias is None else bias.data_ptr(), y.data_ptr(),
        )
        status = self._linear(ctypes.byref(args))
        if status == -1:
            raise MemoryError("linear kernel: no memory for its buffers")
        if status:
            raise ValueError(f"linear kernel: invalid shape {tuple(x.shape)} @ {tuple(weight.shape)}^T")
        return y

    @staticmethod
    def supports(x: torch.Tensor) -> bool:
        """Whether the kernels take x as activations."""
        return x.is_cpu and x.dtype in DTYPES and x.is_contiguous()

    def experts(
        self,
        first: int,
        last: int,
        gate: int,
        up: int,
        down: int,
        ends: int,
        pairs: int | None,
        k: int,
        weights: int | None,
        x: torch.Tensor,
        out: torch.Tensor,
        inter: int,
        scales: int | None = None,
        scale_dtype: torch.dtype | None = None,
    ) -> None:
        """Experts first..last-1 of a dispatch (see `swarmoe_experts` in kernels.c); gate, up and
        down are addresses of int64 arrays of those experts' weight addresses, ends and pairs of
        int64 arrays over the whole dispatch, weights of its float32 routing weights. For packed
        INT4 experts, scales is the address of three such arrays of their scales' addresses
        (gate, up, down), in `scale_dtype`."""
        status = self._experts(first, last, gate, up, down, ends, pairs, k, weights, x.data_ptr(), out.data_ptr(),
                               x.shape[-1], inter, DTYPES[x.dtype], scales,
                               DTYPES[scale_dtype] if scale_dtype is not None else 0)
        if status:
            raise MemoryError("expert kernels: no memory for the scratch rows")


def int64s(values: list[int]) -> ctypes.Array:
    """An int64 array for the kernels (keep it referenced while they run)."""
    return (ctypes.c_int64 * len(values))(*values)


def address(array: ctypes.Array) -> int:
    return ctypes.addressof(array)


@functools.cache
def _library() -> ExpertKernels | None:
    if platform.machine().lower() not in ("x86_64", "amd64") or not sys.platform.startswith("linux"):
        log.info("swarmoe expert kernels: x86-64 Linux only; using PyTorch kernels")
        return None
    if b" avx512f" not in _cpu_signature():
        log.info("swarmoe expert kernels: this CPU has no AVX-512; using PyTorch kernels")
        return None
    try:
        return ExpertKernels(ctypes.CDLL(str(_build())))
    except (OSError, subprocess.SubprocessError) as e:
        log.warning("swarmoe expert kernels unavailable (%s); using PyTorch kernels", e)
        return None


def expert_kernels() -> ExpertKernels | None:
    """The native kernels, or None where they cannot be used or are turned off (read once: the
    layers ask on every call)."""
    return _library() if ENABLED else None


ENABLED = os.environ.get("SWARMOE_EXPERT_KERNELS", "1") != "0"


def _cpu_signature() -> bytes:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor().encode()
    lines = [line for line in text.splitlines() if line.startswith(("model name", "flags"))]
    return "\n".join(sorted(set(lines))).encode()


def _build() -> Path:
    """The compiled library for this source, compiler and CPU; built if not cached yet."""
    cc = os.environ.get("CC", "cc")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60).stdout
    key = hashlib.sha256(SOURCE.read_bytes() + version.encode() + " ".join(FLAGS).encode() + _cpu_signature())
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "swarmoe"
    target = cache / f"kernels-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: processes that build at once never load a partial file.
    fd, tmp = tempfile.mkstemp(dir=cache, suffix=".so")
    os.close(fd)
    try:
        done = subprocess.run([cc, *FLAGS, "-o", tmp, str(SOURCE), "-lm"], capture_output=True, text=True, timeout=300)
        if done.returncode:
            raise OSError(f"{cc} failed: {done.stderr.strip()[-500:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target
