"""Parsing end to end: a scripted engine double writes known K2 output (tool calls, reasoning,
stop strings, multibyte text) and the official openai client reads it over real HTTP.

The tiny model only emits noise, so what the server does with *meaningful* output is tested
with this double; the real engine's plumbing is tested in test_server_api.py.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
from collections.abc import AsyncIterator, Callable

import openai
import pytest
from PIL import Image

from swarmoe.config import load_config
from swarmoe.engine.llm import CompletionOutput, RequestOutput
from swarmoe.engine.sampling import SamplingParams
from swarmoe.server import create_app
from swarmoe.server.background import serve_in_thread
from swarmoe.testing import tiny_config, write_tiny_tokenizer
from swarmoe.text import Tokenizer

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}


class ScriptedEngine:
    """Engine double: answers every prompt with `reply(prompt_text)`, one real token per step,
    honouring max_tokens, stop strings and stop tokens as the engine does. Test-only."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, multimodal: bool = True) -> None:
        self.tokenizer = tokenizer
        self.config = load_config(tiny_config(vocab_size, multimodal=multimodal))
        self.max_model_len = 4096
        self.reply: Callable[[str], str] = lambda prompt: "Hello!"
        self.prompts: list[str] = []

    async def generate(
        self, prompt: dict, params: SamplingParams, request_id: str | None = None,
        *, interval: float | None = None,
    ) -> AsyncIterator[RequestOutput]:
        ids = prompt["prompt_token_ids"]
        if any(not 0 <= i < self.tokenizer.vocab_size for i in ids):
            raise ValueError("prompt_token_ids contains a token outside the vocabulary")
        text = self.tokenizer.decode(ids)
        self.prompts.append(text)
        script = self.tokenizer.encode(self.reply(text), allowed_special="all")
        outs = [CompletionOutput(i, "", [], None) for i in range(params.n)]
        for step in range(len(script) + 1):
            await asyncio.sleep(0)
            for out in outs:
                if step == len(script):
                    out.finish_reason = "stop"  # the script ends as if with EOS
                    continue
                out.token_ids.append(script[step])
                out.text = self.tokenizer.decode(out.token_ids, skip_special_tokens=True)
                for s in params.stop or []:
                    if s in out.text:
                        out.text = out.text[: out.text.index(s)]
                        out.finish_reason = "stop"
                if script[step] in params.stop_token_ids:
                    out.finish_reason = "stop"
                if out.finish_reason is None and len(out.token_ids) >= (params.max_tokens or 1 << 30):
                    out.finish_reason = "length"
            done = all(o.finish_reason for o in outs)
            yield RequestOutput(request_id or "r", None, list(ids),
                                [CompletionOutput(o.index, o.text, list(o.token_ids), o.finish_reason)
                                 for o in outs], done, {"time_to_first_token": 0.001})
            if done:
                return

    async def stats(self) -> dict[str, float]:
        return {"blocks_total": 10, "blocks_used": 0, "running": 0, "waiting": 0}


@pytest.fixture(scope="module")
def scripted(tmp_path_factory):
    path = tmp_path_factory.mktemp("scripted")
    vocab = write_tiny_tokenizer(path)
    engine = ScriptedEngine(Tokenizer.from_pretrained(path), vocab)
    with serve_in_thread(create_app(engine, "scripted")) as url:
        yield engine, openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


def both(client: openai.OpenAI, **kw):
    """The non-streamed message and the streamed one reassembled from its deltas."""
    whole = client.chat.completions.create(model="scripted", **kw)
    content, reasoning, calls, finish = "", "", {}, None
    for chunk in client.chat.completions.create(model="scripted", stream=True, **kw):
        for choice in chunk.choices:
            d = choice.delta
            content += d.content or ""
            reasoning += getattr(d, "reasoning_content", None) or ""
            for tc in d.tool_calls or []:
                if tc.id is not None:
                    assert tc.index not in calls, "id and name come once, in the first piece"
                    calls[tc.index] = {"id": tc.id, "name": tc.function.name, "arguments": ""}
                calls[tc.index]["arguments"] += tc.function.arguments or ""
            finish = choice.finish_reason or finish
    streamed = {"content": content or None, "reasoning": reasoning or None,
                "calls": [calls[i] for i in sorted(calls)], "finish": finish}
    return whole.choices[0], streamed


