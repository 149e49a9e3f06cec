"""Assistant-output parsing: published K2 examples, adversarial cases, every-split streaming."""

from __future__ import annotations

import json
import random
import re

import pytest

from swarmoe.text import ParsedMessage, StreamDelta, StreamingParser, parse_assistant

SB, SE = "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>"
CB, AB, CE = "<|tool_call_begin|>", "<|tool_call_argument_begin|>", "<|tool_call_end|>"


def call(name: str, idx: int, args: str) -> str:
    return f"{CB}functions.{name}:{idx}{AB}{args}{CE}"


# The example of MoonshotAI/Kimi-K2 docs/tool_call_guidance.md.
GUIDE_EXAMPLE = SB + call("get_weather", 0, '{"city":"Beijing"}') + SE


def calls_of(msg: ParsedMessage) -> list[tuple[str, str, str]]:
    return [(c.id, c.name, c.arguments) for c in msg.tool_calls]


def reference_extract(text: str) -> list[tuple[str, str, str]]:
    """The extraction the K2 tool-call guide describes, for well-formed output only."""
    section = re.findall(re.escape(SB) + r"(.*?)" + re.escape(SE), text, re.DOTALL)
    pattern = (
        r"<\|tool_call_begin\|>\s*(?P<id>[\w\.]+:\d+)\s*<\|tool_call_argument_begin\|>"
        r"\s*(?P<args>.*?)\s*<\|tool_call_end\|>"
    )
    out = []
    for call_id, args in re.findall(pattern, section[0] if section else "", re.DOTALL):
        out.append((call_id, call_id.split(".")[1].split(":")[0], args))
    return out


# ----- whole-text parsing ---------------------------------------------------------------------


def test_guide_example() -> None:
    msg = parse_assistant(GUIDE_EXAMPLE)
    assert msg.content == "" and msg.reasoning_content == ""
    assert calls_of(msg) == [("functions.get_weather:0", "get_weather", '{"city":"Beijing"}')]
    assert calls_of(msg) == reference_extract(GUIDE_EXAMPLE)
    assert json.loads(msg.tool_calls[0].arguments) == {"city": "Beijing"}
    assert msg.tool_calls[0].to_openai() == {
        "id": "functions.get_weather:0",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city":"Beijing"}'},
    }


WELL_FORMED = [
    GUIDE_EXAMPLE,
    "I'll check both cities."
    + SB
    + call("get_weather", 0, '{"city": "Beijing"}')
    + "\n"
    + call("get_weather", 1, '{"city": "Shanghai"}')
    + SE,
    SB + call("get_current_temperature", 0, '{"location": "San Francisco, CA, USA"}') + SE,
    SB + call("run_code", 0, ' {"code": "print(\\"}{\\")", "lang": "python"} ') + SE,
]


@pytest.mark.parametrize("text", WELL_FORMED)
def test_agrees_with_reference_extraction(text: str) -> None:
    assert calls_of(parse_assistant(text)) == reference_extract(text)


def test_several_calls_and_content() -> None:
    msg = parse_assistant(WELL_FORMED[1])
    assert msg.content == "I'll check both cities."
    assert [c.name for c in msg.tool_calls] == ["get_weather", "get_weather"]
    assert [c.id for c in msg.tool_calls] == ["functions.get_weather:0", "functions.get_weather:1"]
    assert not any(c.invalid_json for c in msg.tool_calls)


def test_braces_quotes_and_markers_inside_json_strings() -> None:
    args = json.dumps({"code": 'if x: print("}{")\n', "note": "</think> <think> {[", "q": "'\""})
    msg = parse_assistant(SB + call("run", 0, args) + SE)
    assert msg.tool_calls[0].arguments == args
    assert msg.tool_calls[0].valid_json


def test_reasoning_content_and_calls() -> None:
    text = "<think>Need weather.</think>Checking." + GUIDE_EXAMPLE
    msg = parse_assistant(text)
    assert msg.reasoning_content == "Need weather."
    assert msg.content == "Checking."
    assert len(msg.tool_calls) == 1


def test_prompt_opened_think_only_close_tag() -> None:
    msg = parse_assistant("\nLet me think.\n</think>\n\nThe answer is 4.")
    assert msg.reasoning_content == "Let me think."
    assert msg.content == "The answer is 4."
    assert parse_assistant("</think>Hi") == ParsedMessage(content="Hi")


def test_plain_content() -> None:
    assert parse_assistant("Hello there!") == ParsedMessage(content="Hello there!")
    assert parse_assistant("") == ParsedMessage()


def test_thinking_flag() -> None:
    assert parse_assistant("still thinking", thinking=True).reasoning_content == "still thinking"
    assert parse_assistant("just content", thinking=False).content == "just content"
    msg = parse_assistant("<think>r</think>c", thinking=False)
    assert (msg.reasoning_content, msg.content) == ("r", "c")
    msg = parse_assistant("<think>r</think>c", thinking=True)
    assert (msg.reasoning_content, msg.content) == ("r", "c")


