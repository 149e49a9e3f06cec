"""The fp8 latent cache (`kv_cache_dtype="fp8"`): quantisation bounds, byte accounting, and the
engine on it (prefix sharing, forks, preemption) against the float32-cache engine."""

from __future__ import annotations

import pytest
import torch

from swarmoe import LLM, SamplingParams
from swarmoe.engine.kv_cache import FP8, LatentCache, dequantise_fp8, fp8_as_half, quantise_fp8
from swarmoe.testing import make_tiny_checkpoint

E4M3_EPS = 2.0**-4  # unit roundoff: 3 stored mantissa bits
E4M3_SUBNORMAL_STEP = 2.0**-9  # spacing of e4m3's subnormals, in units of the scale


def test_round_trip_error_is_within_the_e4m3_bound_of_each_slot_part():
    g = torch.Generator().manual_seed(0)
    lora, rope = 24, 8
    x = torch.randn(64, lora + rope, generator=g)
    x[:, lora:] *= 1e5  # the rope part far larger: one shared scale would push the latent into subnormals
    x[1] = 0.0  # an empty slot
    x[2, :lora] *= 1e-30  # a tiny part
    x[3, 5] = 1e4  # an outlier: the rest of its part goes coarse, not the other slots
    q, scales = quantise_fp8(x, lora)
    assert q.dtype == FP8 and scales.shape == (64, 2) and scales.dtype == torch.float32
    back = dequantise_fp8(q, scales, lora, torch.float32)
    err = (back - x).abs()
    for part in (slice(0, lora), slice(lora, None)):
        amax = x[:, part].abs().amax(-1, keepdim=True)
        scale = amax / 448
        # Round to nearest: half a unit in the last place, normal or subnormal.
        bound = E4M3_EPS * x[:, part].abs() + scale * E4M3_SUBNORMAL_STEP / 2
        assert (err[:, part] <= bound * (1 + 1e-5)).all()
        assert (err[:, part] <= E4M3_EPS * amax * (1 + 1e-5)).all()  # relative to the slot's amax
        # Each part's largest value is representable exactly (it maps to 448).
        top = x[:, part].abs().argmax(-1, keepdim=True)
        assert torch.allclose(back[:, part].gather(1, top), x[:, part].gather(1, top), rtol=1e-6, atol=0)
    assert (back[1] == 0).all()
    assert err[:, :lora].mean() < 0.05 * x[:, :lora].abs().mean()  # not flushed by the rope's size
    # bf16 out: the same values, rounded once more
    assert torch.allclose(dequantise_fp8(q, scales, lora, torch.bfloat16).float(), back, rtol=2**-8, atol=0)


def test_fp8_bits_widen_exactly():
    codes = torch.arange(256, dtype=torch.uint8).view(FP8)
    finite = ~codes.float().isnan()
    ours = fp8_as_half(codes).float() * 256
    assert torch.equal(ours[finite], codes.float()[finite])
    assert torch.equal(ours.signbit()[finite], codes.float().signbit()[finite])  # -0.0 too


def test_fp8_cache_writes_reads_copies_and_counts_its_scales():
    layers, blocks, bs, lora, rope = 2, 4, 4, 6, 2
    cache = LatentCache(layers, blocks, bs, lora + rope, FP8, "cpu", kv_lora_rank=lora)
    assert LatentCache.bytes_per_token(61, 576, FP8) == 61 * (576 + 2 * 4)  # K2.5 size
    assert LatentCache.bytes_per_token(61, 576, torch.bfloat16) == 61 * 576 * 2
    assert cache.block_bytes == bs * layers * (lora + rope + 8)
    # Parts 1e5 apart: beyond e4m3's range (448 / 2**-9), so one scale would flush the latent.
    values = torch.randn(bs, lora + rope) * torch.tensor([1.0] * lora + [1e5] * rope)
    slots = torch.arange(bs, 2 * bs)  # block 1
    cache.layer(1).write(slots, values)
    got = cache.layer(1).read(slots, torch.float32)
    for part in (slice(0, lora), slice(lora, None)):  # each part against its own amax
        amax = values[:, part].abs().amax(-1, keepdim=True)
        assert ((got - values)[:, part].abs() <= E4M3_EPS * amax * (1 + 1e-5)).all()
    cache.copy_block(1, 3)
    assert torch.equal(cache.layer(1).read(torch.arange(3 * bs, 4 * bs), torch.float32), got)
    assert cache.layer(1).read(slots, torch.bfloat16).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="kv_lora_rank"):
        LatentCache(layers, blocks, bs, lora + rope, FP8, "cpu")


# -- the engine ---------------------------------------------------------------------------------

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    # All layers dense: a router near-tie flipped by the rounding would move logits by far more
    # than the cache's precision, which is what these tests bound.
    return make_tiny_checkpoint(tmp_path_factory.mktemp("fp8") / "tiny", seed=7, first_k_dense_replace=3)