def as_calls(message) -> list[dict]:
    return [{"id": c.id, "name": c.function.name, "arguments": c.function.arguments}
            for c in message.tool_calls or []]


def test_tool_call_and_reasoning_are_split_out(scripted):
    engine, client = scripted
    engine.reply = lambda _: (
        "The user wants weather; call the tool.</think>Checking."
        "<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0"
        '<|tool_call_argument_begin|>{"city": "Paris {centre}"}<|tool_call_end|>'
        "<|tool_call_begin|>functions.get_time:1<|tool_call_argument_begin|>{}<|tool_call_end|>"
        "<|tool_calls_section_end|>")
    whole, streamed = both(client, messages=[{"role": "user", "content": "Weather in Paris?"}],
                           tools=[WEATHER, TIME])
    msg = whole.message
    assert msg.reasoning_content == "The user wants weather; call the tool."
    assert msg.content == "Checking."
    assert as_calls(msg) == [
        {"id": "functions.get_weather:0", "name": "get_weather", "arguments": '{"city": "Paris {centre}"}'},
        {"id": "functions.get_time:1", "name": "get_time", "arguments": "{}"},
    ]
    assert json.loads(msg.tool_calls[0].function.arguments) == {"city": "Paris {centre}"}
    assert whole.finish_reason == "tool_calls"
    assert streamed == {"content": msg.content, "reasoning": msg.reasoning_content,
                        "calls": as_calls(msg), "finish": "tool_calls"}
    assert "tool_declare" in engine.prompts[-1] and "get_weather" in engine.prompts[-1]


def test_parallel_tool_calls_false_keeps_the_first(scripted):
    engine, client = scripted
    engine.reply = lambda _: (
        "</think><|tool_call_section_begin|><|tool_call_begin|>functions.get_time:0"
        "<|tool_call_argument_begin|>{}<|tool_call_end|><|tool_call_begin|>functions.get_weather:1"
        '<|tool_call_argument_begin|>{"city": "Oslo"}')  # singular spelling, cut off
    whole, streamed = both(client, messages=[{"role": "user", "content": "?"}],
                           tools=[WEATHER, TIME], parallel_tool_calls=False)
    assert [c["name"] for c in as_calls(whole.message)] == ["get_time"]
    assert streamed["calls"] == as_calls(whole.message)


def test_tool_choice_none_declares_no_tools_and_returns_none(scripted):
    engine, client = scripted
    engine.reply = lambda _: ("</think>Sure.<|tool_calls_section_begin|><|tool_call_begin|>"
                              "functions.get_time:0<|tool_call_argument_begin|>{}<|tool_call_end|>")
    whole, streamed = both(client, messages=[{"role": "user", "content": "?"}], tools=[TIME],
                           tool_choice="none")
    assert "tool_declare" not in engine.prompts[-1]
    assert whole.message.tool_calls is None and whole.message.content == "Sure."
    assert whole.finish_reason == "stop" and streamed["calls"] == []


def test_tool_choice_required_forces_a_call_opening(scripted):
    engine, client = scripted
    engine.reply = lambda _: ('get_weather:0<|tool_call_argument_begin|>{"city": "Rome"}'
                              "<|tool_call_end|><|tool_calls_section_end|>")
    whole, streamed = both(client, messages=[{"role": "user", "content": "?"}],
                           tools=[WEATHER, TIME], tool_choice="required")
    assert engine.prompts[-1].endswith(
        "<think></think><|tool_calls_section_begin|><|tool_call_begin|>functions.")
    assert as_calls(whole.message) == [{"id": "functions.get_weather:0", "name": "get_weather",
                                        "arguments": '{"city": "Rome"}'}]
    assert whole.message.reasoning_content is None
    assert streamed["calls"] == as_calls(whole.message)


