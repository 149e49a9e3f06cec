"""Split Kimi K2 assistant output into reasoning, content and tool calls, whole or streamed.

Output grammar (K2 / K2-Thinking / K2.5)::

    [<think>] reasoning </think> content
    <|tool_calls_section_begin|>
      <|tool_call_begin|> functions.NAME:IDX <|tool_call_argument_begin|> {json} <|tool_call_end|>
      ...
    <|tool_calls_section_end|>

Real generations bend it: the singular `<|tool_call_section_begin|>` spelling, a section cut off
by max_tokens, tool calls that open while still reasoning (which ends the reasoning), prompts
that already opened `<think>` so only `</think>` appears, and arguments that are not JSON.
Everything is tolerated; nothing raises.

One state machine serves both modes: `parse_assistant` feeds the whole text at once, and
`StreamingParser` feeds chunks. Text is only emitted once no later character can change its
meaning (a possible marker prefix, or trailing whitespace, is held back), so the concatenated
deltas of any split of a text equal the whole-text parse.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from enum import Enum, auto
from typing import Any

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
SECTION_BEGIN = ("<|tool_calls_section_begin|>", "<|tool_call_section_begin|>")
SECTION_END = ("<|tool_calls_section_end|>", "<|tool_call_section_end|>")
CALL_BEGIN = "<|tool_call_begin|>"
ARG_BEGIN = "<|tool_call_argument_begin|>"
CALL_END = "<|tool_call_end|>"
IM_END = "<|im_end|>"

_MARKERS = (
    THINK_OPEN,
    THINK_CLOSE,
    *SECTION_BEGIN,
    *SECTION_END,
    CALL_BEGIN,
    ARG_BEGIN,
    CALL_END,
    IM_END,
)
_MARKER_RE = re.compile("|".join(re.escape(m) for m in _MARKERS))
_MAX_MARKER = max(map(len, _MARKERS))
_CALL_INDEX_RE = re.compile(r"^(.*?):\d+$", re.DOTALL)
_LEADING_SPACE = re.compile(r"\s*")


@dataclass(frozen=True)
class ToolCall:
    """One parsed call. `arguments` is the raw JSON text the model wrote (OpenAI shape);
    `invalid_json` is set when it does not parse as a JSON object."""

    id: str
    name: str
    arguments: str
    invalid_json: bool = False
    type: str = "function"

    @property
    def valid_json(self) -> bool:
        return not self.invalid_json

    def to_openai(self) -> dict[str, Any]:
        """The `tool_calls` entry of an OpenAI chat message."""
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


@dataclass(frozen=True)
class ParsedMessage:
    """An assistant turn split into its parts; empty strings where a part is absent."""

    content: str = ""
    reasoning_content: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)


@dataclass(frozen=True)
class ToolCallDelta:
    """A piece of tool call `index`: the first carries `id` and `name`, later ones only
    `arguments` fragments (OpenAI streaming semantics)."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""

    def to_openai(self) -> dict[str, Any]:
        """The `delta.tool_calls` entry of an OpenAI streaming chunk."""
        out: dict[str, Any] = {"index": self.index}
        function: dict[str, Any] = {"arguments": self.arguments}
        if self.id is not None:
            out["id"] = self.id
            out["type"] = "function"
        if self.name is not None:
            function["name"] = self.name
        out["function"] = function
        return out


@dataclass(frozen=True)
class StreamDelta:
    """One streamed event: exactly one of content, reasoning or a tool-call piece."""

    content: str = ""
    reasoning_content: str = ""
    tool_call: ToolCallDelta | None = None


class _State(Enum):
    UNDECIDED = auto()  # auto mode: is the text before `</think>` reasoning? not known yet
    REASONING = auto()
    CONTENT = auto()
    SECTION = auto()  # between calls inside a tool-calls section
    CALL_ID = auto()
    CALL_ARGS = auto()


class _Trimmed:
    """Strips a text segment at both ends while it streams: leading whitespace is dropped,
    trailing whitespace is held until more text shows it was not trailing."""

    def __init__(self) -> None:
        self.started = False
        self.pending = ""

    def push(self, text: str) -> str:
        if not self.started:
            text = text.lstrip()
            if not text:
                return ""
            self.started = True
        body = text.rstrip()
        if not body:
            self.pending += text
            return ""
        out = self.pending + body
        self.pending = text[len(body) :]
        return out

    def end(self) -> None:
        self.started = False
        self.pending = ""


