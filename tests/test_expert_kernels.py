"""The native MoE kernels (model/kernels.c): the whole-layer call against transformers'
DeepseekV3MoE (experts in the model's dtype, or INT4 run packed against compressed-tensors'
dequantisation), against swarmoe's PyTorch path, INT4 experts on the worker path and from the
engine's expert cache, and how the kernels behave around threads, forks and builds that fail."""

from __future__ import annotations

import copy
import logging
import multiprocessing
import os
import platform
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

import swarmoe.model.moe as moe
from reference import dequant_reference
from swarmoe.config import TextConfig
from swarmoe.model import kernels
from swarmoe.model.quant import Fp8Experts, Int4Experts


def _can_build() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return platform.machine() == "x86_64" and " avx512f" in flags and shutil.which(os.environ.get("CC", "cc")) is not None


needs_kernels = pytest.mark.skipif(not _can_build(), reason="needs x86-64 with AVX-512 and a C compiler")

BASE = dict(hidden=64, inter=32, experts=16, top_k=4, groups=1, top_groups=1, shared=1, norm=True)
# Sizes off the vector width (tails), group-limited routing, two shared experts, no normalisation.
ODD = dict(hidden=72, inter=20, experts=16, top_k=3, groups=4, top_groups=2, shared=2, norm=False)
NO_SHARED = dict(BASE, shared=0)


def layers(spec: dict, dtype: torch.dtype, seed: int = 0) -> tuple[moe.MoE, torch.nn.Module]:
    """swarmoe's MoE and transformers' DeepseekV3MoE with the same random weights."""
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    common = dict(
        hidden_size=spec["hidden"], moe_intermediate_size=spec["inter"], n_routed_experts=spec["experts"],
        num_experts_per_tok=spec["top_k"], n_shared_experts=spec["shared"], n_group=spec["groups"],
        topk_group=spec["top_groups"], norm_topk_prob=spec["norm"], routed_scaling_factor=2.5,
    )
    ours = moe.MoE(TextConfig(
        vocab_size=256, intermediate_size=4 * spec["hidden"], num_hidden_layers=1, num_attention_heads=4,
        kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, **common), layer_idx=0)
    cfg = DeepseekV3Config(vocab_size=256, num_hidden_layers=1, **common)
    cfg._experts_implementation = "eager"
    ref = DeepseekV3MoE(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ours.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5)
        ours.gate.e_score_correction_bias.copy_(torch.randn(spec["experts"], generator=g) * 0.05)
        ref.gate.weight.copy_(ours.gate.weight)
        ref.gate.e_score_correction_bias.copy_(ours.gate.e_score_correction_bias)
        ref.experts.gate_up_proj.copy_(ours.experts.gate_up)
        ref.experts.down_proj.copy_(ours.experts.down)
        if ours.shared_experts is not None:
            for name, p in ours.shared_experts.named_parameters():
                ref.shared_experts.get_parameter(name).copy_(p)
    for layer in (ours, ref):
        layer.to(dtype)
        layer.gate.float()  # both keep the router in float32
    return ours.eval(), ref.eval()


# Several 128x128 FP8 scale blocks per projection, the last ones partial.
FP8_BLOCKS = dict(BASE, hidden=200, inter=136)
# INT4 experts need sizes in groups of 32.
ODD_INT4 = dict(ODD, hidden=96, inter=32)


def int4_layers(spec: dict, dtype: torch.dtype, seed: int = 0) -> tuple[moe.MoE, torch.nn.Module]:
    """`layers` with INT4 routed experts: swarmoe's packed (`Int4Experts`), transformers' the same
    weights dequantised by compressed-tensors (tests/reference.py)."""
    ours, ref = layers(spec, torch.float32, seed=seed)
    packed = Int4Experts.from_dense(ours.experts.gate_up, ours.experts.down)
    with torch.no_grad():
        for name in ("gate_up", "down"):
            q, scale = getattr(packed, f"{name}_packed"), getattr(packed, f"{name}_scale")
            shape = torch.tensor([q.shape[1], scale.shape[2] * 32])
            getattr(ref.experts, f"{name}_proj").copy_(torch.stack([
                dequant_reference({"weight_packed": q[j], "weight_scale": scale[j], "weight_shape": shape})
                for j in range(packed.num_experts)
            ]))
    ours.experts = packed
    for layer in (ours, ref):
        layer.to(dtype)
        layer.gate.float()
    return ours, ref


