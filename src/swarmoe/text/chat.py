"""Chat prompts in the Kimi K2.5 format.

A checkpoint's own template (`chat_template.jinja`, or `chat_template` in tokenizer_config.json)
is rendered in a sandboxed jinja2 environment, because templates are code that arrives with
downloaded weights. When a checkpoint ships none, the built-in template below produces the
published K2.5 layout. Media parts render as one `<|media_pad|>` per image or video chunk; the
model's vision tokens are spliced in by `expand_media_pads` once their counts are known.

Data and markers. Only the template's own markers become control tokens. Every string a chat
brings (message content and parts, names, reasoning, tool-call ids and arguments, tool results,
tool schemas, template variables) is data: whatever it spells (`<|im_end|>`, `<|media_pad|>`,
`</think>`), it is encoded as ordinary text. Rendering marks data before the template sees it:
inside each spelling of a special token it puts `DATA_MARK` (U+E000, private use) after the
first character, and it puts one at a data string's start or end where that edge could join
the neighbouring text into a special token (`<|im_` + `end|>` from two content parts). The
rendered text is therefore safe even if encoded naively: no data spells a special token any
more. `encode_rendered` finds the special tokens in it (all the template's), deletes the marks
from the text between them and encodes that text as ordinary text, so a normal chat gets
exactly the ids it always had, and a data string's own U+E000 / U+E001 survive (escaped with
`DATA_ESCAPE`). `encode_chat` is render + `encode_rendered` (+ media pads); every path that
turns a chat into ids (server, in-process swarm backend, training data) goes through them.

What the guard cannot tell apart: a template that assembles a marker around data (say
`<|im_{{ role }}|>`) is trusted to do so, and a spelling cut in a one-character edge (a data
string ending in `<` before template text `|im_end|>`) is left to the template, since no
template writes three quarters of a marker; two data strings never combine into one.
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from swarmoe.text.tokenizer import Tokenizer, TokenizerError, chat_template_source
from swarmoe.text.tool_declaration import tools_to_typescript

DEFAULT_SYSTEM_PROMPT = "You are Kimi, an AI assistant created by Moonshot AI."

#: What an image part becomes in the prompt: one pad, later expanded to the image's tokens.
IMAGE_PLACEHOLDER = "<|media_begin|>image<|media_content|><|media_pad|><|media_end|>"
#: What one video chunk (a few frames pooled over time) becomes, after its timestamp.
VIDEO_CHUNK_PLACEHOLDER = "<|media_begin|>video<|media_content|><|media_pad|><|media_end|>"
#: Marker the released K2.5 template emits for a whole video; replaced per chunk after rendering.
VIDEO_MARKER = "<|kimi_k25_video_placeholder|>"
MEDIA_PAD = "<|media_pad|>"

# Written for swarmoe; its output follows the published K2.5 template token for token:
# tool_declare turn first, a default system turn when the conversation has none, reasoning kept
# only for assistant turns after the last plain (no tool call) assistant turn, and the
# generation prompt opening `<think>` (or closing it at once with thinking=False).
KIMI_K25_TEMPLATE = r"""
{%- macro role_header(msg) -%}
{%- set label = msg.get('name') or msg['role'] -%}
{%- if msg['role'] == 'user' -%}<|im_user|>
{%- elif msg['role'] == 'assistant' -%}<|im_assistant|>
{%- else -%}<|im_system|>
{%- endif -%}
{{ label }}<|im_middle|>
{%- endmacro -%}

{%- macro body(msg) -%}
{%- set c = msg.get('content') -%}
{%- if c is string -%}{{ c }}
{%- elif c is iterable and c is not mapping -%}
{%- for part in c -%}
{%- set kind = part.get('type') if part is mapping else none -%}
{%- if kind in ('image', 'image_url') -%}
<|media_begin|>image<|media_content|><|media_pad|><|media_end|>{{ '\n' }}
{%- elif kind in ('video', 'video_url') -%}
<|kimi_k25_video_placeholder|>{{ '\n' }}
{%- elif part is string -%}{{ part }}
{%- else -%}{{ part.get('text') or '' }}
{%- endif -%}
{%- endfor -%}
{%- endif -%}
{%- endmacro -%}

