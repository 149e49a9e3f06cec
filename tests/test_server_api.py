"""The server over the real engine and a tiny random K2.5 checkpoint, driven by the official
openai client over HTTP on 127.0.0.1: models, chat and completions (streamed and not), sampling
options, images, concurrency, health, metrics, and disconnects freeing the cache."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import re
import socket
import time

import httpx
import openai
import pytest
from PIL import Image

from swarmoe import LLM, SamplingParams
from swarmoe.engine.async_engine import AsyncEngine
from swarmoe.engine.engine_process import EngineProcess
from swarmoe.server import create_app
from swarmoe.server.background import serve_in_thread
from swarmoe.testing import make_tiny_checkpoint

MODEL = "tiny-k25"
USER = [{"role": "user", "content": "Tell me about swarms."}]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}


@pytest.fixture(scope="module", params=["thread", "process"])
def server(request, tmp_path_factory):
    """The server over each engine: on a thread of this process, and in its own process (as
    `swarmoe serve` runs it; image tensors then cross the process boundary)."""
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("api") / "tiny", multimodal=True, seed=5)
    engine = (AsyncEngine(LLM(path, max_num_seqs=8)) if request.param == "thread"
              else EngineProcess(path, max_num_seqs=8))
    with serve_in_thread(create_app(engine, MODEL)) as url:
        yield url, engine
    engine.shutdown()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0)


def streamed_chat(client, **kw):
    content, reasoning, usage, finish = "", "", None, None
    for chunk in client.chat.completions.create(model=MODEL, stream=True,
                                                stream_options={"include_usage": True}, **kw):
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            content += c.delta.content or ""
            reasoning += getattr(c.delta, "reasoning_content", None) or ""
            finish = c.finish_reason or finish
    return content, reasoning, usage, finish


def metric(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics").text
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert match, f"{name} not in /metrics"
    return float(match[1])


def wait_for_idle(url: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metric(url, "swarmoe_cache_blocks_used") == 0 and metric(url, "swarmoe_engine_requests_running") == 0:
            return
        time.sleep(0.05)
    raise AssertionError("cache blocks were not freed")


def test_models(client):
    assert [m.id for m in client.models.list()] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")


@pytest.mark.parametrize("thinking", [True, False])
def test_streamed_chat_equals_whole_chat_at_temperature_0(client, thinking):
    kw = dict(messages=USER, max_tokens=10, temperature=0,
              extra_body={"chat_template_kwargs": {"thinking": thinking}})
    whole = client.chat.completions.create(model=MODEL, **kw)
    content, reasoning, usage, finish = streamed_chat(client, **kw)
    msg = whole.choices[0].message
    assert (content, reasoning) == (msg.content or "", getattr(msg, "reasoning_content", None) or "")
    assert content or reasoning
    assert finish == whole.choices[0].finish_reason
    assert usage.model_dump() == whole.usage.model_dump()
    assert whole.usage.completion_tokens <= 10


def test_seed_n_and_logprobs(client):
    kw = dict(messages=USER, max_tokens=4, temperature=1.0, top_p=0.9, seed=11, n=2,
              logprobs=True, top_logprobs=3)
    a = client.chat.completions.create(model=MODEL, **kw)
    b = client.chat.completions.create(model=MODEL, **kw)
    assert len(a.choices) == 2
    assert [c.logprobs.model_dump() for c in a.choices] == [c.logprobs.model_dump() for c in b.choices]
    for choice in a.choices:
        entries = choice.logprobs.content
        assert 1 <= len(entries) <= 4
        for e in entries:
            tops = [t.logprob for t in e.top_logprobs]
            assert len(tops) == 3 and tops == sorted(tops, reverse=True) and e.logprob <= 0


def test_extreme_but_valid_sampling_values(client):
    # Found by the fuzzer: these once emptied the sampling distribution inside the engine.
    for kw in ({"top_p": 1e-45}, {"temperature": 1e-40}, {"temperature": 2}):
        r = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=2, seed=1,
                                           extra_body={"ignore_eos": True, "top_k": 1}, **kw)
        assert r.usage.completion_tokens == 2


def test_completions_streamed_equals_whole_and_batches(client):
    kw = dict(prompt=["The swarm", "Experts route"], max_tokens=6, temperature=0, logprobs=2)
    whole = client.completions.create(model=MODEL, **kw)
    assert [c.index for c in whole.choices] == [0, 1]
    texts = {0: "", 1: ""}
    for chunk in client.completions.create(model=MODEL, stream=True, **kw):
        for c in chunk.choices:
            texts[c.index] += c.text
    assert texts == {c.index: c.text for c in whole.choices}
    assert all(len(c.logprobs.tokens) == 6 for c in whole.choices)
    ids = client.completions.create(model=MODEL, prompt=[5, 6, 7], max_tokens=3, temperature=0)
    assert ids.usage.prompt_tokens == 3 and ids.usage.completion_tokens == 3


def test_named_tool_choice_with_the_real_engine(client):
    kw = dict(messages=USER, tools=[WEATHER], max_tokens=6, temperature=0,
              tool_choice={"type": "function", "function": {"name": "get_weather"}})
    r = client.chat.completions.create(model=MODEL, **kw)
    calls = r.choices[0].message.tool_calls
    # Random weights write noise as arguments, but the call itself is the forced one.
    assert [c.function.name for c in calls] == ["get_weather"]
    assert calls[0].id == "functions.get_weather:0"


def test_image_data_url_reaches_the_vision_tower(client):
    buf = io.BytesIO()
    Image.new("RGB", (56, 56), (10, 200, 90)).save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    text_only = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=2, temperature=0)
    with_image = client.chat.completions.create(model=MODEL, max_tokens=2, temperature=0, messages=[
        {"role": "user", "content": [{"type": "text", "text": USER[0]["content"]},
                                     {"type": "image_url", "image_url": {"url": url}}]}])
    # The image adds <|media_begin|>image<|media_content|>, 4 pads (56 px -> 2x2 merged), end, "\n".
    extra = with_image.usage.prompt_tokens - text_only.usage.prompt_tokens
    assert extra >= 4 and with_image.usage.completion_tokens == 2


async def test_concurrent_requests_share_the_engine(server):
    url, _ = server
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    prompts = [[{"role": "user", "content": f"Question {i}"}] for i in range(6)]

    async def one(messages, stream):
        kw = dict(model=MODEL, messages=messages, max_tokens=5, temperature=0)
        if not stream:
            return (await client.chat.completions.create(**kw)).choices[0].message.reasoning_content
        text = ""
        async for chunk in await client.chat.completions.create(stream=True, **kw):
            text += "".join(getattr(c.delta, "reasoning_content", None) or "" for c in chunk.choices)
        return text

    together = await asyncio.gather(*(one(p, i % 2 == 0) for i, p in enumerate(prompts)))
    alone = [await one(p, False) for p in prompts]
    assert together == alone
    await client.close()


def test_health_and_metrics(server, client):
    url, _ = server
    assert httpx.get(url + "/health").json() == {"status": "ok"}
    client.chat.completions.create(model=MODEL, messages=USER, max_tokens=2)
    text = httpx.get(url + "/metrics").text
    for name in ('swarmoe_requests_total{route="/v1/chat/completions",status="200"}',
                 "swarmoe_generation_tokens_total", "swarmoe_prompt_tokens_total",
                 "swarmoe_time_to_first_token_seconds_count",
                 'swarmoe_request_latency_seconds_count{route="/v1/chat/completions"}',
                 "swarmoe_engine_requests_waiting", "swarmoe_cache_usage_ratio"):
        assert name in text, name
    assert metric(url, "swarmoe_generation_tokens_total") >= 2


# Long enough (ignore_eos) that finishing normally takes seconds; an abort frees blocks at once.
LONG = {"model": MODEL, "messages": USER, "max_tokens": 1900, "ignore_eos": True}


def test_client_leaving_a_stream_aborts_and_frees_blocks(server):
    url, _ = server
    with httpx.Client(timeout=30) as http, http.stream(
        "POST", url + "/v1/chat/completions", json={**LONG, "stream": True}
    ) as r:
        lines = r.iter_lines()
        assert any(next(lines).startswith("data: {") for _ in range(6))
        assert metric(url, "swarmoe_cache_blocks_used") > 0
    wait_for_idle(url, timeout=2)


def test_client_leaving_a_whole_request_aborts_and_frees_blocks(server):
    url, _ = server
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps(LONG).encode()
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                     b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        deadline = time.monotonic() + 10
        while metric(url, "swarmoe_cache_blocks_used") == 0:
            assert time.monotonic() < deadline
            time.sleep(0.01)
    wait_for_idle(url, timeout=2)
    assert 'swarmoe_requests_total{route="/v1/chat/completions",status="499"}' in httpx.get(url + "/metrics").text


async def test_callers_cancelled_before_the_engine_answers_leave_nothing_behind(server):
    """A client that leaves while its request is still queued for the engine thread (or a
    health check that times out) must neither leak the request nor kill the engine."""
    url, engine = server
    params = SamplingParams(max_tokens=1900, ignore_eos=True)
    for i in range(20):
        stream = engine.generate({"prompt_token_ids": list(range(30))}, params, f"gone-{i}")
        first = asyncio.ensure_future(anext(stream))
        await asyncio.sleep(0)
        first.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await first
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(engine.stats(), 0)
    await asyncio.to_thread(wait_for_idle, url, 5)
    assert httpx.get(url + "/health").status_code == 200
