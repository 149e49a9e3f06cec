"""The engine in its own process: the same behaviour as the in-process AsyncEngine, across a
process boundary (outputs, bad input, aborts, a dying engine)."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from swarmoe import LLM, SamplingParams
from swarmoe.engine.engine_process import EngineProcess
from swarmoe.testing import make_tiny_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("proc") / "tiny", seed=5)


@pytest.fixture(scope="module")
def engine(checkpoint):
    eng = EngineProcess(checkpoint, max_num_seqs=8)
    yield eng
    eng.shutdown()


async def collect(engine, prompt, params, **kw):
    return [out async for out in engine.generate(prompt, params, **kw)]


async def test_concurrent_requests_match_offline_generate(engine, checkpoint):
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    prompts = [{"prompt_token_ids": list(range(3, 3 + n))} for n in (4, 11, 19)]
    streams = await asyncio.gather(*(collect(engine, p, params) for p in prompts))
    for stream in streams:
        assert [len(o.outputs[0].token_ids) for o in stream] == list(range(1, 9))
        assert stream[-1].finished
    offline = LLM(checkpoint, max_num_seqs=8)
    expected = [o.outputs[0].token_ids for o in offline.generate(prompts, params)]
    assert [s[-1].outputs[0].token_ids for s in streams] == expected
    # What the server reads from the parent side matches the engine's own.
    assert engine.max_model_len == offline.max_model_len
    assert engine.config == offline.config
    assert engine.tokenizer.encode("hello swarm") == offline.tokenizer.encode("hello swarm")


async def test_bad_request_fails_only_its_caller(engine):
    good = asyncio.create_task(collect(engine, {"prompt_token_ids": [1, 2, 3]},
                                       SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        await collect(engine, {"prompt_token_ids": [10**6]}, SamplingParams())
    assert (await good)[-1].finished


async def test_interval_coalesces_outputs_and_leaving_frees_blocks(engine):
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    prompt = {"prompt_token_ids": list(range(5, 20))}
    sparse = await collect(engine, prompt, params, interval=60.0)
    assert [len(o.outputs[0].token_ids) for o in sparse] == [1, 12]
    stream = engine.generate({"prompt_token_ids": list(range(40))},
                             SamplingParams(temperature=0, max_tokens=500, ignore_eos=True))
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


def test_a_checkpoint_that_does_not_load_fails_at_start(tmp_path):
    with pytest.raises((OSError, ValueError)):
        EngineProcess(tmp_path / "no-such-checkpoint")


async def test_a_dead_engine_fails_its_streams_and_later_calls(checkpoint):
    eng = EngineProcess(checkpoint, max_num_seqs=4)
    try:
        params = SamplingParams(temperature=0, max_tokens=10_000, ignore_eos=True)
        stream = eng.generate({"prompt_token_ids": [1, 2, 3]}, params)
        await anext(stream)
        os.kill(eng._process.pid, signal.SIGKILL)
        with pytest.raises(RuntimeError, match="exited"):
            async for _ in stream:
                pass
        with pytest.raises(RuntimeError, match="gone"):
            await collect(eng, {"prompt_token_ids": [1, 2, 3]}, SamplingParams(max_tokens=2))
    finally:
        eng.shutdown()