def fp8_layers(spec: dict, dtype: torch.dtype, seed: int = 0) -> tuple[moe.MoE, torch.nn.Module]:
    """`layers` with block-FP8 routed experts (as K2 publishes them): swarmoe's kept in float8,
    transformers' the same weights dequantised (tests/reference.py)."""
    ours, ref = layers(spec, dtype, seed=seed)  # before the swap: Module.to would widen float8 too
    stored = Fp8Experts.from_dense(ours.experts.gate_up, ours.experts.down)
    with torch.no_grad():
        for j in range(stored.num_experts):
            gate, up = stored.gate_up_fp8[j].chunk(2)
            ref.experts.gate_up_proj[j] = torch.cat([
                dequant_reference({"weight": gate, "weight_scale_inv": stored.gate_up_scale_inv[j, 0]}),
                dequant_reference({"weight": up, "weight_scale_inv": stored.gate_up_scale_inv[j, 1]}),
            ])
            ref.experts.down_proj[j] = dequant_reference(
                {"weight": stored.down_fp8[j], "weight_scale_inv": stored.down_scale_inv[j]})
    ours.experts = stored
    return ours, ref


# Layers the whole-layer tests run: experts in the model's dtype, or INT4 / FP8 run as stored.
BUILDS = {
    "base": (layers, BASE), "odd": (layers, ODD), "no-shared": (layers, NO_SHARED),
    "int4-base": (int4_layers, BASE), "int4-odd": (int4_layers, ODD_INT4),
    "fp8-base": (fp8_layers, BASE), "fp8-odd": (fp8_layers, ODD), "fp8-blocks": (fp8_layers, FP8_BLOCKS),
}


@pytest.fixture
def calls(monkeypatch):
    """Counts whole-layer kernel calls, so a test knows the fused path ran."""
    seen = []
    real = kernels.ExpertKernels.moe

    def counted(self, args):
        seen.append(args.tokens)
        return real(self, args)

    monkeypatch.setattr(kernels.ExpertKernels, "moe", counted)
    return seen


def test_kernels_build_here():
    if not _can_build():
        pytest.skip("needs x86-64 with AVX-512 and a C compiler")
    assert kernels.expert_kernels() is not None


@needs_kernels
@pytest.mark.parametrize("build", list(BUILDS))
@pytest.mark.parametrize("tokens", [1, 7, 45, 100])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_layer_matches_transformers_float32(calls, build, tokens, threads):
    make, spec = BUILDS[build]
    ours, ref = make(spec, torch.float32, seed=tokens)
    x = torch.randn(tokens, spec["hidden"])
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            got, want = ours(x), ref(x)
    finally:
        torch.set_num_threads(before)
    assert calls == [tokens]
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


@needs_kernels
@pytest.mark.parametrize("build", ["base", "odd", "int4-odd", "fp8-odd", "fp8-blocks"])
@pytest.mark.parametrize("tokens", [1, 9, 70])
def test_layer_matches_transformers_bfloat16(calls, build, tokens):
    make, spec = BUILDS[build]
    ours, ref = make(spec, torch.bfloat16, seed=tokens)
    x = torch.randn(tokens, spec["hidden"]).bfloat16()
    with torch.inference_mode():
        got, want = ours(x), ref(x)
        full = copy.deepcopy(ref).float()(x.float())
    assert calls == [tokens] and got.dtype == torch.bfloat16
    # Both sides round to bf16 at different points; each stays within a few bf16 steps of the
    # float32 result of the same (bf16-rounded) weights and input.
    assert (got.float() - want.float()).abs().max() <= 3e-2 * want.float().abs().max()
    assert (got.float() - full).abs().max() <= 3e-2 * full.abs().max()


@needs_kernels
@pytest.mark.parametrize("build", ["odd", "int4-odd", "fp8-odd", "fp8-blocks"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_matches_the_pytorch_path(monkeypatch, calls, build, dtype):
    make, spec = BUILDS[build]
    ours, _ = make(spec, dtype)
    x = torch.randn(2, 11, spec["hidden"]).to(dtype)
    with torch.inference_mode():
        fused = ours(x)
        monkeypatch.setattr(kernels, "ENABLED", False)
        stock = ours(x)
    assert calls == [22]
    assert fused.shape == x.shape
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert (fused.float() - stock.float()).abs().max() <= tol * stock.float().abs().max()


@needs_kernels
def test_result_does_not_depend_on_threads_or_timing(calls):
    """Each token's rows are summed in a fixed order, whichever thread ran which expert."""
    ours, _ = layers(BASE, torch.float32)
    x = torch.randn(50, BASE["hidden"])
    before = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2, 3, 2, 2):
            torch.set_num_threads(threads)
            with torch.inference_mode():
                outs.append(ours(x))
    finally:
        torch.set_num_threads(before)
    assert len(calls) == 5
    assert all(torch.equal(outs[0], o) for o in outs[1:])


@needs_kernels
def test_a_wrong_hidden_size_is_an_error_not_a_crash(calls):
    ours, _ = layers(BASE, torch.float32)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="shape|size"):
        ours(torch.randn(3, BASE["hidden"] + 8))
    assert calls == []