def prompts(lengths, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 760, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture(scope="module")
def batch():
    prefix = prompts([40], seed=1)[0]  # 2 full shared blocks of 16 + a partial one
    return [{"prompt_token_ids": prefix + tail} for tail in prompts([3, 7, 12, 1, 20, 5], seed=2)]


def recorded_run(ckpt, batch, **kw):
    """Generate the batch in two calls (the second reuses the first's prefix blocks); returns
    the engine, its tokens and every logits row by (request, completion, position + 1)."""
    llm = LLM(ckpt, **kw)
    logits = {}
    step = llm.runner.step

    def recording(work):
        out = step(work)
        for w, row in zip(work, out, strict=True):
            logits[(w.seq.request_id, w.seq.index, w.end)] = row.float().clone()
        return out

    llm.runner.step = recording
    llm.blocks.peak_used = 0
    outs = llm.generate(batch[:2], GREEDY) + llm.generate(batch[2:], GREEDY)
    return llm, [o.outputs[0].token_ids for o in outs], logits


@pytest.fixture(scope="module")
def runs(ckpt, batch):
    return recorded_run(ckpt, batch), recorded_run(ckpt, batch, kv_cache_dtype="fp8")


def test_fp8_logits_stay_within_e4m3_precision_of_the_float32_cache(batch, runs):
    (ref, ref_tokens, ref_logits), (fp8, fp8_tokens, fp8_logits) = runs
    assert fp8.cache.data.dtype == FP8 and ref.cache.data.dtype == torch.float32
    equal = 0
    for i, (item, a, b) in enumerate(zip(batch, ref_tokens, fp8_tokens, strict=True)):
        n = len(item["prompt_token_ids"])
        first = ref_logits[(f"req-{i}", 0, n)]
        tol = E4M3_EPS * float(first.abs().max())  # one e4m3 rounding of the logits' scale
        deviation = float((fp8_logits[(f"req-{i}", 0, n)] - first).abs().max())
        assert 0 < deviation <= tol, (i, deviation, tol)
        # Greedy paths agree until a near-tie: where they part, the token fp8 picked scores
        # within 2 * tol of the best under the float32 cache.
        k = next((k for k in range(len(a)) if a[k] != b[k]), len(a))
        equal += k
        if k < len(a):
            row = ref_logits[(f"req-{i}", 0, n + k)]
            assert float(row.max() - row[b[k]]) <= 2 * tol, (i, k)
    assert equal >= len(ref_tokens) * GREEDY.max_tokens // 2  # most tokens, position by position


def test_fp8_blocks_and_bytes_are_reported(ckpt, runs):
    (ref, *_), (fp8, *_) = runs
    assert fp8.blocks.peak_used == ref.blocks.peak_used > 0
    assert fp8.stats()["prefix_block_hits"] == ref.stats()["prefix_block_hits"] > 0
    assert fp8.stats()["blocks_used"] == 0
    text = fp8.config.text
    width = text.kv_lora_rank + text.qk_rope_head_dim
    assert fp8.cache.block_bytes == 16 * text.num_hidden_layers * (width + 8)
    assert ref.cache.block_bytes == 16 * text.num_hidden_layers * width * 4
    # The cache budget buys blocks at their true size, scales included.
    small = LLM(ckpt, kv_cache_dtype="fp8", max_model_len=32, cache_memory_gb=4 * fp8.cache.block_bytes / 1e9)
    assert small.stats()["blocks_total"] == 4


def test_fp8_prefix_sharing_forks_and_preemption_keep_tokens(ckpt, batch, runs):
    _, (fp8, fp8_tokens, _) = runs
    plain = LLM(ckpt, kv_cache_dtype="fp8", enable_prefix_caching=False)
    assert [o.outputs[0].token_ids for o in plain.generate(batch, GREEDY)] == fp8_tokens
    # n=2 greedy: the child gets the parent's full blocks and a copy of its partial one (43
    # tokens: 11 in it), whose scales must come along.
    forked = fp8.generate(batch[0], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, n=2))[0]
    assert [o.token_ids for o in forked.outputs] == [fp8_tokens[0]] * 2
    small = LLM(ckpt, kv_cache_dtype="fp8", max_model_len=64, cache_memory_gb=1e-9)  # 4 blocks of 16
    assert [o.outputs[0].token_ids for o in small.generate(batch[:4], GREEDY)] == fp8_tokens[:4]
    assert small.stats()["preemptions"] > 0


@pytest.mark.parametrize("value", ["int8", "float8_e5m2", "fp4", torch.int8, torch.float8_e5m2, 8])
def test_unsupported_kv_cache_dtype_is_rejected(ckpt, value):
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        LLM(ckpt, kv_cache_dtype=value)


@pytest.mark.parametrize("value", ["float8_e4m3fn", torch.float8_e4m3fn, "bf16", torch.bfloat16, "auto"])
def test_kv_cache_dtype_spellings(ckpt, value):
    want = {"auto": torch.float32, "bf16": torch.bfloat16}.get(value, value)
    want = FP8 if want == "float8_e4m3fn" else want
    assert LLM(ckpt, kv_cache_dtype=value, cache_memory_gb=1e-3).cache.data.dtype == want
