"""`swarmoe train-tokenizer`: a BPE learned with `tokenizers`, written in the K2.5 layout, read
back by `swarmoe.text.Tokenizer` and plain tiktoken with the same ids as the trained model."""

from __future__ import annotations

import hashlib
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import tiktoken
from tiktoken.load import load_tiktoken_bpe
from typer.testing import CliRunner

from swarmoe.cli import app
from swarmoe.config import parse_config
from swarmoe.testing.tiny import tiny_config
from swarmoe.text import Tokenizer
from swarmoe.text.release_files import (
    K2_SPECIAL_TOKENS,
    TOKENIZER_FILES,
    write_tokenizer_files,
)
from swarmoe.text.tokenizer import K2_PAT_STR
from swarmoe.train.tokenizer import (
    LearnedBPE,
    TrainingDataError,
    learn_bpe,
    train_tokenizer,
    training_texts,
)

VOCAB_SIZE = 1280

# Words that occur in exactly one field of the chat records, to show each field is learned from.
MARKERS = {
    "content": "Quokkafy",
    "part": "Lumbrosa",
    "reasoning": "Zephyrix",
    "call_name": "vexillum",
    "arguments": "glimmerquad",
    "tool_result": "Snorkelwax",
    "tools": "Brontide",
}
MEDIA_URL_WORD = "Quagmirexx"  # only inside an image part's URL, which no model reads as text
NEVER_SEEN = "Plinthorb"

_PROSE = (
    "the model reads every token and routes it to a few experts of the mixture while the "
    "router weights their outputs so that the answer comes one token at a time until the end "
    "weather city report summary function returns list of numbers sorted quickly"
)
_WORDS = _PROSE.split()
_HAN = "今天天气很好我们去公园散步吧北京是中国的首都人工智能正在改变世界大模型可以回答问题写代码翻译文章"


def _sentence(rng: random.Random) -> str:
    words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 16))]
    return " ".join(words).capitalize() + rng.choice([".", "!", "?", ", 42.", " (2025)."])


def _chinese(rng: random.Random) -> str:
    return "".join(rng.choice(_HAN) for _ in range(rng.randint(6, 24))) + rng.choice("。，！？")


