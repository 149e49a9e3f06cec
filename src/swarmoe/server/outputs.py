"""Engine outputs into OpenAI choices, whole or as stream deltas.

The engine reports each sequence's whole text so far. A stream only sends text that can no
longer change: a trailing U+FFFD may still become a character, and the tail that could be the
start of a stop string may still be cut. That way the streamed text always equals the
non-streamed text of the same generation.
"""

from __future__ import annotations

from typing import Any

from swarmoe.engine.llm import CompletionOutput
from swarmoe.text import StreamDelta, StreamingParser, Tokenizer, parse_assistant
from swarmoe.text.tool_parser import ParsedMessage


def settled(text: str, finished: bool, holdback: int) -> str:
    """The prefix of `text` that later tokens cannot change."""
    if finished:
        return text
    end = len(text) - holdback
    while end > 0 and text[end - 1] == "\ufffd":
        end -= 1
    return text[: max(end, 0)]


def finish_reason(engine_reason: str | None, has_tool_calls: bool) -> str | None:
    """OpenAI reports a turn that ended in tool calls as `tool_calls`, not `stop`."""
    return "tool_calls" if engine_reason == "stop" and has_tool_calls else engine_reason


def token_text(tokenizer: Tokenizer, token_id: int) -> tuple[str, list[int]]:
    raw = tokenizer.token_bytes(token_id)
    return raw.decode("utf-8", errors="replace"), list(raw)


def chat_logprobs(
    tokenizer: Tokenizer, token_ids: list[int], logprobs: list[dict[int, float]], top: int
) -> list[dict[str, Any]]:
    """`logprobs.content` entries for tokens (the sampled one, then the `top` best)."""
    out = []
    for token, dist in zip(token_ids, logprobs, strict=False):
        text, raw = token_text(tokenizer, token)
        best = sorted(dist.items(), key=lambda kv: -kv[1])[:top]
        out.append({
            "token": text,
            "logprob": dist.get(token, float("-inf")),
            "bytes": raw,
            "top_logprobs": [
                dict(zip(("token", "bytes"), token_text(tokenizer, t), strict=True), logprob=lp)
                for t, lp in best
            ],
        })
    return out


def completion_logprobs(
    tokenizer: Tokenizer, token_ids: list[int], logprobs: list[dict[int, float]], top: int,
    offset: int,
) -> dict[str, Any]:
    """The legacy completions `logprobs` object; `offset` is where these tokens' text starts
    (control tokens are named in `tokens` but take no room in the completion's text)."""
    tokens, token_lps, tops, offsets = [], [], [], []
    for token, dist in zip(token_ids, logprobs, strict=False):
        tokens.append(token_text(tokenizer, token)[0])
        token_lps.append(dist.get(token, float("-inf")))
        best = sorted(dist.items(), key=lambda kv: -kv[1])[:top]
        tops.append({token_text(tokenizer, t)[0]: lp for t, lp in best})
        offsets.append(offset)
        offset += len(tokenizer.decode([token], skip_special_tokens=True))
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


def parse_chat(forced: str, text: str, thinking: bool | None, keep_calls: int | None) -> ParsedMessage:
    """Split a whole generation; `keep_calls` caps tool calls (0 with tool_choice none)."""
    parsed = parse_assistant(forced + text, thinking=thinking)
    if keep_calls is not None and len(parsed.tool_calls) > keep_calls:
        parsed = ParsedMessage(parsed.content, parsed.reasoning_content, parsed.tool_calls[:keep_calls])
    return parsed


class TextStream:
    """One choice's text as it settles: yields only text that no later token can change."""

    def __init__(self, holdback: int) -> None:
        self.holdback = holdback
        self.text = ""
        self.tokens_sent = 0

    def advance(self, out: CompletionOutput) -> str:
        done = out.finish_reason is not None
        now = settled(out.text, done, self.holdback)
        if len(now) <= len(self.text) or not now.startswith(self.text):
            return ""
        piece, self.text = now[len(self.text):], now
        return piece


class ChatStream(TextStream):
    """One chat choice's deltas: text through the K2 parser, reasoning and tool calls apart."""

    def __init__(self, holdback: int, forced: str, thinking: bool | None, keep_calls: int | None):
        super().__init__(holdback)
        self.parser = StreamingParser(thinking=thinking)
        self.keep_calls = keep_calls
        self.has_calls = False
        self.pending = self.parser.feed(forced) if forced else []

    def delta(self, out: CompletionOutput) -> dict[str, Any]:
        """The `delta` object for what `out` added (empty dict when nothing settled)."""
        deltas = self.pending + self.parser.feed(self.advance(out))
        self.pending = []
        if out.finish_reason is not None:
            deltas += self.parser.finish()
        return self._merge(deltas)

    def _merge(self, deltas: list[StreamDelta]) -> dict[str, Any]:
        content = "".join(d.content for d in deltas)
        reasoning = "".join(d.reasoning_content for d in deltas)
        calls: list[dict[str, Any]] = []
        for d in deltas:
            call = d.tool_call
            if call is None or (self.keep_calls is not None and call.index >= self.keep_calls):
                continue
            self.has_calls = True
            if calls and calls[-1]["index"] == call.index:
                calls[-1]["function"]["arguments"] += call.arguments
            else:
                calls.append(call.to_openai())
        delta: dict[str, Any] = {}
        if reasoning:
            delta["reasoning_content"] = reasoning
        if content:
            delta["content"] = content
        if calls:
            delta["tool_calls"] = calls
        return delta
