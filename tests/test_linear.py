"""The model's Linear: decode-sized inputs on the native kernel, against PyTorch's F.linear, and
a whole model on it against transformers."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from swarmoe.model import kernels, linear, load_model
from swarmoe.model.linear import Linear
from swarmoe.testing import make_tiny_checkpoint
from test_expert_kernels import needs_kernels
from test_model_text import assert_close, reference_logits


@pytest.fixture
def native(monkeypatch):
    """Counts native linear calls (rows each), so a test knows which path ran."""
    seen = []
    real = kernels.ExpertKernels.linear

    def counted(self, x, weight, bias):
        seen.append(x.numel() // weight.shape[1])
        return real(self, x, weight, bias)

    monkeypatch.setattr(kernels.ExpertKernels, "linear", counted)
    return seen


def layer(n_in: int, n_out: int, dtype: torch.dtype, bias: bool = False, seed: int = 0) -> Linear:
    torch.manual_seed(seed)
    lin = Linear(n_in, n_out, bias=bias)
    with torch.no_grad():
        lin.weight.normal_(0, n_in**-0.5)
        if bias:
            lin.bias.normal_()
    return lin.to(dtype)


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()


# (in, out): one-row tiles (short activation rows), four-row tiles (long ones), and sizes off the
# vector width, the four-row tile and the threads' share of rows.
SHAPES = [(1024, 1024), (8192, 256), (1000, 1051)]


@needs_kernels
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("rows", [1, 3, 12])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_float32_matches_f_linear(monkeypatch, native, shape, rows, bias, threads):
    monkeypatch.setattr(linear, "NATIVE_MIN_BYTES", 0)
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    lin = layer(*shape, torch.float32, bias=bias, seed=rows)
    x = torch.randn(rows, shape[0])
    with torch.inference_mode():
        got = lin(x)
    assert native == [rows]
    assert got.shape == (rows, shape[1]) and got.dtype == torch.float32
    assert rel_err(got, F.linear(x.double(), lin.weight.double(), None if lin.bias is None else lin.bias.double())) < 1e-5


@needs_kernels
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("rows", [1, 5])
@pytest.mark.parametrize("bias", [False, True])
def test_bfloat16_matches_f_linear(monkeypatch, native, shape, rows, bias):
    monkeypatch.setattr(linear, "NATIVE_MIN_BYTES", 0)
    lin = layer(*shape, torch.bfloat16, bias=bias, seed=rows)
    x = torch.randn(rows, shape[0]).bfloat16()
    with torch.inference_mode():
        got = lin(x)
    assert native == [rows] and got.dtype == torch.bfloat16
    # Both round bf16 products' float32 sums once to bf16; they differ in summation order only.
    assert rel_err(got, F.linear(x, lin.weight, lin.bias)) < 1e-2


@needs_kernels
def test_leading_dimensions_are_kept(native):
    lin = layer(2048, 512, torch.float32)  # 4 MiB: above the size where the native path starts
    x = torch.randn(2, 3, 2048)
    with torch.inference_mode():
        got = lin(x)
    assert native == [6] and got.shape == (2, 3, 512)
    assert rel_err(got, F.linear(x, lin.weight)) < 1e-5


@needs_kernels
def test_other_inputs_go_to_f_linear(native):
    lin = layer(2048, 512, torch.float32)
    x = torch.randn(13, 2048)  # more rows than the kernel takes
    with torch.inference_mode():
        torch.testing.assert_close(lin(x), F.linear(x, lin.weight), rtol=0, atol=0)
        strided = torch.randn(2048, 4)[:, 0].unsqueeze(0)
        torch.testing.assert_close(lin(strided), F.linear(strided, lin.weight), rtol=0, atol=0)
        small, y = layer(256, 256, torch.float32), torch.randn(1, 256)  # 256 KiB of weights
        torch.testing.assert_close(small(y), F.linear(y, small.weight), rtol=0, atol=0)
        transposed = Linear(2048, 512, bias=False)
        transposed.weight.data = torch.randn(2048, 512).t()  # [512, 2048], not contiguous
        torch.testing.assert_close(transposed(x[:1]), F.linear(x[:1], transposed.weight), rtol=0, atol=0)
    got = lin(x[:1])  # autograd on: differentiable F.linear
    assert got.requires_grad
    assert native == []


@needs_kernels
def test_wrong_sizes_and_dtypes_raise_pytorch_errors(native):
    lin = layer(2048, 512, torch.float32)
    with torch.inference_mode():
        with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
            lin(torch.randn(1, 2047))
        with pytest.raises(RuntimeError, match="dtype|type"):
            lin(torch.randn(1, 2048).bfloat16())
    assert native == []


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_model_on_native_linears_matches_transformers(monkeypatch, native, tmp_path, dtype):
    """A whole text model with every linear layer on the native kernel (a few decode rows)."""
    monkeypatch.setattr(linear, "NATIVE_MIN_BYTES", 0)
    path = make_tiny_checkpoint(tmp_path / "m", seed=11)
    ids = torch.randint(0, 760, (1, 3))
    with torch.inference_mode():
        got = load_model(path, dtype=dtype)(ids)
        if dtype == torch.float32:
            assert_close(got, reference_logits(path, ids))
        else:
            full = load_model(path, dtype=torch.float32)(ids)
            assert (got.float() - full).abs().mean() / full.abs().mean() < 0.06
    assert native and set(native) == {3}


@needs_kernels
def test_more_threads_than_the_kernels_take():
    """torch may run more intra-op threads than one kernel call takes (64): calls use 64."""
    code = """
import torch, torch.nn.functional as F
from swarmoe.config import TextConfig
from swarmoe.model import kernels
from swarmoe.model.linear import Linear
from swarmoe.model.moe import MoE
torch.set_num_threads(100)
torch.manual_seed(0)
lin = Linear(2048, 512)
x = torch.randn(2, 2048)
cfg = TextConfig(vocab_size=256, hidden_size=64, intermediate_size=256, moe_intermediate_size=32,
                 num_hidden_layers=1, num_attention_heads=4, kv_lora_rank=16, qk_nope_head_dim=8,
                 qk_rope_head_dim=8, v_head_dim=8, n_routed_experts=16, num_experts_per_tok=4)
layer = MoE(cfg, layer_idx=0)
for p in layer.parameters():
    torch.nn.init.normal_(p, std=0.1)
h = torch.randn(3, 64)
with torch.inference_mode():
    got, moe_got = lin(x), layer(h)
    kernels.ENABLED = False
    want, moe_want = F.linear(x, lin.weight, lin.bias), layer(h)
assert (got - want).abs().max() <= 1e-5 * want.abs().max(), "linear"
assert (moe_got - moe_want).abs().max() <= 1e-5 * moe_want.abs().max(), "moe"
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
