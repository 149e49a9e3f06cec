"""Training data: JSONL records to token sequences with loss masks, and resumable batches.

Two kinds of lines, as TRL and LLaMA-Factory users write them:

- `{"text": ...}` is pretraining text: `[BOS] text [EOS]`, every token a target, cut into
  consecutive windows of the sequence length. The text is data, so special-token strings in it
  stay ordinary text.
- `{"messages": [...], "tools": [...]}` is an OpenAI-format chat. Only what the model generates
  is trained: each assistant turn's reasoning, content, tool-call markup and closing
  `<|im_end|>`, in exactly the context the model sees when it generates that turn.

Chats are rendered with the checkpoint's own template. Templates such as K2.5's keep the
reasoning of assistant turns only after the last plain (no tool call) assistant turn, so the
context of a turn changes once a later plain turn exists. A conversation is therefore cut into
episodes ending at each plain assistant turn (and at the last assistant turn): one sequence per
episode, its prompt the inference prompt of the episode's last turn, with the tool-call turns
inside it trained where they sit. Every turn's inference prompt must be a token prefix of that
sequence, followed by the turn as generated; when the template breaks this anywhere, the record
falls back to one sequence per assistant turn rather than training a context the model never
sees.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from swarmoe.text.chat import (
    ChatTemplate,
    ChatTemplateError,
    encode_rendered,
    mark_data,
    render_chat,
)
from swarmoe.text.tokenizer import Tokenizer
from swarmoe.text.tool_parser import THINK_CLOSE, THINK_OPEN

#: Label of a position that is not trained (padding, prompt), as torch's cross entropy ignores.
IGNORE_INDEX = -100

_ROLES = ("system", "user", "assistant", "tool")
_REASONING_KEYS = ("reasoning_content", "reasoning")


class DataError(ValueError):
    """A training file or record is malformed; the message names the file and line."""


@dataclass(frozen=True)
class Example:
    """One training sequence. `loss_mask[t]` is True where `ids[t]` is a target, predicted from
    `ids[:t]`; `loss_mask[0]` is never used, since nothing precedes the first token."""

    ids: list[int]
    loss_mask: list[bool]

    def __post_init__(self) -> None:
        if len(self.ids) != len(self.loss_mask):
            raise ValueError(
                f"an example has {len(self.ids)} ids but {len(self.loss_mask)} mask entries"
            )


# ----- reading and validating --------------------------------------------------------------


def _iter_records(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, validated record) for each non-blank line of a JSONL file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: training data file not found")
    count = 0
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not UTF-8 text: {exc}") from None
            if lineno == 1:
                line = line.removeprefix("\ufeff")
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not valid JSON: {exc}") from None
            try:
                _check_record(record)
            except DataError as exc:
                raise DataError(f"{path}:{lineno}: {exc}") from None
            count += 1
            yield lineno, record
    if count == 0:
        raise DataError(f"{path}: no records (the file is empty)")


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """All records of a JSONL file, each checked; errors name `file:line`."""
    return [record for _, record in _iter_records(path)]


def _check_record(record: Any) -> None:
    if not isinstance(record, dict):
        raise DataError(f"a record must be a JSON object, got {type(record).__name__}")
    has_text, has_messages = "text" in record, "messages" in record
    if has_text == has_messages:
        raise DataError(
            "a record needs exactly one of 'text' (pretraining) or 'messages' (chat), "
            f"got keys {sorted(record)}"
        )
    if has_text:
        if not isinstance(record["text"], str):
            raise DataError(f"'text' must be a string, got {type(record['text']).__name__}")
        return
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise DataError("'messages' must be a non-empty list of messages")
    for i, msg in enumerate(messages):
        _check_message(i, msg)
    if not any(msg["role"] == "assistant" for msg in messages):
        raise DataError("the conversation has no assistant message to train on")
    tools = record.get("tools")
    if tools is not None and not (
        isinstance(tools, list) and all(isinstance(t, dict) for t in tools)
    ):
        raise DataError("'tools' must be a list of tool objects")


def _check_content(where: str, content: Any, *, optional: bool) -> None:
    if (content is None and optional) or isinstance(content, str):
        return
    if not isinstance(content, list):
        raise DataError(f"{where}: 'content' must be a string or a list of text parts")
    for part in content:
        if not isinstance(part, dict) or part.get("type") != "text":
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise DataError(f"{where}: only text content parts can be trained, got {kind!r}")
        if not isinstance(part.get("text"), str):
            raise DataError(f"{where}: a text part needs a string 'text'")


def _check_message(i: int, msg: Any) -> None:
    where = f"message {i}"
    if not isinstance(msg, dict):
        raise DataError(f"{where} must be an object")
    role = msg.get("role")
    if role not in _ROLES:
        raise DataError(f"{where}: role must be one of {', '.join(_ROLES)}, got {role!r}")
    _check_content(where, msg.get("content"), optional=role == "assistant")
    if role == "tool" and not isinstance(msg.get("tool_call_id"), str):
        raise DataError(f"{where}: a tool message needs a string 'tool_call_id'")
    if role != "assistant":
        if msg.get("tool_calls"):
            raise DataError(f"{where}: only assistant messages carry 'tool_calls'")
        return
    for key in _REASONING_KEYS:
        if msg.get(key) is not None and not isinstance(msg[key], str):
            raise DataError(f"{where}: '{key}' must be a string")
    calls = msg.get("tool_calls")
    if calls is None:
        return
    if not isinstance(calls, list):
        raise DataError(f"{where}: 'tool_calls' must be a list")
    for k, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise DataError(f"{where}: tool call {k} needs a 'function' with a string 'name'")
        if not isinstance(fn.get("arguments"), str | dict):
            raise DataError(
                f"{where}: tool call {k} needs 'arguments' as a JSON string or an object"
            )
        if call.get("id") is not None and not isinstance(call["id"], str):
            raise DataError(f"{where}: tool call {k} has a non-string 'id'")
        if call.get("type", "function") != "function":
            raise DataError(f"{where}: tool call {k} has type {call['type']!r}, not 'function'")


# ----- encoding ----------------------------------------------------------------------------


def _encode_rendered(tokenizer: Tokenizer, text: str) -> list[int]:
    """Ids of rendered chat text, exactly as the inference path (`encode_chat`) encodes it:
    the template's markers are control tokens; message and tool text, which `render_chat`
    marks as data, is ordinary text whatever it spells, in training as at inference."""
    return encode_rendered(tokenizer, text)


def _text_examples(text: str, tokenizer: Tokenizer, seq_len: int) -> list[Example]:
    """Windows of `seq_len + 1` ids overlapping by one, so every token after BOS is a target
    exactly once (a window's first token is only context)."""
    ids = [t for t in (tokenizer.bos_token_id,) if t is not None]
    ids += tokenizer.encode(text)
    ids += [t for t in (tokenizer.eos_token_id,) if t is not None]
    windows = []
    for start in range(0, len(ids) - 1, seq_len):
        window = ids[start : start + seq_len + 1]
        windows.append(Example(window, [False] + [True] * (len(window) - 1)))
    return windows


def _reasoning(msg: Mapping[str, Any]) -> str:
    """The reasoning of an assistant message, under either key the K2.5 template reads."""
    return msg.get("reasoning_content") or msg.get("reasoning") or ""


def _turn_text(
    messages: Sequence[dict[str, Any]], i: int, render: Callable[[list[Any], bool], str]
) -> str:
    """The text the model generates for assistant turn `i` after its generation prompt.

    The turn is rendered after the earlier messages with their reasoning removed, so a
    template that hides earlier reasoning once a later turn exists (K2.5) still extends the
    prompt; the turn's own text does not depend on it. A template that drops the turn's own
    reasoning (an empty `<think></think>`) gets it put back: the model generates it.
    """
    context = [{k: v for k, v in m.items() if k not in _REASONING_KEYS} for m in messages[:i]]
    prompt = render(context, True)
    full = render([*context, messages[i]], False)
    if not full.startswith(prompt):
        raise DataError(
            f"assistant message {i}: the chat template's rendering of it does not continue its "
            "generation prompt, so the generated tokens cannot be told apart"
        )
    text = full[len(prompt) :]
    head = "" if prompt.endswith(THINK_OPEN) else THINK_OPEN
    reasoning = _reasoning(messages[i])
    if reasoning and text.startswith(head + THINK_CLOSE):
        text = head + mark_data(reasoning) + text[len(head) :]
    return text


def _episodes(messages: Sequence[dict[str, Any]], turns: Sequence[int]) -> list[list[int]]:
    """Assistant turns grouped into episodes, each ending at a plain turn or the last turn."""
    episodes: list[list[int]] = []
    current: list[int] = []
    for i in turns:
        current.append(i)
        if not messages[i].get("tool_calls") or i == turns[-1]:
            episodes.append(current)
            current = []
    return episodes


def _masked(parts: Sequence[tuple[list[int], bool]]) -> Example:
    ids = [t for part, _ in parts for t in part]
    return Example(ids, [on for part, on in parts for _ in part])


def _chat_examples(
    record: dict[str, Any], tokenizer: Tokenizer, template: ChatTemplate | None
) -> list[Example]:
    messages, tools = record["messages"], record.get("tools")

    def render(msgs: list[Any], generation_prompt: bool) -> str:
        return render_chat(
            msgs,
            tools=tools,
            add_generation_prompt=generation_prompt,
            template=template,
            tokenizer=tokenizer,
        )

    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    # Encoded separately, prompt and turn meet at the span boundary, so the mask is exact.
    prompts = {i: _encode_rendered(tokenizer, render(messages[:i], True)) for i in turns}
    answers = {i: _encode_rendered(tokenizer, _turn_text(messages, i, render)) for i in turns}
    examples = []
    for episode in _episodes(messages, turns):
        for prev, nxt in zip(episode, episode[1:], strict=False):
            head = prompts[prev] + answers[prev]
            if prompts[nxt][: len(head)] != head:
                # Not prefix-consistent: train each turn in its own inference context.
                return [_masked([(prompts[i], False), (answers[i], True)]) for i in turns]
        last = episode[-1]
        parts: list[tuple[list[int], bool]] = []
        pos = 0
        for i in episode:
            start = len(prompts[i])
            parts += [(prompts[last][pos:start], False), (answers[i], True)]
            pos = start + len(answers[i])
        examples.append(_masked(parts))
    return examples


def encode_record(
    record: dict[str, Any], tokenizer: Tokenizer, template: ChatTemplate | None, seq_len: int
) -> list[Example]:
    """The training sequences of one record, each at most `seq_len + 1` ids.

    Text longer than that is cut into windows; a chat sequence is cut at the end (its context
    must come first). `template=None` uses the tokenizer's template, else the built-in K2.5 one.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be at least 1, got {seq_len}")
    _check_record(record)
    if "text" in record:
        return _text_examples(record["text"], tokenizer, seq_len)
    try:
        examples = _chat_examples(record, tokenizer, template)
    except ChatTemplateError as exc:
        raise DataError(str(exc)) from None
    return [Example(e.ids[: seq_len + 1], e.loss_mask[: seq_len + 1]) for e in examples]


def load_examples(
    path: str | Path, tokenizer: Tokenizer, template: ChatTemplate | None, seq_len: int
) -> list[Example]:
    """Every record of a JSONL file encoded; errors name `file:line`."""
    examples = []
    for lineno, record in _iter_records(path):
        try:
            examples += encode_record(record, tokenizer, template, seq_len)
        except DataError as exc:
            raise DataError(f"{path}:{lineno}: {exc}") from None
    return examples


# ----- batching ----------------------------------------------------------------------------


@dataclass
class Batch:
    """Padded rows. `labels` are already shifted: `labels[b, t]` is the target of the
    prediction at position t, i.e. the next id, or IGNORE_INDEX where masked or padded."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor
    tokens: int
    target_tokens: int


def _collate(rows: Sequence[Example], pad_id: int) -> Batch:
    width = max(len(r.ids) - 1 for r in rows)
    inputs, labels, attention = [], [], []
    for r in rows:
        n = len(r.ids) - 1
        pad = width - n
        inputs.append(r.ids[:-1] + [pad_id] * pad)
        labels.append(
            [t if on else IGNORE_INDEX for t, on in zip(r.ids[1:], r.loss_mask[1:], strict=True)]
            + [IGNORE_INDEX] * pad
        )
        attention.append([1] * n + [0] * pad)
    label_tensor = torch.tensor(labels, dtype=torch.int64)
    return Batch(
        input_ids=torch.tensor(inputs, dtype=torch.int64),
        labels=label_tensor,
        attention_mask=torch.tensor(attention, dtype=torch.int64),
        tokens=sum(len(r.ids) - 1 for r in rows),
        target_tokens=int((label_tensor != IGNORE_INDEX).sum()),
    )


#: Batches per length-sorting window of `Batches`: wide enough to find rows of like length,
#: narrow enough that an epoch still mixes long and short batches throughout.
BUCKET_BATCHES = 32


class Batches:
    """Deterministic, resumable batching: a seeded permutation per epoch, bucketed by length;
    each row holds one example (truncated to seq_len+1 ids), padded to the longest row of its
    batch. Batches
    stream on across epochs. Examples left without a target token are dropped; `dropped`
    counts them so the caller can report it."""

    def __init__(
        self, examples: list[Example], batch_size: int, seq_len: int, seed: int, pad_id: int
    ) -> None:
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size and seq_len must be >= 1, got {batch_size}, {seq_len}")
        kept = [Example(e.ids[: seq_len + 1], e.loss_mask[: seq_len + 1]) for e in examples]
        kept = [e for e in kept if any(e.loss_mask[1:])]
        if not kept:
            raise DataError(f"none of the {len(examples)} examples has a target token")
        self.dropped = len(examples) - len(kept)
        self._examples = kept
        self._batch_size, self._seed, self._pad_id = batch_size, seed, pad_id
        self._epoch, self._position = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        """A seeded shuffle in which each batch holds rows of similar length: within windows
        of BUCKET_BATCHES batches, rows are sorted by length, cut into batches, and the
        batches shuffled again. Padding is then a few percent instead of most of a batch when
        lengths vary tenfold (a sub-agent's 800 tokens beside an orchestrator's 6,000)."""
        rng = random.Random(f"swarmoe.train.data:{self._seed}:{epoch}")
        order = list(range(len(self._examples)))
        rng.shuffle(order)
        size = self._batch_size
        window = size * BUCKET_BATCHES
        out: list[int] = []
        for start in range(0, len(order), window):
            chunk = sorted(order[start:start + window], key=lambda i: len(self._examples[i].ids))
            batches = [chunk[i:i + size] for i in range(0, len(chunk), size)]
            rng.shuffle(batches)
            out += [i for b in batches for i in b]
        return out

    def next(self) -> Batch:
        """The next batch; the last rows of an epoch are followed by the next epoch's first."""
        rows = []
        for _ in range(self._batch_size):
            rows.append(self._examples[self._order[self._position]])
            self._position += 1
            if self._position == len(self._order):
                self._epoch, self._position = self._epoch + 1, 0
                self._order = self._permutation(self._epoch)
        return _collate(rows, self._pad_id)

    def state_dict(self) -> dict[str, int]:
        """Where the stream stands, plus what must match for a resume to be exact."""
        return {
            "epoch": self._epoch,
            "position": self._position,
            "seed": self._seed,
            "examples": len(self._examples),
            "batch_size": self._batch_size,
        }

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Continue where `state_dict` was taken, on the same examples and settings."""
        mine = self.state_dict()
        for key in ("seed", "examples", "batch_size"):
            if state.get(key) != mine[key]:
                raise ValueError(
                    f"cannot resume: the saved batches had {key}={state.get(key)!r}, "
                    f"these have {mine[key]!r}"
                )
        epoch, position = state.get("epoch"), state.get("position")
        if not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"cannot resume: bad epoch {epoch!r}")
        if not isinstance(position, int) or not 0 <= position < len(self._examples):
            raise ValueError(f"cannot resume: bad position {position!r}")
        self._epoch, self._position = epoch, position
        self._order = self._permutation(epoch)
