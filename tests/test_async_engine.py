"""The async fronts — the engine on a thread (AsyncEngine) and in its own process
(EngineProcess): concurrent requests, streaming, client disconnects, bad input."""

from __future__ import annotations

import asyncio

import pytest

from swarmoe import LLM, SamplingParams
from swarmoe.engine.async_engine import AsyncEngine
from swarmoe.engine.engine_process import EngineProcess
from swarmoe.testing import make_tiny_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("async") / "tiny", seed=2)


@pytest.fixture(scope="module", params=["thread", "process"])
def engine(request, checkpoint):
    eng = AsyncEngine(LLM(checkpoint)) if request.param == "thread" else EngineProcess(checkpoint)
    yield eng
    eng.shutdown()


async def collect(engine, prompt, params, **kw):
    outs = [out async for out in engine.generate(prompt, params, **kw)]
    return outs


async def test_concurrent_requests_match_offline_generate(engine, checkpoint):
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    prompts = [{"prompt_token_ids": list(range(3, 3 + n))} for n in (4, 11, 19)]
    streams = await asyncio.gather(*(collect(engine, p, params) for p in prompts))
    for stream in streams:
        assert stream[-1].finished
        # Streaming grows the output one token per update.
        lengths = [len(o.outputs[0].token_ids) for o in stream]
        assert lengths == list(range(1, 9))
    fresh = LLM(checkpoint)  # the engine owns its LLM; compare with another
    expected = [o.outputs[0].token_ids for o in fresh.generate(prompts, params)]
    assert [s[-1].outputs[0].token_ids for s in streams] == expected


async def test_stream_interval_coalesces_outputs_without_losing_tokens(engine):
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    prompt = {"prompt_token_ids": list(range(5, 20))}
    every = await collect(engine, prompt, params)
    # An interval longer than the whole generation: the first output, then the last at once.
    sparse = await collect(engine, prompt, params, interval=60.0)
    assert [len(o.outputs[0].token_ids) for o in sparse] == [1, 12]
    assert sparse[-1].finished
    assert sparse[-1].outputs[0].token_ids == every[-1].outputs[0].token_ids
    # interval=0 skips nothing a prompt consumer keeps up with, and still ends with everything.
    eager = await collect(engine, prompt, params, interval=0.0)
    assert eager[-1].outputs[0].token_ids == every[-1].outputs[0].token_ids
    lengths = [len(o.outputs[0].token_ids) for o in eager]
    assert lengths == sorted(set(lengths))


async def test_bad_request_fails_only_its_caller(engine):
    good = asyncio.create_task(collect(engine, {"prompt_token_ids": [1, 2, 3]},
                                       SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        await collect(engine, {"prompt_token_ids": [10**6]}, SamplingParams())
    assert (await good)[-1].finished


async def test_leaving_a_stream_aborts_and_frees_blocks(engine):
    params = SamplingParams(temperature=0, max_tokens=500, ignore_eos=True)
    stream = engine.generate({"prompt_token_ids": list(range(40))}, params)
    async for out in stream:
        if len(out.outputs[0].token_ids) >= 2:
            break
    await stream.aclose()
    for _ in range(100):
        stats = await engine.stats()
        if stats["blocks_used"] == 0 and stats["running"] == 0:
            break
        await asyncio.sleep(0.02)
    assert stats["blocks_used"] == 0 and stats["running"] == 0