{%- macro tool_calls(msg) -%}
<|tool_calls_section_begin|>
{%- for call in msg['tool_calls'] -%}
{%- set fn = call.get('function') or {} -%}
{%- set args = fn.get('arguments') -%}
<|tool_call_begin|>{{ call.get('id') or ('functions.' ~ fn.get('name', '') ~ ':' ~ loop.index0) }}
{{- '<|tool_call_argument_begin|>' -}}
{%- if args is string -%}{{ args }}{%- else -%}{{ (args if args is not none else {}) | tojson }}{%- endif -%}
<|tool_call_end|>
{%- endfor -%}
<|tool_calls_section_end|>
{%- endmacro -%}

{%- set state = namespace(last_plain=-1) -%}
{%- for msg in messages -%}
{%- if msg['role'] == 'assistant' and not msg.get('tool_calls') -%}
{%- set state.last_plain = loop.index0 -%}
{%- endif -%}
{%- endfor -%}

{%- if tools -%}
<|im_system|>tool_declare<|im_middle|>
{%- if tools_ts_str -%}{{ tools_ts_str }}
{%- else -%}{{ tools | tojson(separators=(',', ':')) }}
{%- endif -%}
<|im_end|>
{%- endif -%}

{%- if not messages or messages[0]['role'] != 'system' -%}
<|im_system|>system<|im_middle|>You are Kimi, an AI assistant created by Moonshot AI.<|im_end|>
{%- endif -%}

{%- for msg in messages -%}
{{ role_header(msg) }}
{%- if msg['role'] == 'assistant' -%}
{%- set keep = loop.index0 > state.last_plain and not (thinking is defined and thinking is false) -%}
<think>{{ (msg.get('reasoning_content') or msg.get('reasoning') or '') if keep else '' }}</think>
{{- body(msg) -}}
{%- if msg.get('tool_calls') -%}{{ tool_calls(msg) }}{%- endif -%}
{%- elif msg['role'] == 'tool' -%}
## Return of {{ msg.get('tool_call_id') or '' }}{{ '\n' }}{{ body(msg) }}
{%- else -%}
{{ body(msg) }}
{%- endif -%}
<|im_end|>
{%- endfor -%}