def test_singular_section_spelling() -> None:
    text = "<|tool_call_section_begin|>" + call("f", 0, '{"a": 1}') + "<|tool_call_section_end|>"
    msg = parse_assistant(text)
    assert calls_of(msg) == [("functions.f:0", "f", '{"a": 1}')]
    assert msg.content == ""


def test_missing_section_end() -> None:
    msg = parse_assistant("Sure." + SB + call("f", 0, '{"a": 1}'))
    assert msg.content == "Sure."
    assert calls_of(msg) == [("functions.f:0", "f", '{"a": 1}')]


def test_truncated_inside_arguments() -> None:
    msg = parse_assistant(SB + call("f", 0, '{"a": 1}') + CB + "functions.g:1" + AB + '{"b": "tru')
    assert [c.name for c in msg.tool_calls] == ["f", "g"]
    assert msg.tool_calls[1].arguments == '{"b": "tru'
    assert msg.tool_calls[1].invalid_json and msg.tool_calls[0].valid_json


def test_truncated_inside_call_id_drops_the_call() -> None:
    msg = parse_assistant(SB + call("f", 0, "{}") + CB + "functions.ge")
    assert [c.name for c in msg.tool_calls] == ["f"]


def test_missing_call_end_before_next_call() -> None:
    text = SB + CB + "functions.a:0" + AB + '{"x": 1}' + CB + "functions.b:1" + AB + "{}" + CE + SE
    assert calls_of(parse_assistant(text)) == [
        ("functions.a:0", "a", '{"x": 1}'),
        ("functions.b:1", "b", "{}"),
    ]


def test_tool_call_inside_reasoning_ends_reasoning() -> None:
    text = "<think>I need the weather first" + GUIDE_EXAMPLE + "After."
    msg = parse_assistant(text)
    assert msg.reasoning_content == "I need the weather first"
    assert msg.content == "After."
    assert len(msg.tool_calls) == 1
    # With the prompt having opened <think>, no tag appears at all.
    msg = parse_assistant("I need the weather" + GUIDE_EXAMPLE, thinking=True)
    assert msg.reasoning_content == "I need the weather" and msg.content == ""
    # Bare call without a section marker also ends reasoning.
    msg = parse_assistant("<think>hmm" + call("f", 0, "{}"))
    assert msg.reasoning_content == "hmm" and [c.name for c in msg.tool_calls] == ["f"]


@pytest.mark.parametrize("args", ["{bad json}", "[1, 2]", '{"a": 1', "not json at all", "null"])
def test_invalid_json_is_returned_and_flagged(args: str) -> None:
    msg = parse_assistant(SB + call("f", 0, args) + SE)
    assert msg.tool_calls[0].arguments == args
    assert msg.tool_calls[0].invalid_json and not msg.tool_calls[0].valid_json


def test_empty_arguments_become_empty_object() -> None:
    msg = parse_assistant(
        SB + CB + "functions.ping:0" + AB + CE + CB + "functions.pong:1" + CE + SE
    )
    assert calls_of(msg) == [("functions.ping:0", "ping", "{}"), ("functions.pong:1", "pong", "{}")]
    assert all(c.valid_json for c in msg.tool_calls)


def test_whitespace_around_ids_and_arguments() -> None:
    text = f'{SB}\n{CB} functions.f:3 \n{AB}\n  {{"a": 1}}  \n{CE}\n{SE}'
    assert calls_of(parse_assistant(text)) == [("functions.f:3", "f", '{"a": 1}')]


def test_odd_ids() -> None:
    text = (
        SB + CB + "get_time:0" + AB + "{}" + CE + CB + "functions.ns.tool:12" + AB + "{}" + CE + SE
    )
    assert [(c.id, c.name) for c in parse_assistant(text).tool_calls] == [
        ("get_time:0", "get_time"),
        ("functions.ns.tool:12", "ns.tool"),
    ]


def test_im_end_and_stray_markers_are_dropped() -> None:
    msg = parse_assistant("Answer.<|im_end|>")
    assert msg.content == "Answer."
    msg = parse_assistant(f"a{CE}b{SE}c{AB}d")
    assert msg.content == "abcd" and msg.tool_calls == []


def test_near_markers_are_text() -> None:
    text = "<thinking> <|tool_callz|> </think2> <|im_end"
    assert parse_assistant(text, thinking=False).content == text


def test_never_raises_on_garbage() -> None:
    rng = random.Random(7)
    alphabet = [SB, SE, CB, AB, CE, "<think>", "</think>", "<|", "{", "}", '"', "x", " ", "\n", ":"]
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        for thinking in (None, True, False):
            parse_assistant(text, thinking=thinking)


# ----- streaming ------------------------------------------------------------------------------


