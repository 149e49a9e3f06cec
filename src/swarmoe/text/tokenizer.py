"""Kimi K2 tokenizer: a tiktoken BPE (`tiktoken.model`) plus the specials of `tokenizer_config.json`.

The layout follows the released `tokenization_kimi.py`: the base vocabulary holds the BPE ranks
0..N-1, and the 256 ids after it are special tokens, named by `added_tokens_decoder` where the
file names them and `<|reserved_token_{id}|>` where it does not. No id is hard-coded here, so a
tiny test checkpoint (small BPE, specials at small ids) loads exactly like the release.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import json
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence, Set
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import tiktoken

#: Pre-tokenisation pattern of the K2 release (`TikTokenTokenizer.pat_str`): Han runs first, then
#: o200k-style word branches that exclude Han, numbers in groups of up to three digits,
#: punctuation runs, and whitespace. Needs `&&` class intersection (tiktoken's Rust regex; the
#: Python `regex` module only with its V1 flag).
K2_PAT_STR = "|".join(
    [
        r"[\p{Han}]+",
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*"
        r"[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+"
        r"[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"\p{N}{1,3}",
        r" ?[^\s\p{L}\p{N}]+[\r\n]*",
        r"\s*[\r\n]+",
        r"\s+(?!\S)",
        r"\s+",
    ]
)

#: Special-token slots after the base vocabulary, as in the release.
NUM_RESERVED_SPECIAL_TOKENS = 256

# tiktoken's Rust core is slow (and once panicked) on very long runs of one character class, so
# text is cut into pieces with bounded runs; the cut points fall between pre-tokens anyway.
_MAX_RUN_CHARS = 25_000

AllowedSpecial = Literal["all"] | Set[str]


class TokenizerError(ValueError):
    """A checkpoint's tokenizer files are missing or malformed."""


@dataclass(frozen=True)
class SpecialToken:
    """One special-token slot. `special=False` tokens (tool-call and think markers in K2.5)
    survive `skip_special_tokens`, so parsers downstream still see them."""

    id: int
    content: str
    special: bool = True


def reserved_token_name(token_id: int) -> str:
    """Name of an unnamed special slot, as the release spells it."""
    return f"<|reserved_token_{token_id}|>"


def load_tiktoken_ranks(path: str | Path) -> dict[bytes, int]:
    """Read a tiktoken BPE file: one `base64(token) rank` per line, ranks dense from 0."""
    path = Path(path)
    if not path.is_file():
        raise TokenizerError(f"tokenizer file not found: {path}")
    ranks: dict[bytes, int] = {}
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            line = raw.strip()
            if not line:
                continue
            parts = line.split()
            if len(parts) != 2:
                raise TokenizerError(f"{path}:{lineno}: expected 'base64 rank', got {line[:80]!r}")
            try:
                token = base64.b64decode(parts[0], validate=True)
                rank = int(parts[1])
            except (binascii.Error, ValueError) as exc:
                raise TokenizerError(f"{path}:{lineno}: bad entry {line[:80]!r}: {exc}") from None
            if token in ranks:
                raise TokenizerError(f"{path}:{lineno}: token {token!r} listed twice")
            ranks[token] = rank
    if not ranks:
        raise TokenizerError(f"{path}: no BPE ranks")
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise TokenizerError(f"{path}: ranks must be the dense range 0..{len(ranks) - 1}")
    return ranks