def _chat(rng: random.Random, i: int) -> dict:
    args = {MARKERS["arguments"]: rng.choice(["Beijing", "上海", "Paris"]), "days": i % 7}
    messages = [
        {"role": "system", "content": _sentence(rng)},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": f"{MARKERS['part']} {_sentence(rng)}"},
                {"type": "image_url", "image_url": {"url": f"https://x.test/{MEDIA_URL_WORD}.png"}},
            ],
        },
        {
            "role": "assistant",
            "content": None,
            "reasoning_content": f"{MARKERS['reasoning']} {_chinese(rng)}",
            "tool_calls": [
                {
                    "id": f"functions.{MARKERS['call_name']}:0",
                    "type": "function",
                    "function": {
                        "name": MARKERS["call_name"],
                        # arguments as the API sends them (a JSON string) and as an object
                        "arguments": json.dumps(args) if i % 2 else args,
                    },
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_0", "content": f"{MARKERS['tool_result']} 26.5"},
        {"role": "assistant", "content": f"{MARKERS['content']} {_sentence(rng)}"},
    ]
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": f"{MARKERS['tools']} {_sentence(rng)}",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ]
    return {"messages": messages, "tools": tools}


def _records(seed: int = 0, n: int = 360) -> list[dict]:
    rng = random.Random(seed)
    out: list[dict] = []
    for i in range(n):
        kind = i % 4
        if kind == 0:
            out.append({"text": " ".join(_sentence(rng) for _ in range(3)) + "\n"})
        elif kind == 1:
            out.append({"text": _chinese(rng) + _chinese(rng)})
        elif kind == 2:
            obj = {"id": i, "name": rng.choice(_WORDS), "score": round(rng.random(), 3), "ok": True}
            out.append({"text": json.dumps(obj, ensure_ascii=False, indent=rng.choice([None, 2]))})
        else:
            out.append(_chat(rng, i))
    return out


def _write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _digests(directory: Path) -> dict[str, str]:
    return {n: hashlib.sha256((directory / n).read_bytes()).hexdigest() for n in TOKENIZER_FILES}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    return _write_jsonl(path, [json.dumps(r, ensure_ascii=False) for r in _records()])


@pytest.fixture(scope="module")
def trained(data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[LearnedBPE, Path]:
    out = tmp_path_factory.mktemp("tok")
    return train_tokenizer(data, out, VOCAB_SIZE), out


@pytest.fixture(scope="module")
def tok(trained: tuple[LearnedBPE, Path]) -> Tokenizer:
    return Tokenizer.from_pretrained(trained[1])


def _unseen_texts(data: Path, count: int = 150) -> list[str]:
    """Text the trainer never saw: its characters reshuffled, plus scripts, controls and emoji
    absent from the data, so merges meet new neighbours and bytes stand alone."""
    rng = random.Random(1)
    seen = "".join(training_texts(data))
    extra = "\x00\x01\x7f\t\r\u00a0\u2003\u3000é\u0301 ñ Ωμ привет مرحبا 😀👍🏽 🇨🇳 ½ ٣ 𝔘"
    pool = seen[:20000] + extra * 50
    texts = ["".join(rng.choice(pool) for _ in range(rng.randint(1, 120))) for _ in range(count)]
    return texts + [extra, "".join(chr(rng.randint(0x20, 0xD7FF)) for _ in range(300))]


def test_specials_sit_after_the_base_and_a_config_of_that_size_fits(
    trained: tuple[LearnedBPE, Path], tok: Tokenizer
) -> None:
    learned, _ = trained
    base = tok.num_base_tokens
    assert learned.vocab_size == VOCAB_SIZE == len(tok)
    assert base == len(learned.vocab) == VOCAB_SIZE - 256 and learned.num_merges == base - 256
    assert tok.special("<|im_end|>") == base + 2
    assert tok.special("<|im_assistant|>") == base + 4
    for offset, content, _ in K2_SPECIAL_TOKENS:
        assert tok.special(content) == base + offset
    config = parse_config(tiny_config(vocab_size=VOCAB_SIZE)).text
    assert config.vocab_size == len(tok)
    assert (config.bos_token_id, config.eos_token_id) == (tok.bos_token_id, tok.eos_token_id)
    assert tok.chat_template and "<|im_middle|>" in tok.chat_template


def test_ids_equal_the_trained_model_and_plain_tiktoken(
    trained: tuple[LearnedBPE, Path], tok: Tokenizer, data: Path
) -> None:
    learned, out = trained
    plain = tiktoken.Encoding(
        name="plain",
        pat_str=K2_PAT_STR,
        mergeable_ranks=load_tiktoken_bpe(str(out / "tiktoken.model")),
        special_tokens={},
    )
    texts = list(training_texts(data))[:200] + _unseen_texts(data)
    total_bytes = total_tokens = 0
    for text in texts:
        ids = tok.encode(text)
        assert ids == learned.encode(text), text
        assert ids == plain.encode_ordinary(text), text
        total_bytes += len(text.encode("utf-8"))
        total_tokens += len(ids)
    # Real merges were exercised, not a byte-per-token vocabulary.
    assert total_bytes / total_tokens > 1.5


def test_pre_tokenizer_splits_like_tiktoken(trained: tuple[LearnedBPE, Path]) -> None:
    """The trained model's pre-tokenizer cuts text where tiktoken's `pat_str` does.

    tiktoken's pieces are made visible with a vocabulary holding every substring of the text:
    each piece then encodes as a single token.
    """
    learned, _ = trained
    rng = random.Random(2)
    tricky = [
        "I'M HE'S they'Re don't  \t\r\n\r\n  end  ",
        "a\u00a0b\u2003c\u3000d\x0be\x0cf\x85g\u2028h",
        "mixed中文English混合123456789 tokens",
        "café naïve e\u0301 ǅungla ٣٤٥٦ ¹²³ ½ Ⅻ 〆々〇〻 ㄅぁカー",
        "\U00020000\U0002a6d6 \u2e80\u2f00\u3005\u3007\u3021\u303b ＡＢＣａｂｃ",
    ]
    alphabet = "".join(tricky)
    samples = tricky + ["".join(rng.choice(alphabet) for _ in range(30)) for _ in range(60)]
    samples += [
        "".join(chr(rng.choice([rng.randint(0x20, 0x2FFF), rng.randint(0x3000, 0x9FFF)]))
                for _ in range(12))
        for _ in range(60)
    ]
    for text in samples:
        raw = text.encode("utf-8")
        substrings = {raw[i:j] for i in range(len(raw)) for j in range(i + 2, len(raw) + 1)}
        ranks = {bytes([b]): b for b in range(256)}
        for piece in sorted(substrings):
            ranks.setdefault(piece, len(ranks))
        oracle = tiktoken.Encoding("oracle", pat_str=K2_PAT_STR, mergeable_ranks=ranks,
                                   special_tokens={})
        expected = [oracle.decode_single_token_bytes(t) for t in oracle.encode_ordinary(text)]
        pieces = learned.model.pre_tokenizer.pre_tokenize_str(text)
        assert [text[a:b].encode("utf-8") for _, (a, b) in pieces] == expected, text


@pytest.mark.parametrize(
    "text",
    [
        "Hello, world! 今天天气很好。",
        "\x00\x01\x02\x7f control bytes and \u00a0 odd spaces\u3000",
        "emoji 😀👍🏽 flags 🇨🇳 accents e\u0301 scripts Ωμ привет مرحبا 𝔘𝔫𝔦",
        '{"nested": {"list": [1, 2.5, null, "🇺🇸"]}}\n\n\t  ',
        "",
    ],
)
def test_round_trips_text_with_bytes_never_seen(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert all(i < tok.num_base_tokens for i in ids)


def test_every_field_a_model_reads_is_learned(tok: Tokenizer) -> None:
    for field, word in MARKERS.items():
        assert len(tok.encode(word)) == 1, field
    # Controls: a word absent from the data, and one only in an image URL, stay in pieces.
    assert len(tok.encode(NEVER_SEEN)) > 1
    assert len(tok.encode(MEDIA_URL_WORD)) > 1


def test_training_texts_of_a_chat_record(tmp_path: Path) -> None:
    record = _chat(random.Random(3), 1)
    texts = list(training_texts(_write_jsonl(tmp_path / "one.jsonl", [json.dumps(record)])))
    msgs = record["messages"]
    call = msgs[2]["tool_calls"][0]["function"]
    assert texts == [
        msgs[0]["content"],
        msgs[1]["content"][0]["text"],
        msgs[2]["reasoning_content"],
        call["name"],
        call["arguments"],
        msgs[3]["content"],
        msgs[4]["content"],
        json.dumps(record["tools"], separators=(",", ":"), sort_keys=True),
    ]


def test_two_runs_write_the_same_bytes(
    trained: tuple[LearnedBPE, Path], data: Path, tmp_path: Path
) -> None:
    """Once in this process and once in a fresh one (Rust hash maps seed per process)."""
    _, first = trained
    train_tokenizer(data, tmp_path / "again", VOCAB_SIZE)
    subprocess.run(
        [sys.executable, "-m", "swarmoe", "train-tokenizer", "--data", str(data),
         "--vocab-size", str(VOCAB_SIZE), "--out", str(tmp_path / "process")],
        check=True, capture_output=True, timeout=120,
    )
    assert _digests(tmp_path / "again") == _digests(first) == _digests(tmp_path / "process")


def test_vocab_size_must_leave_room_for_the_bytes(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="fewer than the 256 single bytes; use at least 512"):
        learn_bpe(["abc"], 511)
    with pytest.raises(ValueError, match="min_frequency"):
        learn_bpe(["abc"], 1024, min_frequency=0)
    bytes_only = learn_bpe(["abcabc abc"], 512)
    assert bytes_only.vocab_size == 512 and bytes_only.num_merges == 0
    short = learn_bpe(["abab abab"], 4096)  # the data runs out of pairs long before 4096
    assert 512 < short.vocab_size < 4096
    write_tokenizer_files(tmp_path, short.vocab)
    assert len(Tokenizer.from_pretrained(tmp_path)) == short.vocab_size


def test_writer_rejects_vocabularies_tiktoken_cannot_use(tmp_path: Path) -> None:
    every_byte = [bytes([b]) for b in range(256)]
    with pytest.raises(ValueError, match="listed twice"):
        write_tokenizer_files(tmp_path, [*every_byte, b"ab", b"ab"])
    with pytest.raises(ValueError, match="lacks 1 single-byte tokens"):
        write_tokenizer_files(tmp_path, every_byte[1:])
    with pytest.raises(ValueError, match="non-empty bytes"):
        write_tokenizer_files(tmp_path, [*every_byte, b""])


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"text": "unterminated', "not valid JSON"),
        ('["a list"]', "expected a JSON object, got list"),
        ('{"prompt": "x"}', "expected a 'text' or a 'messages' field"),
        ('{"text": 5}', "text: must be a string, got int"),
        ('{"messages": {"role": "user"}}', "messages: must be a list, got dict"),
        ('{"messages": [{"content": "x"}]}', "messages[0]: must be an object with a string 'role'"),
        ('{"messages": [{"role": "user", "content": 3}]}',
         "messages[0].content: must be a string or a list of parts, got int"),
        ('{"messages": [{"role": "user", "content": [{"type": "text", "text": 1}]}]}',
         "messages[0].content[0].text: must be a string, got int"),
        ('{"messages": [{"role": "assistant", "reasoning_content": ["x"]}]}',
         "messages[0].reasoning_content: must be a string, got list"),
        ('{"messages": [{"role": "assistant", "tool_calls": [{"name": "f"}]}]}',
         "messages[0].tool_calls[0]: must be an object with a 'function' object"),
        ('{"messages": [{"role": "assistant", "tool_calls": [{"function": {"arguments": "{}"}}]}]}',
         "messages[0].tool_calls[0].function.name: must be a string, got null"),
        ('{"messages": [], "tools": {"name": "f"}}', "tools: must be a list, got dict"),
    ],
)
def test_bad_data_lines_name_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    path = _write_jsonl(tmp_path / "bad.jsonl", ['{"text": "fine"}', "", line])
    with pytest.raises(TrainingDataError) as err:
        train_tokenizer(path, tmp_path / "out", 1024)
    assert str(err.value).startswith(f"{path}:3: ") and message in str(err.value)
    assert not (tmp_path / "out").exists()


def test_data_without_text_is_an_error(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "empty.jsonl", ['{"text": ""}', '{"messages": []}'])
    with pytest.raises(TrainingDataError, match="no training text"):
        train_tokenizer(path, tmp_path / "out", 1024)
    with pytest.raises(TrainingDataError, match="training data not found"):
        train_tokenizer(tmp_path / "missing.jsonl", tmp_path / "out", 1024)


def test_cli_trains_reports_and_rejects(
    trained: tuple[LearnedBPE, Path], data: Path, tmp_path: Path
) -> None:
    runner = CliRunner()
    out = tmp_path / "cli"
    args = ["train-tokenizer", "--data", str(data), "--out", str(out)]
    result = runner.invoke(app, [*args, "--vocab-size", str(VOCAB_SIZE)])
    assert result.exit_code == 0, result.output
    learned, first = trained
    assert f"vocab size {VOCAB_SIZE}" in result.output
    assert f"{learned.num_merges} merges" in result.output
    for name in TOKENIZER_FILES:
        assert f"wrote {out / name}" in result.output
    assert _digests(out) == _digests(first)

    small = runner.invoke(app, [*args, "--vocab-size", "511"])
    assert small.exit_code == 2 and "use at least 512" in small.output

    short = runner.invoke(app, [*args, "--vocab-size", "100000"])
    assert short.exit_code == 0, short.output
    got = Tokenizer.from_pretrained(out).vocab_size
    assert got < 100000 and f"set vocab_size: {got}" in short.output

    bad = _write_jsonl(tmp_path / "bad.jsonl", ['{"text": 1}'])
    failed = runner.invoke(app, ["train-tokenizer", "--data", str(bad), "--out", str(out),
                                 "--vocab-size", "1024"])
    assert failed.exit_code == 2 and f"error: {bad}:1: text: must be a string" in failed.output
