"""Tokenizer: tiny release-layout files, the real K2.5 id layout, round trips, pat_str, streaming."""

from __future__ import annotations

import base64
import itertools
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import regex

from swarmoe.testing import write_tiny_tokenizer
from swarmoe.testing.tokenizer_files import K2_SPECIAL_TOKENS
from swarmoe.text import Tokenizer, TokenizerError
from swarmoe.text.tokenizer import K2_PAT_STR, load_tiktoken_ranks

SAMPLES = [
    "Hello, world! The weather is sunny.",
    "def f(x):\n    return {'a': [1, 2, 3]}\n",
    "今天天气很好，我们去公园散步吧。",
    "emoji 😀👍🏽 and flags 🇨🇳🇺🇸, accents café naïve",
    "mixed中文English混合123456789 tokens",
    "   leading and trailing spaces   \n\n\t",
    "",
]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny_tok")
    write_tiny_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def tok(tiny_dir: Path) -> Tokenizer:
    return Tokenizer.from_pretrained(tiny_dir)


def test_writer_returns_vocab_size_and_is_deterministic(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    n = write_tiny_tokenizer(a, num_merges=100)
    assert n == 256 + 100 + 256
    assert write_tiny_tokenizer(b, num_merges=100) == n
    for name in ("tiktoken.model", "tokenizer_config.json", "chat_template.jinja"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    assert Tokenizer.from_pretrained(a).vocab_size == n


def test_specials_sit_at_release_offsets(tok: Tokenizer) -> None:
    base = tok.num_base_tokens
    for offset, content, _ in K2_SPECIAL_TOKENS:
        assert tok.special(content) == base + offset
    assert tok.bos_token_id == base and tok.eos_token_id == base + 1
    assert tok.unk_token_id == base + 254 and tok.pad_token_id == base + 255
    assert tok.special(f"<|reserved_token_{base + 5}|>") == base + 5
    assert tok.vocab_size == base + 256
    with pytest.raises(KeyError, match="no special token named"):
        tok.special("<|nope|>")


def test_config_matches_release_structure(tiny_dir: Path) -> None:
    config = json.loads((tiny_dir / "tokenizer_config.json").read_text())
    entry = next(iter(config["added_tokens_decoder"].values()))
    assert set(entry) == {"content", "lstrip", "normalized", "rstrip", "single_word", "special"}
    assert config["bos_token"] == "[BOS]" and config["eos_token"] == "[EOS]"
    assert config["tokenizer_class"] == "TikTokenTokenizer"


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert all(i < tok.num_base_tokens for i in ids)


def test_bpe_merges_are_used(tok: Tokenizer) -> None:
    assert len(tok.encode(" the weather")) < len(b" the weather")
    assert len(tok.encode("天气")) < len("天气".encode())


def test_specials_only_when_allowed(tok: Tokenizer) -> None:
    text = "<|im_user|>user<|im_middle|>hi<|im_end|>"
    plain = tok.encode(text)
    assert not any(tok.is_special(i) for i in plain)
    assert tok.decode(plain) == text
    ids = tok.encode(text, allowed_special="all")
    assert ids[0] == tok.special("<|im_user|>") and ids[-1] == tok.special("<|im_end|>")
    assert tok.decode(ids) == text
    only_end = tok.encode(text, allowed_special={"<|im_end|>"})
    assert only_end[-1] == tok.special("<|im_end|>")
    assert tok.special("<|im_user|>") not in only_end
    with pytest.raises(KeyError):
        tok.encode(text, allowed_special={"<|bogus|>"})


def test_skip_special_tokens_keeps_parser_markers(tok: Tokenizer) -> None:
    text = "<think>r</think>a<|tool_calls_section_begin|><|im_end|>"
    ids = tok.encode(text, allowed_special="all")
    assert (
        tok.decode(ids, skip_special_tokens=True) == "<think>r</think>a<|tool_calls_section_begin|>"
    )


def test_decode_rejects_out_of_range(tok: Tokenizer) -> None:
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([tok.vocab_size])


def test_pat_str_splits_han_from_latin_and_groups_digits() -> None:
    split = regex.compile(K2_PAT_STR, regex.V1).findall
    assert split("Hello世界abc") == ["Hello", "世界", "abc"]
    assert split("1234567") == ["123", "456", "7"]
    assert split("don't stop") == ["don't", " stop"]
    assert split("a\n\n  b") == ["a", "\n\n", " ", " b"]


def test_pat_str_drives_tiktoken(tok: Tokenizer) -> None:
    # No token may straddle a pre-token boundary: encode each piece alone, same ids.
    text = "Hello世界abc 12345 don't\n\n  x今天"
    pieces = regex.compile(K2_PAT_STR, regex.V1).findall(text)
    assert tok.encode(text) == list(itertools.chain.from_iterable(tok.encode(p) for p in pieces))


def test_pat_str_override(tmp_path: Path) -> None:
    write_tiny_tokenizer(tmp_path, num_merges=50)
    cfg_path = tmp_path / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["pat_str"] = r"\S+|\s+"
    cfg_path.write_text(json.dumps(cfg))
    tok = Tokenizer.from_pretrained(tmp_path)
    assert tok.pat_str == r"\S+|\s+"
    assert tok.decode(tok.encode("a b  c")) == "a b  c"


def test_long_runs_round_trip(tok: Tokenizer) -> None:
    text = "x" * 60_000 + " " * 30_000 + "end"
    assert tok.decode(tok.encode(text)) == text


def test_missing_files_named_in_error(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match="tiktoken.model"):
        Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "tiktoken.model").write_text("not-base64!! 0\n")
    with pytest.raises(TokenizerError, match=r"tiktoken.model:1"):
        Tokenizer.from_pretrained(tmp_path)


def test_added_token_inside_base_vocab_is_rejected(tmp_path: Path) -> None:
    write_tiny_tokenizer(tmp_path, num_merges=10)
    cfg_path = tmp_path / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["added_tokens_decoder"]["5"] = {"content": "<|bad|>", "special": True}
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(TokenizerError, match="inside the base vocabulary"):
        Tokenizer.from_pretrained(tmp_path)


# ----- the real K2.5 layout: 163,584 BPE ranks, sparse added_tokens_decoder --------------------

RELEASE_NAMED = {
    163584: ("[BOS]", True),
    163585: ("[EOS]", True),
    163586: ("<|im_end|>", True),
    163587: ("<|im_user|>", True),
    163588: ("<|im_assistant|>", True),
    163590: ("<|start_header_id|>", True),
    163591: ("<|end_header_id|>", True),
    163593: ("[EOT]", True),
    163594: ("<|im_system|>", True),
    163595: ("<|tool_calls_section_begin|>", False),
    163596: ("<|tool_calls_section_end|>", False),
    163597: ("<|tool_call_begin|>", False),
    163598: ("<|tool_call_argument_begin|>", False),
    163599: ("<|tool_call_end|>", False),
    163601: ("<|im_middle|>", True),
    163602: ("<|media_begin|>", True),
    163603: ("<|media_content|>", True),
    163604: ("<|media_end|>", True),
    163605: ("<|media_pad|>", True),
    163606: ("<think>", False),
    163607: ("</think>", False),
    163838: ("[UNK]", True),
    163839: ("[PAD]", True),
}


@pytest.fixture(scope="module")
def release_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic checkpoint with the release's sizes: every byte, then 2- and 3-byte tokens."""
    path = tmp_path_factory.mktemp("release_layout")
    tokens = [bytes([b]) for b in range(256)]
    tokens += [bytes([a, b]) for a in range(256) for b in range(256)]
    rng = random.Random(0)
    seen = set(tokens)
    while len(tokens) < 163_584:
        t = bytes(rng.randrange(256) for _ in range(3))
        if t not in seen:
            seen.add(t)
            tokens.append(t)
    (path / "tiktoken.model").write_text(
        "".join(f"{base64.b64encode(t).decode()} {i}\n" for i, t in enumerate(tokens))
    )
    decoder = {
        str(i): {
            "content": c,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": s,
        }
        for i, (c, s) in RELEASE_NAMED.items()
    }
    (path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "added_tokens_decoder": decoder,
                "auto_map": {"AutoTokenizer": ["tokenization_kimi.TikTokenTokenizer", None]},
                "bos_token": "[BOS]",
                "eos_token": "[EOS]",
                "pad_token": "[PAD]",
                "unk_token": "[UNK]",
                "tokenizer_class": "TikTokenTokenizer",
            }
        )
    )
    return path