def collect(deltas: list[StreamDelta]) -> tuple[str, str, list[tuple[str, str, str]]]:
    content = "".join(d.content for d in deltas)
    reasoning = "".join(d.reasoning_content for d in deltas)
    calls: dict[int, list[str]] = {}
    for d in deltas:
        tc = d.tool_call
        if tc is None:
            continue
        if tc.index not in calls:
            assert tc.id is not None and tc.name is not None, "id and name must come first"
            assert tc.index == len(calls), "indices must be dense and in order"
            calls[tc.index] = [tc.id, tc.name, ""]
        else:
            assert tc.id is None and tc.name is None
        calls[tc.index][2] += tc.arguments
    return content, reasoning, [tuple(c) for c in calls.values()]  # type: ignore[misc]


def stream(chunks: list[str], thinking: bool | None) -> tuple[list[StreamDelta], StreamingParser]:
    parser = StreamingParser(thinking=thinking)
    deltas: list[StreamDelta] = []
    for chunk in chunks:
        deltas += parser.feed(chunk)
    deltas += parser.finish()
    return deltas, parser


def expected(text: str, thinking: bool | None) -> tuple[str, str, list[tuple[str, str, str]]]:
    msg = parse_assistant(text, thinking=thinking)
    return msg.content, msg.reasoning_content, calls_of(msg)


ADVERSARIAL = [
    *WELL_FORMED,
    "<think>Need weather.</think>Checking." + GUIDE_EXAMPLE,
    "\nreasoning\n</think>\n\nanswer with 中文 and emoji 😀  ",
    "I need the weather" + GUIDE_EXAMPLE + " trailing ",
    "<think>inside reasoning" + "<|tool_call_section_begin|>" + call("f", 0, '{"a": "}"}'),
    SB + call("f", 0, '{"a": 1}') + CB + "functions.g:1" + AB + '{"b": "tru',
    SB + call("run", 0, json.dumps({"s": "</think><think><|im_end|> {[\"'"})) + SE + "done",
    "<thinking> <|tool_callz|> </think2> <|im_end plain < text <",
    "a<|im_end|>",
    SB + CB + " functions.ping:0 " + AB + "  " + CE + SE,
    "   ",
    "<think></think>",
    "<|tool_calls_section_begin|>",
]


@pytest.mark.parametrize("thinking", [None, True, False])
@pytest.mark.parametrize("text", ADVERSARIAL)
def test_stream_equals_whole_parse_at_every_split(text: str, thinking: bool | None) -> None:
    want = expected(text, thinking)
    deltas, parser = stream(list(text), thinking)
    assert collect(deltas) == want
    assert parser.result() == parse_assistant(text, thinking=thinking)
    for k in range(len(text) + 1):
        assert collect(stream([text[:k], text[k:]], thinking)[0]) == want, k


@pytest.mark.parametrize("seed", range(40))
def test_stream_equals_whole_parse_random_splits(seed: int) -> None:
    rng = random.Random(seed)
    pieces = [
        SB, SE, CB, AB, CE, "<think>", "</think>", "<|tool_call_section_begin|>", "<|im_end|>",
        "functions.f:0", "functions.get_weather:1", '{"a": "}{"}', "{", "}", '"', " ", "\n",
        "hello", "世界", "😀", "<", "<|", "<|tool", "</", "<th",
    ]  # fmt: skip
    text = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 25)))
    for thinking in (None, True, False):
        want = expected(text, thinking)
        for _ in range(5):
            cuts = sorted(rng.sample(range(len(text) + 1), k=min(len(text) + 1, rng.randint(1, 6))))
            chunks = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
            assert collect(stream(chunks, thinking)[0]) == want, (text, chunks)


def test_stream_emits_early_when_mode_is_known() -> None:
    parser = StreamingParser(thinking=True)
    assert parser.feed("Let me think") == [StreamDelta(reasoning_content="Let me think")]
    assert parser.feed(" more</thi") == [StreamDelta(reasoning_content=" more")]
    assert parser.feed("nk>Answer") == [StreamDelta(content="Answer")]
    deltas = parser.feed(SB + CB + "functions.f:0" + AB + '{"a"')
    assert deltas[0].tool_call is not None
    assert (deltas[0].tool_call.id, deltas[0].tool_call.name) == ("functions.f:0", "f")
    assert deltas[0].tool_call.arguments == '{"a"'
    assert parser.feed(": 1}" + CE)[0].tool_call.arguments == ": 1}"  # type: ignore[union-attr]
    assert parser.finish() == []
    assert parser.result().tool_calls[0].arguments == '{"a": 1}'


def test_tool_call_delta_openai_shape() -> None:
    parser = StreamingParser(thinking=False)
    first = parser.feed(SB + CB + "functions.f:0" + AB)[0].tool_call
    assert first is not None
    assert first.to_openai() == {
        "index": 0,
        "id": "functions.f:0",
        "type": "function",
        "function": {"name": "f", "arguments": ""},
    }
    frag = parser.feed('{"x": 2}' + CE)[0].tool_call
    assert frag is not None
    assert frag.to_openai() == {"index": 0, "function": {"arguments": '{"x": 2}'}}


def test_feed_after_finish_is_an_error() -> None:
    parser = StreamingParser()
    parser.finish()
    with pytest.raises(RuntimeError):
        parser.feed("x")