def _token_content(value: Any) -> str | None:
    """`bos_token` and friends are a string or an AddedToken-style dict in HF configs."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _split_long_runs(text: str) -> Iterable[str]:
    """Cut `text` so no piece holds more than `_MAX_RUN_CHARS` consecutive (non-)space chars."""
    if len(text) <= _MAX_RUN_CHARS:
        yield text
        return
    start = 0
    run = 0
    prev_space: bool | None = None
    for i, ch in enumerate(text):
        space = ch.isspace()
        if space == prev_space:
            run += 1
            if run > _MAX_RUN_CHARS:
                yield text[start:i]
                start = i
                run = 1
        else:
            run = 1
            prev_space = space
    yield text[start:]


class Tokenizer:
    """BPE tokenizer of a K2-family checkpoint (see module docstring for the id layout)."""

    def __init__(
        self,
        ranks: Mapping[bytes, int],
        specials: Iterable[SpecialToken],
        *,
        pat_str: str = K2_PAT_STR,
        bos_token: str | None = "[BOS]",
        eos_token: str | None = "[EOS]",
        pad_token: str | None = None,
        unk_token: str | None = None,
        chat_template: str | None = None,
        name: str = "kimi",
    ) -> None:
        self.num_base_tokens = len(ranks)
        self._specials: dict[int, SpecialToken] = {}
        self._special_ids: dict[str, int] = {}
        for tok in specials:
            if tok.id < self.num_base_tokens:
                raise TokenizerError(
                    f"special token {tok.content!r} has id {tok.id}, inside the base vocabulary "
                    f"(0..{self.num_base_tokens - 1})"
                )
            if tok.content in self._special_ids:
                raise TokenizerError(f"special token {tok.content!r} is defined twice")
            self._specials[tok.id] = tok
            self._special_ids[tok.content] = tok.id
        self.pat_str = pat_str
        self.chat_template = chat_template
        self._enc = tiktoken.Encoding(
            name=name,
            pat_str=pat_str,
            mergeable_ranks=dict(ranks),
            special_tokens=dict(self._special_ids),
        )
        self.vocab_size: int = self._enc.n_vocab
        self._skipped_ids = frozenset(i for i, t in self._specials.items() if t.special)
        self._special_re = re.compile(
            "|".join(re.escape(s) for s in sorted(self._special_ids, key=len, reverse=True))
        )
        self._special_names = frozenset(self._special_ids)
        self.bos_token, self.eos_token = bos_token, eos_token
        self.pad_token, self.unk_token = pad_token, unk_token
        self.bos_token_id = self._optional_id(bos_token, "bos_token")
        self.eos_token_id = self._optional_id(eos_token, "eos_token")
        self.pad_token_id = self._optional_id(pad_token, "pad_token")
        self.unk_token_id = self._optional_id(unk_token, "unk_token")

    def _optional_id(self, content: str | None, role: str) -> int | None:
        if content is None:
            return None
        if content not in self._special_ids:
            raise TokenizerError(f"{role} {content!r} is not among the special tokens")
        return self._special_ids[content]

    @classmethod
    def from_pretrained(cls, path: str | Path) -> Tokenizer:
        """Load `tiktoken.model`, `tokenizer_config.json` and the chat template from a directory
        (or a shipped checkpoint's name, such as "swarmoe-mini")."""
        from swarmoe.checkpoints import resolve_checkpoint

        root = resolve_checkpoint(path)
        if not root.is_dir():
            raise TokenizerError(f"checkpoint directory not found: {root}")
        ranks = load_tiktoken_ranks(root / "tiktoken.model")
        config_path = root / "tokenizer_config.json"
        config: dict[str, Any] = {}
        if config_path.is_file():
            try:
                config = json.loads(config_path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as exc:
                raise TokenizerError(f"{config_path}: invalid JSON: {exc}") from None
        specials = specials_from_config(config, len(ranks), source=str(config_path))
        return cls(
            ranks,
            specials,
            pat_str=config.get("pat_str") or K2_PAT_STR,
            bos_token=_token_content(config.get("bos_token", "[BOS]")),
            eos_token=_token_content(config.get("eos_token", "[EOS]")),
            pad_token=_token_content(config.get("pad_token")),
            unk_token=_token_content(config.get("unk_token")),
            chat_template=chat_template_source(root),
            name=f"kimi:{root.name}",
        )

    # ----- special tokens -------------------------------------------------------------------

    @property
    def special_tokens(self) -> dict[str, int]:
        """Every special slot by name, reserved slots included."""
        return dict(self._special_ids)

    def special(self, name: str) -> int:
        """Id of a special token by name, e.g. `tok.special("<|im_end|>")`."""
        try:
            return self._special_ids[name]
        except KeyError:
            raise KeyError(f"no special token named {name!r} in this tokenizer") from None

    def is_special(self, token_id: int) -> bool:
        """True for every id in the special range, whatever its `special` flag."""
        return token_id in self._specials

    @property
    def special_names(self) -> frozenset[str]:
        """The text of every special slot (the strings that data must never turn into)."""
        return self._special_names

    # ----- encode / decode ------------------------------------------------------------------

    def encode(self, text: str, *, allowed_special: AllowedSpecial = frozenset()) -> list[int]:
        """Token ids for `text`.

        By default special-token strings are ordinary text (user content must not forge control
        tokens). `allowed_special="all"`, or a set of names, turns those strings into their ids:
        only for text written wholly by the program itself. A rendered chat mixes template
        markers with user, tool and document text; encode it with `swarmoe.text.encode_chat` (or
        `encode_rendered`), which gives ids only to the template's own markers.
        """
        if allowed_special == "all":
            allowed: Set[str] = self._special_ids.keys()
        else:
            allowed = allowed_special
            unknown = set(allowed) - self._special_ids.keys()
            if unknown:
                raise KeyError(f"unknown special tokens in allowed_special: {sorted(unknown)}")
        if not allowed:
            return self._encode_ordinary(text)
        ids: list[int] = []
        pos = 0
        for match in self._special_re.finditer(text):
            if match.group() not in allowed:
                continue
            ids += self._encode_ordinary(text[pos : match.start()])
            ids.append(self._special_ids[match.group()])
            pos = match.end()
        ids += self._encode_ordinary(text[pos:])
        return ids

    def split_special(self, text: str) -> Iterator[tuple[str, int | None]]:
        """`text` as consecutive pieces: `(name, id)` for each special-token string, in
        leftmost-longest order, and `(ordinary_text, None)` for the (non-empty) text between."""
        if not self._special_ids:  # an empty alternation would match everywhere
            if text:
                yield text, None
            return
        pos = 0
        for match in self._special_re.finditer(text):
            if match.start() > pos:
                yield text[pos : match.start()], None
            yield match.group(), self._special_ids[match.group()]
            pos = match.end()
        if pos < len(text):
            yield text[pos:], None

    def encode_ordinary(self, text: str) -> list[int]:
        """Ids of `text` with every special-token string as ordinary text."""
        return self._encode_ordinary(text)

    def _encode_ordinary(self, text: str) -> list[int]:
        if not text:
            return []
        ids: list[int] = []
        for piece in _split_long_runs(text):
            ids += self._enc.encode_ordinary(piece)
        return ids

    def _check_ids(self, ids: Sequence[int]) -> None:
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise ValueError(
                    f"token id {i} is outside the vocabulary (0..{self.vocab_size - 1})"
                )

    def token_bytes(self, token_id: int) -> bytes:
        """Raw bytes of one token (a special token's bytes are its UTF-8 name)."""
        self._check_ids([token_id])
        return self._enc.decode_single_token_bytes(token_id)

    def decode_bytes(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> bytes:
        """Concatenated token bytes; may end inside a UTF-8 character."""
        ids = list(ids)
        self._check_ids(ids)
        if skip_special_tokens:
            ids = [i for i in ids if i not in self._skipped_ids]
        return self._enc.decode_bytes(ids)

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        """Text of `ids`; broken UTF-8 becomes U+FFFD rather than an error."""
        return self.decode_bytes(ids, skip_special_tokens=skip_special_tokens).decode(
            "utf-8", errors="replace"
        )

    def detokenizer(self, *, skip_special_tokens: bool = False) -> IncrementalDetokenizer:
        """A fresh streaming decoder for one sequence."""
        return IncrementalDetokenizer(self, skip_special_tokens=skip_special_tokens)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, base={self.num_base_tokens}, "
            f"bos={self.bos_token_id}, eos={self.eos_token_id})"
        )


class IncrementalDetokenizer:
    """Turns a growing token stream into text without ever emitting half a UTF-8 character.

    A BPE token can end in the middle of a multibyte character; those bytes wait until the
    rest arrives. Bytes that can never form a character come out as U+FFFD, so the text of
    all `push` calls plus `flush` equals `Tokenizer.decode` of all ids.
    """

    def __init__(self, tokenizer: Tokenizer, *, skip_special_tokens: bool = False) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, ids: int | Sequence[int]) -> str:
        """Add token ids; return the text that became complete."""
        batch = [ids] if isinstance(ids, int) else list(ids)
        data = self._tok.decode_bytes(batch, skip_special_tokens=self._skip)
        return self._utf8.decode(data)

    def flush(self) -> str:
        """End of stream: whatever bytes are left (U+FFFD for a cut-off character)."""
        return self._utf8.decode(b"", final=True)


def specials_from_config(
    config: Mapping[str, Any], num_base_tokens: int, *, source: str = "tokenizer_config.json"
) -> list[SpecialToken]:
    """Special slots for a base vocabulary of `num_base_tokens`, named from `added_tokens_decoder`.

    The 256 slots after the base vocabulary always exist (reserved names where unnamed), as
    the release tokenizer builds them; named ids beyond that range are kept as well.
    """
    decoder = config.get("added_tokens_decoder") or {}
    if not isinstance(decoder, Mapping):
        raise TokenizerError(f"{source}: added_tokens_decoder must be an object")
    named: dict[int, SpecialToken] = {}
    for key, entry in decoder.items():
        try:
            token_id = int(key)
        except ValueError:
            raise TokenizerError(
                f"{source}: added_tokens_decoder key {key!r} is not an id"
            ) from None
        content = _token_content(entry)
        if content is None:
            raise TokenizerError(f"{source}: added token {key} has no string 'content'")
        if token_id < num_base_tokens:
            raise TokenizerError(
                f"{source}: added token {content!r} has id {token_id}, inside the base "
                f"vocabulary of {num_base_tokens} BPE ranks"
            )
        special = bool(entry.get("special", True)) if isinstance(entry, Mapping) else True
        named[token_id] = SpecialToken(token_id, content, special)
    ids = set(range(num_base_tokens, num_base_tokens + NUM_RESERVED_SPECIAL_TOKENS)) | named.keys()
    return [named.get(i) or SpecialToken(i, reserved_token_name(i)) for i in sorted(ids)]


def chat_template_source(root: str | Path) -> str | None:
    """The template a checkpoint ships: `chat_template.jinja`, else `chat_template` in
    tokenizer_config.json (a string, or HF's list of named templates, `default` first)."""
    root = Path(root)
    jinja_file = root / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    config_file = root / "tokenizer_config.json"
    if not config_file.is_file():
        return None
    try:
        value = json.loads(config_file.read_text(encoding="utf-8")).get("chat_template")
    except json.JSONDecodeError as exc:
        raise TokenizerError(f"{config_file}: invalid JSON: {exc}") from None
    if isinstance(value, list):
        by_name = {t.get("name"): t.get("template") for t in value if isinstance(t, Mapping)}
        value = by_name.get("default") or next(iter(by_name.values()), None)
    return value if isinstance(value, str) else None