def _name_from_id(call_id: str) -> str:
    """`functions.get_weather:0` -> `get_weather`; other id shapes keep what is there."""
    match = _CALL_INDEX_RE.match(call_id)
    base = match.group(1) if match else call_id
    return base.removeprefix("functions.")


def _is_json_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False


class StreamingParser:
    """Incremental parser for one assistant turn.

    `thinking` says how the prompt ended: True when it opened `<think>` (output starts in
    reasoning), False when it closed it (output is content unless it opens `<think>` itself),
    None to decide from the text, which holds back text until a `</think>`, a tool call or the
    end shows what it was. Use the same value for `parse_assistant` to get the same result.
    """

    def __init__(self, *, thinking: bool | None = None) -> None:
        if thinking is None:
            self._state = _State.UNDECIDED
        else:
            self._state = _State.REASONING if thinking else _State.CONTENT
        self._buf = ""
        self._scanned = 0  # UNDECIDED only: buffer prefix already searched for markers
        self._finished = False
        self._reasoning = _Trimmed()
        self._content = _Trimmed()
        self._args = _Trimmed()
        self._call_id = ""
        self._call_args = ""
        self._out: list[StreamDelta] = []
        self._content_text: list[str] = []
        self._reasoning_text: list[str] = []
        self._calls: list[ToolCall] = []

    # ----- public ---------------------------------------------------------------------------

    def feed(self, text: str) -> list[StreamDelta]:
        """Add generated text; return the deltas it settled."""
        if self._finished:
            raise RuntimeError("feed() after finish()")
        self._buf += text
        self._run(final=False)
        return self._take()

    def finish(self) -> list[StreamDelta]:
        """End of generation: settle whatever was held back."""
        if not self._finished:
            self._run(final=True)
            self._close_state()
            self._finished = True
        return self._take()

    def result(self) -> ParsedMessage:
        """Everything parsed so far (complete after `finish`)."""
        return ParsedMessage(
            content="".join(self._content_text),
            reasoning_content="".join(self._reasoning_text),
            tool_calls=list(self._calls),
        )

    # ----- emission -------------------------------------------------------------------------

    def _take(self) -> list[StreamDelta]:
        out, self._out = self._out, []
        return out

    def _emit_content(self, text: str) -> None:
        text = self._content.push(text)
        if not text:
            return
        self._content_text.append(text)
        if self._out and self._out[-1].content:
            self._out[-1] = StreamDelta(content=self._out[-1].content + text)
        else:
            self._out.append(StreamDelta(content=text))

    def _emit_reasoning(self, text: str) -> None:
        text = self._reasoning.push(text)
        if not text:
            return
        self._reasoning_text.append(text)
        if self._out and self._out[-1].reasoning_content:
            self._out[-1] = StreamDelta(reasoning_content=self._out[-1].reasoning_content + text)
        else:
            self._out.append(StreamDelta(reasoning_content=text))

    def _emit_args(self, text: str) -> None:
        text = self._args.push(text)
        if not text:
            return
        self._call_args += text
        self._emit_call_piece(ToolCallDelta(len(self._calls), arguments=text))

    def _emit_call_piece(self, piece: ToolCallDelta) -> None:
        last = self._out[-1].tool_call if self._out else None
        if last is not None and last.index == piece.index and piece.id is None:
            merged = ToolCallDelta(last.index, last.id, last.name, last.arguments + piece.arguments)
            self._out[-1] = StreamDelta(tool_call=merged)
        else:
            self._out.append(StreamDelta(tool_call=piece))

    # ----- tool calls -----------------------------------------------------------------------

    def _start_call(self) -> None:
        self._call_id = ""
        self._call_args = ""
        self._args.end()
        self._state = _State.CALL_ID

    def _open_args(self) -> None:
        """The id is complete: announce the call (id and name first, as OpenAI streams)."""
        index = len(self._calls)
        raw_id = self._call_id.strip()
        name = _name_from_id(raw_id)
        self._call_id = raw_id or f"functions.{name}:{index}"
        self._emit_call_piece(ToolCallDelta(index, id=self._call_id, name=name))
        self._state = _State.CALL_ARGS

    def _close_call(self) -> None:
        """Record the call; a call without argument text gets `{}`."""
        if not self._call_args:
            self._call_args = "{}"
            self._emit_call_piece(ToolCallDelta(len(self._calls), arguments="{}"))
        self._calls.append(
            ToolCall(
                id=self._call_id,
                name=_name_from_id(self._call_id),
                arguments=self._call_args,
                invalid_json=not _is_json_object(self._call_args),
            )
        )
        self._args.end()

    def _close_state(self) -> None:
        """Generation ended: a call cut off before its arguments began is dropped."""
        if self._state is _State.CALL_ARGS:
            self._close_call()
        self._reasoning.end()
        self._content.end()

    # ----- the machine ----------------------------------------------------------------------

    def _holdback(self) -> int:
        """Index from which `buf` might be the start of a marker (len(buf) if nowhere)."""
        buf = self._buf
        i = buf.find("<", max(0, len(buf) - _MAX_MARKER + 1))
        while i != -1:
            tail = buf[i:]
            if any(m.startswith(tail) for m in _MARKERS):
                return i
            i = buf.find("<", i + 1)
        return len(buf)

    def _run(self, *, final: bool) -> None:
        while True:
            if self._state is _State.UNDECIDED:
                if not self._decide(final):
                    return
                continue
            match = _MARKER_RE.search(self._buf)
            if match is None:
                cut = len(self._buf) if final else self._holdback()
                self._text(self._buf[:cut])
                self._buf = self._buf[cut:]
                return
            self._text(self._buf[: match.start()])
            self._buf = self._buf[match.end() :]
            self._marker(match.group())

    def _decide(self, final: bool) -> bool:
        """UNDECIDED: pick reasoning or content once the text shows which; False to wait."""
        start = _LEADING_SPACE.match(self._buf).end()  # type: ignore[union-attr]
        head = self._buf[start : start + len(THINK_OPEN)]
        if head == THINK_OPEN:
            self._buf = self._buf[start + len(THINK_OPEN) :]
            self._state = _State.REASONING
            return True
        if THINK_OPEN.startswith(head) and not final:
            return False
        match = _MARKER_RE.search(self._buf, max(0, self._scanned - _MAX_MARKER))
        if match is None:
            if final:
                self._state = _State.CONTENT
                return True
            self._scanned = len(self._buf)
            return False
        if match.group() == THINK_CLOSE:
            self._emit_reasoning(self._buf[: match.start()])
            self._reasoning.end()
            self._buf = self._buf[match.end() :]
        self._state = _State.CONTENT
        return True

    def _text(self, text: str) -> None:
        if not text:
            return
        state = self._state
        if state is _State.REASONING:
            self._emit_reasoning(text)
        elif state is _State.CONTENT:
            self._emit_content(text)
        elif state is _State.CALL_ID:
            self._call_id += text
        elif state is _State.CALL_ARGS:
            self._emit_args(text)
        # SECTION: text between calls is layout, not content.

    def _marker(self, marker: str) -> None:
        state = self._state
        if state is _State.CALL_ARGS:
            self._marker_in_args(marker)
            return
        if state is _State.CALL_ID:
            if marker in (ARG_BEGIN, CALL_END, CALL_BEGIN) or marker in SECTION_END:
                self._open_args()
                if marker != ARG_BEGIN:
                    self._marker_in_args(marker)
            return
        if marker in SECTION_BEGIN or marker == CALL_BEGIN:
            self._reasoning.end()
            self._content.end()
            if marker == CALL_BEGIN:
                self._start_call()
            else:
                self._state = _State.SECTION
        elif marker == THINK_OPEN and state is _State.CONTENT:
            self._content.end()
            self._state = _State.REASONING
        elif marker == THINK_CLOSE and state is _State.REASONING:
            self._reasoning.end()
            self._state = _State.CONTENT
        elif marker in SECTION_END and state is _State.SECTION:
            self._state = _State.CONTENT
        # Anything else is a stray marker in a place it means nothing: dropped.

    def _marker_in_args(self, marker: str) -> None:
        """Inside arguments only call/section ends (or a new call) are structure; other
        marker strings are literal argument text."""
        if marker == CALL_END:
            self._close_call()
            self._state = _State.SECTION
        elif marker == CALL_BEGIN:
            self._close_call()
            self._start_call()
        elif marker in SECTION_END or marker == IM_END:
            self._close_call()
            self._state = _State.CONTENT
        else:
            self._emit_args(marker)


def parse_assistant(text: str, *, thinking: bool | None = None) -> ParsedMessage:
    """Parse a complete assistant output (see `StreamingParser` for `thinking`)."""
    parser = StreamingParser(thinking=thinking)
    parser.feed(text)
    parser.finish()
    return parser.result()
