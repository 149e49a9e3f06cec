"""Every error case answers in OpenAI's shape with the right status, never with a stack trace,
and the server keeps serving afterwards (each test ends with a good request)."""

from __future__ import annotations

import base64
import io
from collections.abc import AsyncIterator

import httpx
import openai
import pytest
from PIL import Image

from swarmoe import LLM
from swarmoe.engine.async_engine import AsyncEngine
from swarmoe.server import create_app
from swarmoe.server.background import serve_in_thread
from swarmoe.testing import make_tiny_checkpoint

MODEL = "tiny"
KEY = "sk-test-123"
USER = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("errors") / "tiny", seed=3)
    eng = AsyncEngine(LLM(path, max_model_len=128, max_num_seqs=4))
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def url(engine):
    with serve_in_thread(create_app(engine, MODEL, max_request_bytes=64_000)) as base:
        yield base


@pytest.fixture
def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


def check_error(response: httpx.Response, status: int, param: str | None = None,
                code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and "Traceback" not in response.text
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    return error


def still_serving(client) -> None:
    r = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=2, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length")


def chat(url: str, **kw) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", **kw)


def test_malformed_json_and_wrong_body(url, client):
    check_error(chat(url, content=b'{"model": "tiny", "messages": [', headers={
        "content-type": "application/json"}), 400, code="invalid_json")
    check_error(chat(url, content=b"", headers={"content-type": "application/json"}), 400)
    check_error(chat(url, json=[1, 2]), 400)
    check_error(chat(url, json={"messages": USER}), 400, param="model")
    still_serving(client)


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-5", messages=USER)
    assert info.value.body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-5", prompt="x")
    still_serving(client)


@pytest.mark.parametrize(("extra", "param"), [
    ({"temperature": 5}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"n": 0}, "n"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_completion_tokens": -3}, "max_completion_tokens"),
    ({"top_logprobs": 50, "logprobs": True}, "top_logprobs"),
    ({"stop": [""]}, "stop"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0"),
    ({"messages": [{"role": "user"}]}, "messages.0.content"),
    ({"frobnicate": True}, "frobnicate"),
    ({"tool_choice": "required"}, None),
    ({"presence_penalty": 1.0}, None),
    ({"chat_template_kwargs": {"messages": []}}, None),
])
def test_bad_parameter_values_are_400_naming_the_field(url, client, extra, param):
    body = {"model": MODEL, "messages": USER, **extra}
    error = check_error(chat(url, json=body), 400, param=param)
    assert error["type"] == "invalid_request_error"
    still_serving(client)


def test_named_tool_choice_must_be_declared(client):
    with pytest.raises(openai.BadRequestError, match="not in tools"):
        client.chat.completions.create(
            model=MODEL, messages=USER,
            tools=[{"type": "function", "function": {"name": "a"}}],
            tool_choice={"type": "function", "function": {"name": "b"}})


def test_images_are_refused_clearly(client):
    def ask(url: str):
        return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}}]}])

    with pytest.raises(openai.BadRequestError, match="does not fetch remote"):
        ask("https://example.com/cat.png")
    with pytest.raises(openai.BadRequestError, match="not valid base64"):
        ask("data:image/png;base64,@@@")
    with pytest.raises(openai.BadRequestError, match="could not be decoded"):
        ask("data:image/png;base64,aGVsbG8=")
    buf = io.BytesIO()
    Image.new("RGB", (28, 28)).save(buf, format="PNG")
    with pytest.raises(openai.BadRequestError, match="no vision tower"):
        ask("data:image/png;base64," + base64.b64encode(buf.getvalue()).decode())
    still_serving(client)


def test_context_overflow(client):
    long = [{"role": "user", "content": "word " * 400}]
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=long)
    assert info.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError, match="maximum context length is 128"):
        client.chat.completions.create(model=MODEL, messages=USER, max_tokens=120)
    with pytest.raises(openai.BadRequestError, match="context length"):
        client.completions.create(model=MODEL, prompt=list(range(200)))
    still_serving(client)


def test_engine_refusals_become_400(client):
    with pytest.raises(openai.BadRequestError, match="outside the vocabulary"):
        client.completions.create(model=MODEL, prompt=[10**7])
    with pytest.raises(openai.BadRequestError, match="outside the vocabulary"):
        client.completions.create(model=MODEL, prompt=[[1, 2], [10**7]], stream=True)
    still_serving(client)


def test_request_size_limit(url, client):
    big = {"model": MODEL, "messages": [{"role": "user", "content": "x" * 70_000}]}
    check_error(chat(url, json=big), 413, code="request_too_large")

    def chunks():  # no Content-Length: the limit still holds while reading
        for _ in range(100):
            yield b"x" * 1000

    check_error(chat(url, content=chunks(), headers={"content-type": "application/json"}), 413)
    still_serving(client)


def test_unknown_route_and_method(url, client):
    check_error(httpx.get(url + "/v1/nothing"), 404)
    check_error(httpx.get(url + "/v1/chat/completions"), 405)
    still_serving(client)


def test_api_key(engine):
    with serve_in_thread(create_app(engine, MODEL, api_key=KEY)) as base:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            r = httpx.get(base + "/v1/models", headers=headers)
            check_error(r, 401, code="invalid_api_key")
        check_error(chat(base, json={"model": MODEL, "messages": USER}), 401)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=base + "/v1", api_key="nope", max_retries=0).models.list()
        good = openai.OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0)
        assert [m.id for m in good.models.list()] == [MODEL]
        still_serving(good)
        assert httpx.get(base + "/health").status_code == 200  # probes need no key


class _BrokenEngine:
    """Fails inside generation, as a model crash would."""

    def __init__(self, real: AsyncEngine) -> None:
        self.tokenizer, self.config, self.max_model_len = real.tokenizer, real.config, real.max_model_len

    async def generate(self, prompt, params, request_id=None, *, interval=None) -> AsyncIterator:
        raise RuntimeError("CUDA error: device-side assert at /secret/path.py:42")
        yield  # an async generator, like the engine's

    async def stats(self) -> dict[str, float]:
        raise KeyError("internal")


def test_internal_failures_never_leak_details(engine):
    with serve_in_thread(create_app(_BrokenEngine(engine), MODEL)) as base:
        r = chat(base, json={"model": MODEL, "messages": USER})
        error = check_error(r, 500)
        assert "secret" not in r.text and "CUDA" not in r.text and error["type"] == "server_error"
        r = chat(base, json={"model": MODEL, "messages": USER, "stream": True})
        assert "secret" not in r.text and r.status_code == 500
        r = httpx.get(base + "/metrics")
        assert check_error(r, 500)["message"] == "internal server error; see the server log"
        check_error(httpx.get(base + "/health"), 503)
        check_error(chat(base, json={"model": "x", "messages": USER}), 404)  # still answering