@needs_kernels
def test_routing_hooks_see_the_kernels_routing(calls):
    ours, _ = layers(ODD, torch.float32)
    seen = []
    ours.routing_hooks.append(lambda layer, idx: seen.append((layer, idx.clone())))
    x = torch.randn(13, ODD["hidden"])
    with torch.inference_mode():
        ours(x)
        want, _ = ours.gate(x)
    assert calls == [13] and len(seen) == 1 and seen[0][0] == 0
    assert torch.equal(seen[0][1].sort(dim=1).values, want.sort(dim=1).values)


@needs_kernels
def test_concurrent_callers_each_get_their_own_layer(calls):
    ours, ref = layers(BASE, torch.float32)
    xs = [torch.randn(n, BASE["hidden"]) for n in (1, 5, 17, 33)]
    with torch.inference_mode():
        want = [ref(x) for x in xs]
    got: dict[int, torch.Tensor] = {}
    errors = []

    def run(i: int) -> None:
        try:
            with torch.inference_mode():
                for _ in range(20):
                    got[i] = ours(xs[i])
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(xs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(calls) == 80
    for i, w in enumerate(want):
        assert (got[i] - w).abs().max() <= 1e-5 * w.abs().max()


@needs_kernels
def test_a_forked_child_runs_layers(calls):
    """The helpers do not survive a fork; the child starts its own. (The child runs only the
    kernels: GNU OpenMP, behind torch's parallel ops, is not usable after a fork.)"""
    ours, _ = layers(BASE, torch.float32)
    x = torch.randn(6, BASE["hidden"])
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.inference_mode():
            want = ours(x)  # the parent's helpers exist before the fork

        def child(queue) -> None:
            with torch.inference_mode():
                queue.put(ours(x).tolist())

        ctx = multiprocessing.get_context("fork")
        queue = ctx.Queue()
        proc = ctx.Process(target=child, args=(queue,))
        proc.start()
        got = torch.tensor(queue.get(timeout=60))
        proc.join(10)
    finally:
        torch.set_num_threads(before)
    assert proc.exitcode == 0
    assert torch.equal(got, want)


def test_a_failed_build_falls_back_to_pytorch(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("CC", "false")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    with pytest.raises(OSError, match="false"):
        kernels._build()
    assert not list((tmp_path / "swarmoe").glob("*"))  # no partial library left behind
    with caplog.at_level(logging.WARNING):
        assert kernels._library.__wrapped__() is None
    assert "using PyTorch kernels" in caplog.text


def test_the_switch_turns_them_off():
    code = "from swarmoe.model import kernels; print(kernels.expert_kernels())"
    env = dict(os.environ, SWARMOE_EXPERT_KERNELS="0")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "None"


@needs_kernels
def test_int4_scales_in_another_dtype_take_the_pytorch_path(calls):
    ours, ref = int4_layers(BASE, torch.float32)
    ours.experts.gate_up_scale.data = ours.experts.gate_up_scale.data.bfloat16()
    x = torch.randn(3, BASE["hidden"])
    with torch.inference_mode():
        got = ours(x)
    assert calls == []
    assert got.shape == x.shape


@pytest.fixture
def packed_calls(monkeypatch):
    """Counts expert-kernel calls on the worker path that ran packed INT4 weights."""
    seen = []
    real = kernels.ExpertKernels.experts

    def counted(self, *args, scales=None, **kwargs):
        seen.append(scales is not None)
        return real(self, *args, scales=scales, **kwargs)

    monkeypatch.setattr(kernels.ExpertKernels, "experts", counted)
    return seen


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 5])
def test_int4_experts_on_the_worker_path_run_packed(monkeypatch, packed_calls, dtype, tokens):
    """Where the one-call layer does not apply, INT4 experts still run packed, expert by expert."""
    ours, ref = int4_layers(ODD_INT4, dtype, seed=tokens)
    monkeypatch.setattr(moe, "_moe_fused", lambda layer, x: None)
    x = torch.randn(tokens, ODD_INT4["hidden"]).to(dtype)
    with torch.inference_mode():
        got, want = ours(x), ref(x)
        routed = ours.gate(x)[0].unique().numel()
    assert sum(packed_calls) == routed  # every routed expert ran packed (the shared one is dense)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    assert (got.float() - want.float()).abs().max() <= tol * want.float().abs().max()


@needs_kernels
def test_expert_budget_runs_cached_int4_experts_packed(tmp_path, packed_calls):
    from swarmoe import LLM, SamplingParams
    from swarmoe.testing import make_tiny_checkpoint

    path = make_tiny_checkpoint(tmp_path / "int4", int4=True, seed=7)
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    batch = [{"prompt_token_ids": list(range(5, 5 + n))} for n in (6, 17)]
    resident = [o.outputs[0].token_ids for o in LLM(path).generate(batch, greedy)]
    budget = LLM(path, expert_memory_gb=4e-4)
    assert [o.outputs[0].token_ids for o in budget.generate(batch, greedy)] == resident
    assert sum(packed_calls) > 0
    assert budget.stats()["expert_misses"] > 0
