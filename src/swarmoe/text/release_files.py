"""Tokenizer files in the layout of a Kimi K2.5 release, for a vocabulary made here.

`write_tokenizer_files` writes `tiktoken.model` (one `base64(token) rank` line per base token),
`tokenizer_config.json` (the K2 special tokens at the release's offsets after the base
vocabulary) and `chat_template.jinja` (the built-in K2.5 template), so that
`Tokenizer.from_pretrained` loads a trained or test vocabulary exactly like a downloaded one.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from pathlib import Path

from swarmoe.text.chat import KIMI_K25_TEMPLATE
from swarmoe.text.tokenizer import NUM_RESERVED_SPECIAL_TOKENS

#: K2/K2.5 named specials as (offset after the base vocabulary, content, special flag). The
#: tool-call and think markers are not "special" in K2.5, so decoding with
#: `skip_special_tokens` keeps them for the parsers. Other slots are reserved.
K2_SPECIAL_TOKENS: tuple[tuple[int, str, bool], ...] = (
    (0, "[BOS]", True),
    (1, "[EOS]", True),
    (2, "<|im_end|>", True),
    (3, "<|im_user|>", True),
    (4, "<|im_assistant|>", True),
    (6, "<|start_header_id|>", True),
    (7, "<|end_header_id|>", True),
    (9, "[EOT]", True),
    (10, "<|im_system|>", True),
    (11, "<|tool_calls_section_begin|>", False),
    (12, "<|tool_calls_section_end|>", False),
    (13, "<|tool_call_begin|>", False),
    (14, "<|tool_call_argument_begin|>", False),
    (15, "<|tool_call_end|>", False),
    (17, "<|im_middle|>", True),
    (18, "<|media_begin|>", True),
    (19, "<|media_content|>", True),
    (20, "<|media_end|>", True),
    (21, "<|media_pad|>", True),
    (22, "<think>", False),
    (23, "</think>", False),
    (254, "[UNK]", True),
    (255, "[PAD]", True),
)

_ADDITIONAL_SPECIAL_TOKENS = [
    "<|im_end|>",
    "<|im_user|>",
    "<|im_assistant|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "[EOT]",
    "<|im_system|>",
    "<|im_middle|>",
]


#: The files `write_tokenizer_files` writes, in the order it writes them.
TOKENIZER_FILES = ("tiktoken.model", "tokenizer_config.json", "chat_template.jinja")


def release_tokenizer_config(num_base_tokens: int) -> dict[str, object]:
    """`tokenizer_config.json` content shaped like the K2.5 release, specials after the base."""
    decoder = {
        str(num_base_tokens + offset): {
            "content": content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": special,
        }
        for offset, content, special in K2_SPECIAL_TOKENS
    }
    return {
        "added_tokens_decoder": decoder,
        "additional_special_tokens": list(_ADDITIONAL_SPECIAL_TOKENS),
        "bos_token": "[BOS]",
        "clean_up_tokenization_spaces": False,
        "eos_token": "[EOS]",
        "extra_special_tokens": {},
        "model_max_length": 1048576,
        "pad_token": "[PAD]",
        "tokenizer_class": "TikTokenTokenizer",
        "unk_token": "[UNK]",
    }


def _check_vocab(vocab: Sequence[bytes]) -> None:
    """A BPE vocabulary tiktoken can encode any text with: distinct tokens, every byte one."""
    seen: set[bytes] = set()
    for rank, token in enumerate(vocab):
        if not isinstance(token, bytes) or not token:
            raise ValueError(f"vocabulary entry {rank} must be non-empty bytes, got {token!r}")
        if token in seen:
            raise ValueError(f"vocabulary entry {rank} ({token!r}) is listed twice")
        seen.add(token)
    missing = [b for b in range(256) if bytes([b]) not in seen]
    if missing:
        raise ValueError(
            f"vocabulary lacks {len(missing)} single-byte tokens (first: {missing[0]:#04x}); "
            "every byte must be a token so that any text can be encoded"
        )


def write_tokenizer_files(directory: str | Path, vocab: Sequence[bytes]) -> int:
    """Write the release-layout tokenizer of `vocab` (tokens by rank); return the model's
    vocabulary size: the base tokens plus the 256 special slots, what the embedding and lm_head
    must be sized to."""
    _check_vocab(vocab)
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    lines = [
        f"{base64.b64encode(token).decode('ascii')} {rank}" for rank, token in enumerate(vocab)
    ]
    (root / "tiktoken.model").write_text("\n".join(lines) + "\n", encoding="ascii")
    config = release_tokenizer_config(len(vocab))
    (root / "tokenizer_config.json").write_text(
        json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    (root / "chat_template.jinja").write_text(KIMI_K25_TEMPLATE.strip() + "\n", encoding="utf-8")
    return len(vocab) + NUM_RESERVED_SPECIAL_TOKENS


__all__ = [
    "K2_SPECIAL_TOKENS",
    "TOKENIZER_FILES",
    "release_tokenizer_config",
    "write_tokenizer_files",
]