{%- if add_generation_prompt -%}
<|im_assistant|>assistant<|im_middle|>
{%- if thinking is defined and thinking is false -%}<think></think>
{%- else -%}<think>
{%- endif -%}
{%- endif -%}
"""


class ChatTemplateError(ValueError):
    """A chat template failed to compile or render, or rejected the conversation."""


# ----- data text: never a control token ----------------------------------------------------

#: Put inside data that spells a special token (and at a data edge that could complete one);
#: `encode_rendered` deletes it. A private-use code point, so no text means it.
DATA_MARK = "\ue000"
#: `DATA_ESCAPE + c` in marked text stands for a data string's own U+E000 or U+E001.
DATA_ESCAPE = "\ue001"

#: The K2/K2.5 special tokens, guarded when a chat is rendered without a tokenizer. Any
#: `<|...|>` spelling is guarded as well, whatever the tokenizer.
K2_SPECIAL_NAMES = frozenset(
    {
        "[BOS]", "[EOS]", "[EOT]", "[UNK]", "[PAD]", "<think>", "</think>",
        "<|im_end|>", "<|im_user|>", "<|im_assistant|>", "<|im_system|>", "<|im_middle|>",
        "<|start_header_id|>", "<|end_header_id|>",
        "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>",
        "<|tool_call_section_begin|>", "<|tool_call_section_end|>",
        "<|tool_call_begin|>", "<|tool_call_argument_begin|>", "<|tool_call_end|>",
        "<|media_begin|>", "<|media_content|>", "<|media_end|>", "<|media_pad|>",
    }
)  # fmt: skip

_ANY_MARKER = r"<\|[^\s<>|]{1,128}\|>"
#: A data string that ends in the opening of a `<|...|>` marker, or starts with the close of one.
_MARKER_HEAD = re.compile(r"<\|[^\s<>|]{0,128}\|?\Z")
_MARKER_TAIL = re.compile(r"\A\|?[^\s<>|]{0,128}\|>")
_UNMARK = re.compile("\ue001(.)|\ue000", re.S)


class _Guard:
    """Marks data for one set of special-token names (see the module docstring)."""

    def __init__(self, names: frozenset[str]) -> None:
        # A one-character special cannot be cut by a mark; no tokenizer has one.
        names = frozenset(n for n in names | {VIDEO_MARKER} if len(n) >= 2)
        # `<|...|>` names (nearly all) are covered by one pattern; the alternation stays short.
        others = [n for n in names if not re.fullmatch(_ANY_MARKER, n)]
        ordered = sorted(others, key=len, reverse=True)
        self._whole = re.compile(
            "|".join([*(re.escape(n) for n in ordered), _ANY_MARKER]), re.IGNORECASE
        )
        self._firsts = tuple({c for n in names for c in (n[0].lower(), n[0].upper())} | {"<"})
        self._lasts = tuple({c for n in names for c in (n[-1].lower(), n[-1].upper())} | {">"})
        folded = [n.lower() for n in names]
        # Edges of two or more characters: a one-character edge joins a marker only if the
        # neighbour is template text holding all the rest of it.
        self._heads = frozenset(n[:k] for n in folded for k in range(2, len(n)))
        self._tails = frozenset(n[k:] for n in folded for k in range(1, len(n) - 1))
        self._span = max((len(n) for n in folded), default=0)

    def _cut(self, match: re.Match[str]) -> str:
        return match[0][0] + DATA_MARK + match[0][1:]

    def mark(self, text: str) -> str:
        if not text:
            return text
        if DATA_MARK in text or DATA_ESCAPE in text:
            text = text.replace(DATA_ESCAPE, DATA_ESCAPE * 2)
            text = text.replace(DATA_MARK, DATA_ESCAPE + DATA_MARK)
        if any(c in text for c in self._firsts):
            # Overlapping spellings survive one pass (`sub` takes them left to right).
            while self._whole.search(text):
                text = self._whole.sub(self._cut, text)
        if self._joins_at_end(text):
            text += DATA_MARK
        if self._joins_at_start(text):
            text = DATA_MARK + text
        return text

    def _joins_at_end(self, text: str) -> bool:
        """Whether `text` ends in the opening (two or more characters) of a special token."""
        end = text[-131:]
        if not any(c in end for c in self._firsts):  # every opening starts with one of them
            return False
        for k in range(2, min(self._span, len(text)) + 1):
            if text[-k:].lower() in self._heads:
                return True
        return _MARKER_HEAD.search(end) is not None

    def _joins_at_start(self, text: str) -> bool:
        """Whether `text` starts with the close (two or more characters) of a special token."""
        start = text[:131]
        if not any(c in start for c in self._lasts):  # every close ends with one of them
            return False
        for k in range(2, min(self._span, len(text)) + 1):
            if text[:k].lower() in self._tails:
                return True
        return _MARKER_TAIL.match(start) is not None

    def mark_all(self, value: Any) -> Any:
        """Strings marked, through dicts (keys too), lists and tuples."""
        if isinstance(value, str):
            return self.mark(value)
        if isinstance(value, dict):
            return {self.mark_all(k): self.mark_all(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.mark_all(v) for v in value]
        if isinstance(value, tuple):
            return tuple(self.mark_all(v) for v in value)
        return value


@functools.lru_cache(maxsize=16)
def _guard(names: frozenset[str]) -> _Guard:
    return _Guard(names)


def _guard_for(tokenizer: Tokenizer | None) -> _Guard:
    return _guard(tokenizer.special_names if tokenizer is not None else K2_SPECIAL_NAMES)


def mark_data(value: Any, tokenizer: Tokenizer | None = None) -> Any:
    """`value` (a string, or dicts and lists of them) marked as data, for text that is joined
    to a rendered prompt after rendering (the template marks what it is given itself)."""
    return _guard_for(tokenizer).mark_all(value)


def unmark(text: str) -> str:
    """A rendered prompt as plain text, marks removed: for display and logs, never to encode
    (encoding it would let data spell control tokens again)."""
    if DATA_MARK not in text and DATA_ESCAPE not in text:
        return text
    return _UNMARK.sub(lambda m: m[1] or "", text)


def encode_rendered(tokenizer: Tokenizer, text: str) -> list[int]:
    """Ids of rendered chat text: the template's markers become control tokens, everything
    else (data, with its marks deleted) is ordinary text. The one place a rendered chat is
    encoded; a chat without marks gets exactly `tokenizer.encode(text, allowed_special="all")`."""
    ids: list[int] = []
    for piece, special_id in tokenizer.split_special(text):
        if special_id is None:
            ids += tokenizer.encode_ordinary(unmark(piece))
        else:
            ids.append(special_id)
    return ids


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    """`tojson` as HF renders it: plain json.dumps, no HTML escaping, Unicode kept."""
    if separators is not None:
        separators = (separators[0], separators[1])
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _raise(message: str) -> None:
    raise ChatTemplateError(message)


def _environment() -> ImmutableSandboxedEnvironment:
    """HF-compatible settings (block trimming, loop controls), in the immutable sandbox."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    return env