def test_named_tool_choice_writes_the_name(scripted):
    engine, client = scripted
    engine.reply = lambda _: '{"city": "Lima"}<|tool_call_end|><|tool_calls_section_end|>'
    whole, streamed = both(client, messages=[{"role": "user", "content": "?"}],
                           tools=[WEATHER, TIME],
                           tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert engine.prompts[-1].endswith(
        "functions.get_weather:0<|tool_call_argument_begin|>")
    assert as_calls(whole.message) == [{"id": "functions.get_weather:0", "name": "get_weather",
                                        "arguments": '{"city": "Lima"}'}]
    assert streamed["calls"] == as_calls(whole.message)


def test_thinking_off_and_history_with_reasoning_and_tool_results(scripted):
    engine, client = scripted
    engine.reply = lambda _: "It is sunny in Paris."
    messages = [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "reasoning_content": "Need the tool.",
         "tool_calls": [{"id": "functions.get_weather:0", "type": "function",
                         "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]},
        {"role": "tool", "tool_call_id": "functions.get_weather:0", "content": "sunny"},
    ]
    whole, streamed = both(client, messages=messages, tools=[WEATHER],
                           extra_body={"chat_template_kwargs": {"thinking": False}})
    prompt = engine.prompts[-1]
    assert prompt.endswith("<|im_assistant|>assistant<|im_middle|><think></think>")
    assert "<|im_system|>system<|im_middle|>Be brief.<|im_end|>" in prompt
    assert "## Return of functions.get_weather:0\nsunny" in prompt
    assert '<|tool_call_argument_begin|>{"city":"Paris"}' in prompt
    assert whole.message.content == "It is sunny in Paris." and whole.message.reasoning_content is None
    assert streamed["content"] == whole.message.content


def test_reasoning_in_history_is_rendered(scripted):
    engine, client = scripted
    engine.reply = lambda _: "thinking more</think>done"
    client.chat.completions.create(model="scripted", messages=[
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b", "reasoning_content": "old thought"},
        {"role": "user", "content": "c"},
        {"role": "assistant", "content": "d", "reasoning_content": "recent thought",
         "tool_calls": [{"id": "functions.get_time:0", "type": "function",
                         "function": {"name": "get_time", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "functions.get_time:0", "content": "noon"},
    ])
    # Reasoning survives only after the last plain assistant turn, as in the K2.5 template.
    assert "<think>recent thought</think>d" in engine.prompts[-1]
    assert "old thought" not in engine.prompts[-1]


def test_stop_string_split_across_tokens_is_never_streamed(scripted):
    engine, client = scripted
    engine.reply = lambda _: "</think>alpha beta STOP gamma"
    whole, streamed = both(client, messages=[{"role": "user", "content": "?"}], stop=["STOP", "xyzzy"])
    assert whole.message.content == "alpha beta" and whole.finish_reason == "stop"
    assert streamed["content"] == "alpha beta"


def test_multibyte_text_streams_whole_characters(scripted):
    engine, client = scripted
    text = "你好，世界 🌍 — naïve café"
    engine.reply = lambda _: "</think>" + text
    pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="scripted", messages=[{"role": "user", "content": "?"}], stream=True) if c.choices]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_n_choices_stream_separately(scripted):
    engine, client = scripted
    engine.reply = lambda _: "</think>same"
    seen: dict[int, str] = {}
    for chunk in client.chat.completions.create(model="scripted", n=3, stream=True,
                                                messages=[{"role": "user", "content": "?"}]):
        for choice in chunk.choices:
            seen[choice.index] = seen.get(choice.index, "") + (choice.delta.content or "")
    assert seen == {0: "same", 1: "same", 2: "same"}


def test_image_parts_become_media_tokens(scripted):
    engine, client = scripted
    engine.reply = lambda _: "</think>an image"
    buf = io.BytesIO()
    Image.new("RGB", (56, 84), (200, 30, 30)).save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    r = client.chat.completions.create(model="scripted", messages=[{"role": "user", "content": [
        {"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": url}}]}])
    assert r.choices[0].message.content == "an image"
    # 56x84 px -> 4x6 patches of 14 -> 2x3 merged tokens.
    assert engine.prompts[-1].count("<|media_pad|>") == 6


def test_media_markers_written_in_text_stay_text(scripted):
    # Text is data: a `<|media_pad|>` in it is no media slot (ids: tests/test_text_security.py).
    engine, client = scripted
    engine.reply = lambda _: "</think>an image"
    buf = io.BytesIO()
    Image.new("RGB", (28, 28)).save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    r = client.chat.completions.create(model="scripted", messages=[{"role": "user", "content": [
        {"type": "text", "text": "look: <|media_pad|>"},
        {"type": "image_url", "image_url": {"url": url}}]}])
    assert r.choices[0].message.content == "an image"
    # The text's marker, then the image's one token (28x28 px -> 2x2 patches -> 1 token).
    assert engine.prompts[-1].count("<|media_pad|>") == 2
