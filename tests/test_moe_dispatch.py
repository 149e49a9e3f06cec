"""Every dispatch path (calling thread / expert-parallel workers, pairs grouped in Python / sorted
by expert, native kernels / grouped GEMMs / per-expert loop, GEMV rows, weight-left bf16 GEMMs,
INT4 experts, autograd) against a per-token, per-slot reference."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F

import swarmoe.model.moe as moe
from swarmoe.model import kernels
from swarmoe.model.quant import Int4Experts

E, H, INTER, K = 16, 64, 32, 4


def experts(kind: str) -> moe.DenseExperts | Int4Experts:
    g = torch.Generator().manual_seed(0)
    dense = moe.DenseExperts(E, H, INTER)
    with torch.no_grad():
        dense.gate_up.copy_(torch.randn(dense.gate_up.shape, generator=g) * H**-0.5)
        dense.down.copy_(torch.randn(dense.down.shape, generator=g) * INTER**-0.5)
    if kind == "dense":
        return dense
    return Int4Experts.from_dense(dense.gate_up, dense.down)


def reference(x, idx, w, ex, shared):
    y = torch.zeros(x.shape, dtype=torch.float32)
    for t in range(x.shape[0]):
        for j in range(idx.shape[1]):
            gate_up, down = (p.float() for p in ex.expert(int(idx[t, j]), torch.float32))
            gate, up = (x[t].float() @ gate_up.T).chunk(2)
            y[t] += w[t, j] * ((F.silu(gate) * up) @ down.T)
    return y + shared.float()(x.float())


@pytest.mark.parametrize("tokens", [1, 3, 40])
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("workers", [True, False])
@pytest.mark.parametrize("kind", ["dense", "int4"])
@pytest.mark.parametrize("grouped", [True, False])
@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize("native", [True, False])
def test_dispatch_paths_match_reference(monkeypatch, tokens, threads, workers, kind, grouped, direct, native):
    if not native:
        monkeypatch.setattr(kernels, "ENABLED", False)
    monkeypatch.setattr(moe, "PARALLEL_MIN_HIDDEN", 0 if workers else 1 << 30)
    monkeypatch.setattr(moe, "GROUPED_MAX_SPAN", E if grouped else 0)
    monkeypatch.setattr(moe, "DIRECT_PAIRS", 1 << 30 if direct else 0)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(tokens)
        ex, shared = experts(kind), moe.MLP(H, INTER)
        x = torch.randn(tokens, H)
        idx = torch.stack([torch.randperm(E)[:K] for _ in range(tokens)])
        w = torch.rand(tokens, K)
        want = reference(x, idx, w, ex, shared)
        bound = 1e-5 * want.abs().max()
        with torch.inference_mode():
            assert (moe.dispatch(x, idx, w, ex, shared=shared) - want).abs().max() <= bound
        with torch.no_grad():
            assert (moe.dispatch(x, idx, w, ex, shared=shared) - want).abs().max() <= bound
        assert (moe.dispatch(x, idx, w, ex, shared=shared).detach() - want).abs().max() <= bound
        if kind == "dense":
            ex.to(torch.bfloat16)
            shared.to(torch.bfloat16)
            with torch.inference_mode():
                got = moe.dispatch(x.bfloat16(), idx, w, ex, shared=shared)
            assert got.dtype == torch.bfloat16
            assert (got.float() - reference(x.bfloat16(), idx, w, ex, shared)).abs().max() <= 0.03 * want.abs().max()
    finally:
        torch.set_num_threads(before)


def test_workers_leave_the_thread_default_alone(monkeypatch):
    monkeypatch.setattr(moe, "PARALLEL_MIN_HIDDEN", 0)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        ex, shared = experts("dense"), moe.MLP(H, INTER)
        with torch.inference_mode():
            moe.dispatch(torch.randn(5, H), torch.randint(0, E, (5, K)), torch.rand(5, K), ex, shared=shared)
        assert torch.get_num_threads() == 2
        seen = []
        t = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
        t.start()
        t.join()
        assert seen == [2]
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("tokens", [1, 6, 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_moe_layer_on_workers_matches_calling_thread(monkeypatch, tokens, dtype):
    """MoE.forward on the workers (routing and the shared expert started there) against the
    calling-thread path, routing hooks included."""
    from swarmoe.config import TextConfig

    cfg = TextConfig(
        vocab_size=256, hidden_size=H, intermediate_size=4 * H, moe_intermediate_size=INTER,
        num_hidden_layers=1, num_attention_heads=4, kv_lora_rank=16, qk_nope_head_dim=8,
        qk_rope_head_dim=8, v_head_dim=8, n_routed_experts=E, num_experts_per_tok=K,
        n_shared_experts=1, n_group=1, topk_group=1, norm_topk_prob=True, routed_scaling_factor=2.5,
    )
    torch.manual_seed(0)
    layer = moe.MoE(cfg, layer_idx=3)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape) * p.shape[-1] ** -0.5)
    layer.to(dtype)
    layer.gate.float()
    seen = []
    layer.routing_hooks.append(lambda i, idx: seen.append((i, idx.clone())))
    x = torch.randn(2, tokens, H).to(dtype)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        with torch.inference_mode():
            want = layer(x)
        torch.set_num_threads(2)
        monkeypatch.setattr(moe, "PARALLEL_MIN_HIDDEN", 0)
        with torch.inference_mode():
            got = layer(x)
    finally:
        torch.set_num_threads(before)
    assert got.shape == x.shape and got.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert (got.float() - want.float()).abs().max() <= tol * want.float().abs().max()
    assert len(seen) == 2 and seen[0][0] == seen[1][0] == 3
    assert torch.equal(seen[0][1], seen[1][1])


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("tokens", [2, 40])
def test_bad_dispatch_input_is_an_error_on_every_path(monkeypatch, native, tokens):
    if not native:
        monkeypatch.setattr(kernels, "ENABLED", False)
    ex, shared = experts("dense"), moe.MLP(H, INTER)
    idx = torch.randint(0, E, (tokens, K))
    with torch.inference_mode():
        bad = idx.clone()
        bad[0, 0] = E  # no such expert
        with pytest.raises((IndexError, RuntimeError)):
            moe.dispatch(torch.randn(tokens, H), bad, torch.rand(tokens, K), ex, shared=shared)
        with pytest.raises(RuntimeError):
            moe.dispatch(torch.randn(tokens, H + 8), idx, torch.rand(tokens, K), ex)
