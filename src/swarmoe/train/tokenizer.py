"""Learn a byte-level BPE from training data, for a model trained from scratch.

The merges come from the `tokenizers` BPE trainer, fed every text a model will see in the data
(plain texts; chat contents, reasoning, tool calls and tool declarations). Pre-tokenisation is
K2's `pat_str` through `tokenizers`' Split, whose Oniguruma regex splits text exactly as
tiktoken's does (the Python `regex` module does not, on code points newer than tiktoken's
Unicode tables). The result is written in the K2.5 release layout: ranks are the 256 bytes,
then the merged tokens in learned order, so tiktoken's lowest-rank-first merging reproduces the
trained BPE.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from swarmoe.text.release_files import write_tokenizer_files
from swarmoe.text.tokenizer import K2_PAT_STR, NUM_RESERVED_SPECIAL_TOKENS

if TYPE_CHECKING:
    import tokenizers

#: The smallest model vocabulary: every byte a token, no merges, plus the special slots.
MIN_VOCAB_SIZE = 256 + NUM_RESERVED_SPECIAL_TOKENS


class TrainingDataError(ValueError):
    """A line of the training data is not a text or chat record this trainer understands."""


def _byte_of_char() -> dict[str, int]:
    """Inverse of the byte-level alphabet: printable Latin-1 bytes stand for themselves, the
    other 68 bytes (controls, space, a few Latin-1 blanks) for code points 256 and up, in order.
    `tokenizers`' ByteLevel uses this alphabet, so its token strings map back to raw bytes."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    shifted = [b for b in range(256) if b not in printable]
    mapping = {chr(b): b for b in printable}
    mapping.update({chr(256 + i): b for i, b in enumerate(shifted)})
    return mapping


_BYTE_OF_CHAR = _byte_of_char()


def _token_bytes(token: str) -> bytes:
    """Raw bytes of a byte-level token string as `tokenizers` spells it."""
    try:
        return bytes(_BYTE_OF_CHAR[c] for c in token)
    except KeyError as exc:
        raise ValueError(f"{token!r} is not a byte-level token ({exc.args[0]!r})") from None


@dataclass(frozen=True)
class LearnedBPE:
    """A trained BPE: `vocab` holds the base tokens by tiktoken rank; `model` is the trained
    `tokenizers` tokenizer, kept as the reference the written files must reproduce."""

    vocab: tuple[bytes, ...]
    model: tokenizers.Tokenizer
    _rank_of_id: tuple[int, ...]

    @property
    def num_merges(self) -> int:
        return len(self.vocab) - 256

    @property
    def vocab_size(self) -> int:
        """The model's vocabulary: base tokens plus the special slots after them."""
        return len(self.vocab) + NUM_RESERVED_SPECIAL_TOKENS

    def encode(self, text: str) -> list[int]:
        """`model`'s ids for `text`, as tiktoken ranks (ids of the written tokenizer)."""
        return [self._rank_of_id[i] for i in self.model.encode(text).ids]


def check_vocab_size(vocab_size: int) -> int:
    """Validate a model vocabulary size; return how many base BPE tokens it leaves."""
    base = vocab_size - NUM_RESERVED_SPECIAL_TOKENS
    if base < 256:
        raise ValueError(
            f"vocab size {vocab_size} leaves {base} BPE tokens after the "
            f"{NUM_RESERVED_SPECIAL_TOKENS} special slots, fewer than the 256 single bytes; "
            f"use at least {MIN_VOCAB_SIZE}"
        )
    return base


