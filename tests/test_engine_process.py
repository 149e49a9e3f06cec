"""The engine in its own process: what only a process boundary brings (the parent's own view of
the checkpoint, a load failure, a dying engine)."""

from __future__ import annotations

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


async def collect(engine, prompt, params):
    return [out async for out in engine.generate(prompt, params)]


async def test_the_parent_side_matches_the_engine(engine, checkpoint):
    """What the server reads without asking the engine process (the behaviour both engines share
    is tested over both in test_async_engine.py)."""
    offline = LLM(checkpoint, max_num_seqs=8)
    assert engine.max_model_len == offline.max_model_len
    assert engine.config == offline.config
    assert engine.tokenizer.encode("hello swarm") == offline.tokenizer.encode("hello swarm")
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    out = (await collect(engine, {"prompt_token_ids": [7, 8, 9]}, params))[-1]
    assert out.outputs[0].token_ids == offline.generate([{"prompt_token_ids": [7, 8, 9]}], params)[0].outputs[0].token_ids


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
