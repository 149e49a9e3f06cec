"""Chat prompts in the Kimi K2.5 format.

A checkpoint's own template (`chat_template.jinja`, or `chat_template` in tokenizer_config.json)
is rendered in a sandboxed jinja2 environment, because templates are code that arrives with
downloaded weights. When a checkpoint ships none, the built-in template below produces the
published K2.5 layout. Media parts render as one `<|media_pad|>` per image or video chunk; the
model's vision tokens are spliced in by `expand_media_pads` once their counts are known.
"""

from __future__ import annotations

import contextlib
import functools
import json
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
        """
        plain_messages = [_plain(m) for m in messages]
        for i, msg in enumerate(plain_messages):
            if not isinstance(msg, dict) or not isinstance(msg.get("role"), str):
                raise ChatTemplateError(f"message {i} needs a string 'role'")
        sorted_tools = _sorted_deep(_plain(list(tools))) if tools else None
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
        context.update(kwargs)
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
    """Render with `template`, else the tokenizer's own template, else the built-in K2.5 one."""
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
    """Prompt ids: render, encode with specials, then expand media pads when counts are given."""
    text = render_chat(
        messages,
        tools=tools,
        add_generation_prompt=add_generation_prompt,
        template=template,
        tokenizer=tokenizer,
        **kwargs,
    )
    ids = tokenizer.encode(text, allowed_special="all")
    if media_token_counts is not None:
        ids = expand_media_pads(ids, tokenizer.special(MEDIA_PAD), media_token_counts)
    return ids