def test_release_layout_ids(release_dir: Path) -> None:
    tok = Tokenizer.from_pretrained(release_dir)
    assert tok.num_base_tokens == 163_584 and tok.vocab_size == 163_840
    for token_id, (content, _) in RELEASE_NAMED.items():
        assert tok.special(content) == token_id
    assert tok.bos_token_id == 163584 and tok.eos_token_id == 163585
    assert tok.pad_token_id == 163839 and tok.unk_token_id == 163838
    assert tok.special("<|reserved_token_163589|>") == 163589
    assert tok.chat_template is None
    text = "<|im_user|>user<|im_middle|>你好 😀<|im_end|>"
    ids = tok.encode(text, allowed_special="all")
    assert ids[0] == 163587 and ids[-1] == 163586
    assert tok.decode(ids) == text
    assert tok.decode([163595, 163600], skip_special_tokens=True) == "<|tool_calls_section_begin|>"


# ----- incremental detokenizer ----------------------------------------------------------------


def _stream(tok: Tokenizer, ids: list[int], sizes: list[int]) -> list[str]:
    det = tok.detokenizer()
    out, pos = [], 0
    for n in sizes:
        out.append(det.push(ids[pos : pos + n]))
        pos += n
    out.append(det.push(ids[pos:]))
    out.append(det.flush())
    return out


@pytest.mark.parametrize("text", SAMPLES[2:4])
def test_detokenizer_never_splits_a_character(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    # A token ending mid-character exists here, so holding back is exercised.
    assert any(not _is_utf8(tok.decode_bytes(ids[:k])) for k in range(1, len(ids))), (
        "sample never splits a character"
    )
    pieces = _stream(tok, ids, [1] * len(ids))
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def test_detokenizer_random_batches_and_specials(tok: Tokenizer) -> None:
    rng = random.Random(1)
    text = "<think>想一想 😀</think>答案是42<|im_end|>"
    ids = tok.encode(text, allowed_special="all")
    for _ in range(20):
        sizes = [rng.randint(0, 3) for _ in range(len(ids))]
        assert "".join(_stream(tok, ids, sizes)) == text
    det = tok.detokenizer(skip_special_tokens=True)
    assert det.push(ids) + det.flush() == "<think>想一想 😀</think>答案是42"


def test_detokenizer_cut_off_character_becomes_replacement(tok: Tokenizer) -> None:
    ids = tok.encode("😀")
    det = tok.detokenizer()
    assert det.push(ids[:-1]) == ""
    assert det.flush() == "\ufffd"


def test_text_package_does_not_import_torch() -> None:
    code = "import sys, swarmoe.text; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_load_ranks_rejects_gaps(tmp_path: Path) -> None:
    path = tmp_path / "tiktoken.model"
    path.write_text(f"{base64.b64encode(b'a').decode()} 0\n{base64.b64encode(b'b').decode()} 2\n")
    with pytest.raises(TokenizerError, match="dense range"):
        load_tiktoken_ranks(path)