def learn_bpe(texts: Iterable[str], vocab_size: int, *, min_frequency: int = 2) -> LearnedBPE:
    """Train a byte-level BPE on `texts` for a model vocabulary of `vocab_size`.

    Merging stops early when no pair occurs `min_frequency` times, so the result may be
    smaller than asked; `LearnedBPE.vocab_size` is what the model config must say.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    base = check_vocab_size(vocab_size)
    if min_frequency < 1:
        raise ValueError(f"min_frequency must be >= 1, got {min_frequency}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(K2_PAT_STR), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=base,
        min_frequency=min_frequency,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    by_id = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    if [i for _, i in by_id] != list(range(len(by_id))) or any(len(t) != 1 for t, _ in by_id[:256]):
        raise RuntimeError("tokenizers' trainer did not put the 256-byte alphabet at ids 0..255")
    # The trainer numbers merged tokens in the order it learns them, after the alphabet.
    vocab = [bytes([b]) for b in range(256)] + [_token_bytes(t) for t, _ in by_id[256:]]
    rank_of_id = [_BYTE_OF_CHAR[t] if i < 256 else i for t, i in by_id]
    return LearnedBPE(tuple(vocab), tokenizer, tuple(rank_of_id))


def _fail(where: str, message: str) -> TrainingDataError:
    return TrainingDataError(f"{where}: {message}")


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _content_texts(content: Any, where: str) -> Iterator[str]:
    """Text of a message's content: a string, or parts (strings or `{"text": ...}`; media
    parts carry no text)."""
    if content is None or isinstance(content, str):
        yield content or ""
        return
    if not isinstance(content, list):
        raise _fail(where, f"must be a string or a list of parts, got {_type_name(content)}")
    for j, part in enumerate(content):
        if isinstance(part, str):
            yield part
        elif isinstance(part, Mapping):
            text = part.get("text")
            if text is not None and not isinstance(text, str):
                raise _fail(f"{where}[{j}].text", f"must be a string, got {_type_name(text)}")
            yield text or ""
        else:
            raise _fail(f"{where}[{j}]", f"must be a string or an object, got {_type_name(part)}")


def _tool_call_texts(calls: Any, where: str) -> Iterator[str]:
    """Function names and arguments, the arguments as the chat template writes them."""
    if not isinstance(calls, list):
        raise _fail(where, f"must be a list, got {_type_name(calls)}")
    for j, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, Mapping) else None
        if not isinstance(fn, Mapping):
            raise _fail(f"{where}[{j}]", "must be an object with a 'function' object")
        name, args = fn.get("name"), fn.get("arguments")
        if not isinstance(name, str):
            raise _fail(f"{where}[{j}].function.name", f"must be a string, got {_type_name(name)}")
        yield name
        yield args if isinstance(args, str) else json.dumps(args or {}, ensure_ascii=False)


def _message_texts(messages: Any, where: str) -> Iterator[str]:
    if not isinstance(messages, list):
        raise _fail(f"{where}: messages", f"must be a list, got {_type_name(messages)}")
    for i, msg in enumerate(messages):
        at = f"{where}: messages[{i}]"
        if not isinstance(msg, Mapping) or not isinstance(msg.get("role"), str):
            raise _fail(at, "must be an object with a string 'role'")
        yield from _content_texts(msg.get("content"), f"{at}.content")
        for key in ("reasoning_content", "reasoning"):
            value = msg.get(key)
            if value is not None and not isinstance(value, str):
                raise _fail(f"{at}.{key}", f"must be a string, got {_type_name(value)}")
        # The template renders the first of the two spellings that is set.
        yield msg.get("reasoning_content") or msg.get("reasoning") or ""
        if msg.get("tool_calls") is not None:
            yield from _tool_call_texts(msg["tool_calls"], f"{at}.tool_calls")


def _record_texts(record: Any, where: str = "record") -> Iterator[str]:
    """Every text of one data record (`{"text"}` or `{"messages", "tools"}`), empty ones
    included; `where` prefixes error messages."""
    if not isinstance(record, Mapping):
        raise _fail(where, f"expected a JSON object, got {_type_name(record)}")
    if "text" in record:
        text = record["text"]
        if not isinstance(text, str):
            raise _fail(f"{where}: text", f"must be a string, got {_type_name(text)}")
        yield text
    elif "messages" in record:
        yield from _message_texts(record["messages"], where)
        tools = record.get("tools")
        if tools is not None:
            if not isinstance(tools, list):
                raise _fail(f"{where}: tools", f"must be a list, got {_type_name(tools)}")
            # Compact and key-sorted, as the chat template declares tools it cannot type.
            yield json.dumps(tools, ensure_ascii=False, separators=(",", ":"), sort_keys=True)
    else:
        raise _fail(where, "expected a 'text' or a 'messages' field")


def training_texts(
    path: str | Path, *, on_bytes: Callable[[int], None] | None = None
) -> Iterator[str]:
    """The non-empty texts of a JSONL file, line by line; `on_bytes(n)` reports each line's
    size as it is read. Errors name `file:line`; a file without any text is an error too."""
    path = Path(path)
    if not path.is_file():
        raise TrainingDataError(f"training data not found: {path}")
    found = False
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            if on_bytes is not None:
                on_bytes(len(raw))
            if not raw.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise _fail(where, f"not valid JSON ({exc})") from None
            for text in _record_texts(record, where):
                if text:
                    found = True
                    yield text
    if not found:
        raise TrainingDataError(f"{path}: no training text")


def train_tokenizer(
    data: str | Path,
    out: str | Path,
    vocab_size: int,
    *,
    min_frequency: int = 2,
    on_bytes: Callable[[int], None] | None = None,
) -> LearnedBPE:
    """Learn a BPE from the JSONL file `data` and write its release-layout files to `out`."""
    check_vocab_size(vocab_size)
    learned = learn_bpe(
        training_texts(data, on_bytes=on_bytes), vocab_size, min_frequency=min_frequency
    )
    write_tokenizer_files(out, learned.vocab)
    return learned


__all__ = [
    "MIN_VOCAB_SIZE",
    "LearnedBPE",
    "TrainingDataError",
    "check_vocab_size",
    "learn_bpe",
    "train_tokenizer",
    "training_texts",
]
