"""Engine behaviour: batching, prefix cache, preemption, chunked prefill, forks, bad input."""

from __future__ import annotations

import pytest
import torch

from reference import hf_text_model
from swarmoe import LLM, SamplingParams
from swarmoe.testing import make_tiny_checkpoint

GREEDY = SamplingParams(temperature=0, max_tokens=12)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("engine") / "tiny", int4=True, seed=7)


@pytest.fixture(scope="module")
def llm(ckpt):
    return LLM(ckpt)


def prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 760, (n,), generator=g).tolist() for n in lengths]


def tokens(outs):
    return [o.outputs[0].token_ids for o in outs]


def reference_greedy(path, ids_list, max_new):
    model = hf_text_model(path)
    out = []
    with torch.no_grad():
        for ids in ids_list:
            gen = model.generate(torch.tensor([ids]), max_new_tokens=max_new, do_sample=False)
            out.append(gen[0, len(ids):].tolist())
    return out


def test_greedy_batch_matches_transformers_generate(ckpt, llm):
    ids = prompts([5, 23, 41, 9])
    outs = llm.generate([{"prompt_token_ids": i} for i in ids], GREEDY)
    assert tokens(outs) == reference_greedy(ckpt, ids, 12)
    assert all(o.finished and o.outputs[0].finish_reason in ("length", "stop") for o in outs)


def test_text_prompts_are_tokenized_and_text_is_returned(llm):
    out = llm.generate("The swarm splits the work.", GREEDY)[0]
    assert out.prompt_token_ids == llm.tokenizer.encode("The swarm splits the work.")
    assert out.outputs[0].text == llm.tokenizer.decode(out.outputs[0].token_ids, skip_special_tokens=True)


def test_prefix_cache_shares_blocks_and_keeps_tokens(ckpt):
    shared = prompts([64], seed=1)[0]
    tails = prompts([5, 9, 3], seed=2)
    batch = [{"prompt_token_ids": shared + t} for t in tails]
    cached = LLM(ckpt, block_size=16)
    plain = LLM(ckpt, block_size=16, enable_prefix_caching=False)
    first = tokens(cached.generate(batch[:1], GREEDY))
    rest = tokens(cached.generate(batch[1:], GREEDY))
    assert cached.stats()["prefix_block_hits"] >= 2 * 4  # 64 shared tokens = 4 blocks each
    assert first + rest == tokens(plain.generate(batch, GREEDY))
    assert plain.stats()["prefix_block_hits"] == 0


def test_preemption_under_a_small_cache_keeps_tokens(ckpt, llm):
    ids = prompts([20, 22, 24, 26], seed=3)
    batch = [{"prompt_token_ids": i} for i in ids]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    small = LLM(ckpt, max_model_len=64, cache_memory_gb=1e-9)  # 4 blocks of 16 tokens
    assert small.stats()["blocks_total"] == 4
    assert tokens(small.generate(batch, params)) == tokens(llm.generate(batch, params))
    assert small.stats()["preemptions"] > 0
    assert small.stats()["blocks_used"] == 0


def test_chunked_prefill_keeps_tokens(ckpt, llm):
    ids = prompts([70, 33], seed=4)
    batch = [{"prompt_token_ids": i} for i in ids]
    chunked = LLM(ckpt, max_num_batched_tokens=16)
    assert tokens(chunked.generate(batch, GREEDY)) == tokens(llm.generate(batch, GREEDY))


def test_seeded_sampling_is_reproducible_and_n_forks(llm):
    params = SamplingParams(temperature=0.8, top_p=0.9, top_k=50, max_tokens=10, seed=11, n=3, ignore_eos=True)
    a = llm.generate({"prompt_token_ids": prompts([30], seed=5)[0]}, params)[0]
    b = llm.generate({"prompt_token_ids": prompts([30], seed=5)[0]}, params)[0]
    assert [o.token_ids for o in a.outputs] == [o.token_ids for o in b.outputs]
    assert len(a.outputs) == 3 and all(len(o.token_ids) == 10 for o in a.outputs)
    assert len({tuple(o.token_ids) for o in a.outputs}) > 1


def test_logprobs_are_returned(llm):
    out = llm.generate({"prompt_token_ids": [1, 2, 3]}, SamplingParams(temperature=0, max_tokens=3, logprobs=2))[0]
    lp = out.outputs[0].logprobs
    assert len(lp) == 3
    for step, token in zip(lp, out.outputs[0].token_ids, strict=True):
        assert token in step and all(v <= 0 for v in step.values())


def test_stop_strings_and_stop_token_ids(llm):
    base = llm.generate({"prompt_token_ids": [5, 6, 7]}, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0]
    ids = base.outputs[0].token_ids
    stopped = llm.generate({"prompt_token_ids": [5, 6, 7]},
                           SamplingParams(temperature=0, max_tokens=8, stop_token_ids=[ids[2]], ignore_eos=True))[0]
    assert stopped.outputs[0].token_ids == ids[: ids.index(ids[2]) + 1]
    assert stopped.outputs[0].finish_reason == "stop"


@pytest.mark.parametrize(
    ("prompt", "params", "message"),
    [
        ({"prompt_token_ids": []}, GREEDY, "prompt is empty"),
        ({"prompt_token_ids": [1, 99999]}, GREEDY, "outside the vocabulary"),
        ({"prompt_token_ids": [5] * 3000}, GREEDY, "max_model_len"),
        ({"prompt_token_ids": "abc"}, GREEDY, "prompt_token_ids"),
        ({"text": "x"}, GREEDY, "unknown key"),
    ],
)
def test_bad_requests_raise_and_others_keep_running(llm, prompt, params, message):
    good = llm.add_request({"prompt_token_ids": [1, 2, 3]}, GREEDY)
    with pytest.raises(ValueError, match=message):
        llm.add_request(prompt, params)
    finished = {}
    while llm.has_unfinished:
        for out in llm.step():
            if out.finished:
                finished[out.request_id] = out
    assert finished[good].outputs[0].token_ids


@pytest.mark.parametrize(
    ("field", "value"),
    [("temperature", -1.0), ("top_p", 0.0), ("top_k", 0), ("max_tokens", 0), ("logprobs", 50), ("n", 0)],
)
def test_invalid_sampling_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_abort_frees_blocks(llm):
    rid = llm.add_request({"prompt_token_ids": prompts([40])[0]}, SamplingParams(max_tokens=50, ignore_eos=True))
    llm.step()
    assert llm.stats()["blocks_used"] > 0
    llm.abort(rid)
    assert llm.stats()["blocks_used"] == 0 and not llm.has_unfinished


def test_expert_budget_keeps_tokens_and_reports_hits(ckpt, llm):
    ids = prompts([6, 17, 29], seed=8)
    batch = [{"prompt_token_ids": i} for i in ids]
    budget = LLM(ckpt, expert_memory_gb=4e-4)  # a handful of packed experts
    assert tokens(budget.generate(batch, GREEDY)) == tokens(llm.generate(batch, GREEDY))
    stats = budget.stats()
    assert stats["expert_resident_bytes"] <= stats["expert_budget_bytes"]
    assert stats["expert_misses"] > 0 and 0 < stats["expert_hit_rate"] < 1


def test_expert_budget_below_one_expert_is_rejected(ckpt):
    with pytest.raises(ValueError, match="below the size of one expert"):
        LLM(ckpt, expert_memory_gb=1e-9)