def _plain(value: Any) -> Any:
    """Messages may be pydantic models or mappings; templates get plain dicts and lists."""
    if hasattr(value, "model_dump"):
        value = value.model_dump(exclude_none=True)
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _sorted_deep(value: Any) -> Any:
    """Tool schemas with keys sorted at every level, as the release tokenizer passes them."""
    if isinstance(value, dict):
        return {k: _sorted_deep(value[k]) for k in sorted(value)}
    if isinstance(value, list):
        return [_sorted_deep(v) for v in value]
    return value


def video_prompt(timestamps: Sequence[str | float] | None) -> str:
    """Prompt text of one video: each chunk is its timestamp then one media placeholder.

    Numbers are seconds into the video (as `MediaBatch.chunk_timestamps` holds them); strings
    are used as written. `None` means one chunk without a timestamp.
    """
    if not timestamps:
        return VIDEO_CHUNK_PLACEHOLDER
    from swarmoe.text.media import format_timestamp  # numpy/PIL only when video is rendered

    return "".join(
        (t if isinstance(t, str) else format_timestamp(t)) + VIDEO_CHUNK_PLACEHOLDER
        for t in timestamps
    )


def _video_parts(messages: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    parts = []
    for msg in messages:
        content = msg.get("content")
        if isinstance(content, list):
            parts += [
                p
                for p in content
                if isinstance(p, Mapping) and p.get("type") in ("video", "video_url")
            ]
    return parts


class ChatTemplate:
    """A compiled chat template; `None` as source selects the built-in K2.5 template."""

    def __init__(self, source: str | None = None) -> None:
        self.source = KIMI_K25_TEMPLATE if source is None else source
        self.is_builtin = source is None
        if DATA_MARK in self.source or DATA_ESCAPE in self.source:
            raise ChatTemplateError(
                "chat template contains U+E000 or U+E001, which mark data in rendered prompts"
            )
        try:
            self._template = _environment().from_string(self.source)
        except TemplateError as exc:
            raise ChatTemplateError(f"chat template does not compile: {exc}") from None

    @classmethod
    def from_pretrained(cls, path: str | Path) -> ChatTemplate:
        """The template a checkpoint ships (`chat_template.jinja` first), else the built-in one."""
        try:
            return cls(chat_template_source(path))
        except TokenizerError as exc:
            raise ChatTemplateError(str(exc)) from None

    def render(
        self,
        messages: Sequence[Any],
        *,
        tools: Sequence[Any] | None = None,
        add_generation_prompt: bool = True,
        tokenizer: Tokenizer | None = None,
        **kwargs: Any,
    ) -> str:
        """Prompt text for `messages` (OpenAI chat format).

        Extra keyword arguments are template variables (`thinking=False`, ...), i.e.
        `chat_template_kwargs`. Tools are declared in TypeScript style (`tools_ts_str`) as the
        release tokenizer does, unless the schema is beyond it or `tools_ts_str` is passed
        (`""` forces the JSON declaration). Video parts may carry `timestamps` (one per chunk).

        Messages, tools and template variables are data: the text comes back with them marked
        (see the module docstring), to be encoded by `encode_rendered`. `tokenizer` says which
        special tokens to guard (the K2 set and any `<|...|>` spelling without one).
        """
        guard = _guard_for(tokenizer)
        plain_messages = [_plain(m) for m in messages]
        for i, msg in enumerate(plain_messages):
            if not isinstance(msg, dict) or not isinstance(msg.get("role"), str):
                raise ChatTemplateError(f"message {i} needs a string 'role'")
        plain_messages = [guard.mark_all(m) for m in plain_messages]
        # Sorted before marking, so that marks never change the order of keys.
        sorted_tools = guard.mark_all(_sorted_deep(_plain(list(tools)))) if tools else None
        context: dict[str, Any] = {
            "messages": plain_messages,
            "tools": sorted_tools,
            "add_generation_prompt": add_generation_prompt,
        }
        if sorted_tools:
            # The release tokenizer declares tools in TypeScript style when it can.
            with contextlib.suppress(ValueError, TypeError, KeyError, AttributeError):
                context["tools_ts_str"] = tools_to_typescript(sorted_tools)
        if tokenizer is not None:
            context.update(
                bos_token=tokenizer.bos_token or "",
                eos_token=tokenizer.eos_token or "",
                pad_token=tokenizer.pad_token or "",
                unk_token=tokenizer.unk_token or "",
            )
        context.update({k: guard.mark_all(v) for k, v in kwargs.items()})
        try:
            text = self._template.render(**context)
        except ChatTemplateError:
            raise
        except (TemplateError, TypeError, KeyError, AttributeError) as exc:
            raise ChatTemplateError(f"chat template failed to render: {exc}") from None
        return _expand_video_markers(text, _video_parts(plain_messages))


def _expand_video_markers(text: str, videos: Sequence[Mapping[str, Any]]) -> str:
    """Replace the template's per-video marker with one placeholder per chunk, in order."""
    pieces = text.split(VIDEO_MARKER)
    if len(pieces) == 1:
        return text
    if len(pieces) - 1 != len(videos):
        raise ChatTemplateError(
            f"template wrote {len(pieces) - 1} video markers for {len(videos)} video parts"
        )
    out = [pieces[0]]
    for video, rest in zip(videos, pieces[1:], strict=True):
        out += [video_prompt(video.get("timestamps")), rest]
    return "".join(out)


@functools.lru_cache(maxsize=16)
def _compiled(source: str | None) -> ChatTemplate:
    """Templates by source, compiled once: compiling costs ~15 ms, rendering ~0.1 ms."""
    return ChatTemplate(source)


def render_chat(
    messages: Sequence[Any],
    *,
    tools: Sequence[Any] | None = None,
    add_generation_prompt: bool = True,
    template: ChatTemplate | str | None = None,
    tokenizer: Tokenizer | None = None,
    **kwargs: Any,
) -> str:
    """Render with `template`, else the tokenizer's own template, else the built-in K2.5 one.

    The text has its data marked (see the module docstring); encode it with `encode_rendered`,
    show it with `unmark`. A chat whose data spells no special token renders unmarked."""
    if not isinstance(template, ChatTemplate):
        source = template if template is not None else getattr(tokenizer, "chat_template", None)
        template = _compiled(source)
    return template.render(
        messages,
        tools=tools,
        add_generation_prompt=add_generation_prompt,
        tokenizer=tokenizer,
        **kwargs,
    )


def expand_media_pads(ids: Sequence[int], pad_id: int, counts: Sequence[int]) -> list[int]:
    """Repeat the i-th `pad_id` `counts[i]` times: one count per image or video chunk."""
    positions = [i for i, t in enumerate(ids) if t == pad_id]
    if len(positions) != len(counts):
        raise ValueError(
            f"prompt has {len(positions)} media placeholders but {len(counts)} token counts were given"
        )
    out: list[int] = []
    start = 0
    for pos, count in zip(positions, counts, strict=True):
        if count < 1:
            raise ValueError(f"a media item needs at least one token, got {count}")
        out += ids[start:pos]
        out += [pad_id] * count
        start = pos + 1
    out += ids[start:]
    return out


def encode_chat(
    tokenizer: Tokenizer,
    messages: Sequence[Any],
    *,
    tools: Sequence[Any] | None = None,
    add_generation_prompt: bool = True,
    media_token_counts: Sequence[int] | None = None,
    template: ChatTemplate | str | None = None,
    **kwargs: Any,
) -> list[int]:
    """Prompt ids of a chat: `render_chat`, then `encode_rendered` (only the template's markers
    are control tokens), then media pads expanded when counts are given (one per image or video
    chunk part; text that spells `<|media_pad|>` is no media)."""
    text = render_chat(
        messages,
        tools=tools,
        add_generation_prompt=add_generation_prompt,
        template=template,
        tokenizer=tokenizer,
        **kwargs,
    )
    ids = encode_rendered(tokenizer, text)
    if media_token_counts is not None:
        ids = expand_media_pads(ids, tokenizer.special(MEDIA_PAD), media_token_counts)
    return ids
