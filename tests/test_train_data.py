"""Training data: text windows, chat masks in the inference context, validation, batching."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from swarmoe.testing.tokenizer_files import write_tiny_tokenizer
from swarmoe.text import ChatTemplate, Tokenizer, encode_chat, parse_assistant
from swarmoe.train.data import (
    IGNORE_INDEX,
    Batches,
    DataError,
    Example,
    encode_record,
    load_examples,
    read_records,
)

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather of a city.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]


def _call(call_id: str, city: str) -> dict[str, Any]:
    args = json.dumps({"city": city})
    return {
        "id": call_id,
        "type": "function",
        "function": {"name": "get_weather", "arguments": args},
    }


#: Two episodes: a tool trajectory ending in a plain answer, then a second plain answer.
TRAJECTORY: list[dict[str, Any]] = [
    {"role": "system", "content": "You check the weather for the user."},
    {"role": "user", "content": "What is the weather in Beijing and in Paris today?"},
    {
        "role": "assistant",
        "content": "",
        "reasoning_content": "I should look up Beijing first.",
        "tool_calls": [_call("functions.get_weather:0", "Beijing")],
    },
    {"role": "tool", "tool_call_id": "functions.get_weather:0", "content": "sunny, 25 C"},
    {
        "role": "assistant",
        "content": "Beijing is sunny.",
        "reasoning_content": "Now the weather in Paris.",
        "tool_calls": [_call("functions.get_weather:1", "Paris")],
    },
    {"role": "tool", "tool_call_id": "functions.get_weather:1", "content": "rain, 12 C"},
    {
        "role": "assistant",
        "content": "Beijing is sunny and warm; Paris has rain.",
        "reasoning_content": "Both results are in, so I can answer.",
    },
    {"role": "user", "content": "Thanks! Should I take an umbrella to Paris?"},
    {
        "role": "assistant",
        "content": "Yes, take an umbrella.",
        "reasoning_content": "It rains in Paris.",
    },
]

#: Not prefix-consistent: reasoning is shown only for the last message (R1-style history).
LAST_ONLY_REASONING = (
    "{%- for m in messages -%}"
    "{%- if m.role == 'user' -%}<|im_user|>{%- elif m.role == 'assistant' -%}<|im_assistant|>"
    "{%- else -%}<|im_system|>{%- endif -%}{{ m.role }}<|im_middle|>"
    "{%- if m.role == 'assistant' -%}"
    "<think>{{ m.reasoning_content if loop.last else '' }}</think>{{ m.content or '' }}"
    "{%- for c in m.tool_calls or [] -%}<|tool_call_begin|>{{ c.function.name }}"
    "<|tool_call_argument_begin|>{{ c.function.arguments }}<|tool_call_end|>{%- endfor -%}"
    "{%- else -%}{{ m.content }}{%- endif -%}<|im_end|>"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|im_assistant|>assistant<|im_middle|><think>{%- endif -%}"
)


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    root = tmp_path_factory.mktemp("tok")
    write_tiny_tokenizer(root)
    return Tokenizer.from_pretrained(root)


def _runs(mask: list[bool]) -> list[tuple[int, int]]:
    """Maximal [start, end) ranges of True."""
    runs, start = [], None
    for t, on in enumerate([*mask, False]):
        if on and start is None:
            start = t
        elif not on and start is not None:
            runs.append((start, t))
            start = None
    return runs


def _assert_turn(tok: Tokenizer, ids: list[int], msg: dict[str, Any]) -> None:
    """Masked ids are the turn as generated: the output parser recovers the message from them."""
    text = tok.decode(ids)
    assert text.endswith("<|im_end|>")
    parsed = parse_assistant(text.removesuffix("<|im_end|>"), thinking=True)
    assert parsed.reasoning_content == msg["reasoning_content"]
    assert parsed.content == msg["content"]
    want = [(c["function"]["name"], c["function"]["arguments"]) for c in msg.get("tool_calls", [])]
    assert [(c.name, json.loads(c.arguments)) for c in parsed.tool_calls] == [
        (n, json.loads(a)) for n, a in want
    ]


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# ----- text ---------------------------------------------------------------------------------


def test_text_is_bos_text_eos_with_every_token_a_target(tok: Tokenizer) -> None:
    text = "The quick brown fox jumps over the lazy dog."
    (ex,) = encode_record({"text": text}, tok, None, seq_len=1000)
    assert ex.ids == [tok.bos_token_id, *tok.encode(text), tok.eos_token_id]
    assert ex.loss_mask == [False] + [True] * (len(ex.ids) - 1)


def test_long_text_is_cut_into_windows_that_train_each_token_once(tok: Tokenizer) -> None:
    text = "The model reads the prompt, then it generates one token at a time. " * 8
    full = [tok.bos_token_id, *tok.encode(text), tok.eos_token_id]
    seq_len = 16
    windows = encode_record({"text": text}, tok, None, seq_len=seq_len)
    assert len(windows) > 3
    assert all(2 <= len(w.ids) <= seq_len + 1 for w in windows)
    rebuilt = windows[0].ids + [t for w in windows[1:] for t in w.ids[1:]]
    assert rebuilt == full
    for prev, nxt in zip(windows, windows[1:], strict=False):
        assert nxt.ids[0] == prev.ids[-1] and not nxt.loss_mask[0]
    assert sum(sum(w.loss_mask) for w in windows) == len(full) - 1


def test_special_token_strings_in_text_stay_text(tok: Tokenizer) -> None:
    text = "a literal <|im_end|> and <think> in a document"
    (ex,) = encode_record({"text": text}, tok, None, seq_len=1000)
    body = ex.ids[1:-1]
    assert tok.special("<|im_end|>") not in body and tok.special("<think>") not in body
    assert tok.decode(body) == text


# ----- chat ---------------------------------------------------------------------------------


def test_tool_trajectory_trains_each_turn_in_its_inference_context(tok: Tokenizer) -> None:
    record = {"messages": TRAJECTORY, "tools": TOOLS}
    examples = encode_record(record, tok, None, seq_len=4096)
    episodes = [[2, 4, 6], [8]]
    assert len(examples) == len(episodes)
    for ex, turns in zip(examples, episodes, strict=True):
        runs = _runs(ex.loss_mask)
        assert len(runs) == len(turns)
        for (start, end), j in zip(runs, turns, strict=True):
            # The prompt the engine builds for turn j is exactly the sequence before its span.
            prompt = encode_chat(tok, TRAJECTORY[:j], tools=TOOLS)
            assert ex.ids[: len(prompt)] == prompt and start == len(prompt)
            _assert_turn(tok, ex.ids[start:end], TRAJECTORY[j])
        assert runs[-1][1] == len(ex.ids)
        # Nothing of the system, user or tool messages is ever a target.
        trained = tok.decode([t for t, on in zip(ex.ids, ex.loss_mask, strict=True) if on])
        for msg in TRAJECTORY:
            if msg["role"] != "assistant":
                assert msg["content"] not in trained
        for special in ("<|im_user|>", "<|im_system|>", "<|im_assistant|>", "<|im_middle|>"):
            assert tok.special(special) not in [
                t for t, on in zip(ex.ids, ex.loss_mask, strict=True) if on
            ]
    # The second episode sees the first one as inference shows it: reasoning dropped.
    context = tok.decode(examples[1].ids)
    assert "Both results are in" not in context and "Beijing is sunny and warm" in context


def test_a_conversation_ending_in_a_tool_call_ends_its_last_episode_there(
    tok: Tokenizer,
) -> None:
    messages = TRAJECTORY[:5]
    (ex,) = encode_record({"messages": messages, "tools": TOOLS}, tok, None, seq_len=4096)
    runs = _runs(ex.loss_mask)
    assert len(runs) == 2 and runs[-1][1] == len(ex.ids)
    _assert_turn(tok, ex.ids[runs[1][0] :], messages[4])


def test_a_template_that_is_not_prefix_consistent_falls_back_to_one_sequence_per_turn(
    tok: Tokenizer,
) -> None:
    template = ChatTemplate(LAST_ONLY_REASONING)
    messages = TRAJECTORY[1:7]
    examples = encode_record({"messages": messages}, tok, template, seq_len=4096)
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    assert len(examples) == len(turns) == 3
    for ex, j in zip(examples, turns, strict=True):
        prompt = encode_chat(tok, messages[:j], template=template)
        assert ex.ids[: len(prompt)] == prompt
        assert _runs(ex.loss_mask) == [(len(prompt), len(ex.ids))]
        _assert_turn(tok, ex.ids[len(prompt) :], messages[j])


def test_long_chats_are_cut_at_the_end(tok: Tokenizer) -> None:
    record = {"messages": TRAJECTORY[:7], "tools": TOOLS}
    (full,) = encode_record(record, tok, None, seq_len=4096)
    (cut,) = encode_record(record, tok, None, seq_len=len(full.ids) - 10)
    assert cut.ids == full.ids[: len(full.ids) - 9]
    assert cut.loss_mask == full.loss_mask[: len(cut.ids)]


# ----- files and errors --------------------------------------------------------------------


def test_load_examples_reads_both_kinds_and_skips_blank_lines(
    tok: Tokenizer, tmp_path: Path
) -> None:
    chat = {"messages": TRAJECTORY, "tools": TOOLS}
    path = _write(tmp_path / "d.jsonl", [json.dumps({"text": "hello world"}), "", json.dumps(chat)])
    assert len(read_records(path)) == 2
    examples = load_examples(path, tok, None, seq_len=4096)
    assert examples == [
        *encode_record({"text": "hello world"}, tok, None, 4096),
        *encode_record(chat, tok, None, 4096),
    ]


@pytest.mark.parametrize(
    ("line", "words"),
    [
        ('{"text": "ok"', "not valid JSON"),
        ("[1, 2]", "JSON object"),
        ('{"prompt": "x"}', "exactly one of 'text'"),
        ('{"text": "a", "messages": []}', "exactly one of 'text'"),
        ('{"text": 3}', "'text' must be a string"),
        ('{"messages": []}', "non-empty list"),
        ('{"messages": [{"role": "robot", "content": "x"}]}', "role must be one of"),
        ('{"messages": [{"role": "user", "content": "x"}]}', "no assistant message"),
        ('{"messages": [{"role": "tool", "content": "x"}]}', "tool_call_id"),
        (
            '{"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}',
            "only text content parts",
        ),
        (
            '{"messages": [{"role": "assistant", "tool_calls": [{"function": {}}]}]}',
            "tool call 0 needs a 'function'",
        ),
        (
            '{"messages": [{"role": "assistant", "content": "x", "reasoning_content": 1}]}',
            "'reasoning_content' must be a string",
        ),
        ('{"messages": [{"role": "assistant", "content": "x"}], "tools": {}}', "'tools'"),
    ],
)
def test_bad_lines_are_named_by_file_and_line(tmp_path: Path, line: str, words: str) -> None:
    path = _write(tmp_path / "bad.jsonl", [json.dumps({"text": "fine"}), "", line])
    with pytest.raises(DataError, match=r"bad\.jsonl:3: ") as info:
        read_records(path)
    assert words in str(info.value)


def test_empty_and_missing_files_are_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="empty"):
        read_records(_write(tmp_path / "empty.jsonl", [""]))
    with pytest.raises(DataError, match="not found"):
        read_records(tmp_path / "missing.jsonl")


def test_a_template_that_cannot_locate_a_turn_names_the_line(
    tok: Tokenizer, tmp_path: Path
) -> None:
    # The header counts messages, so no rendering extends the generation prompt before it.
    template = ChatTemplate(
        "{{ messages | length }}{% for m in messages %}{{ m.content }}<|im_end|>{% endfor %}"
    )
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    path = _write(tmp_path / "c.jsonl", [json.dumps({"text": "fine"}), json.dumps(chat)])
    with pytest.raises(DataError, match=r"c\.jsonl:2: assistant message 1"):
        load_examples(path, tok, template, seq_len=64)


# ----- batches ------------------------------------------------------------------------------


def _examples(n: int) -> list[Example]:
    out = []
    for i in range(n):
        ids = [100 + i * 10 + t for t in range(2 + i % 5)]
        out.append(
            Example(ids, [False, *[t % 2 == 1 or t == len(ids) - 1 for t in range(1, len(ids))]])
        )
    return out


def test_batches_shift_labels_and_pad_to_the_longest_row() -> None:
    examples = _examples(7)
    batches = Batches(examples, batch_size=3, seq_len=64, seed=0, pad_id=7)
    by_first = {e.ids[0]: e for e in examples}
    for _ in range(5):
        batch = batches.next()
        lengths = batch.attention_mask.sum(1).tolist()
        assert batch.input_ids.shape[1] == max(lengths)
        assert batch.input_ids.dtype == batch.labels.dtype == torch.int64
        assert batch.tokens == sum(lengths)
        assert batch.target_tokens == int((batch.labels != IGNORE_INDEX).sum())
        for row, n in enumerate(lengths):
            ex = by_first[int(batch.input_ids[row, 0])]
            assert n == len(ex.ids) - 1
            assert batch.input_ids[row, :n].tolist() == ex.ids[:-1]
            assert (batch.input_ids[row, n:] == 7).all()
            want = [
                t if on else IGNORE_INDEX
                for t, on in zip(ex.ids[1:], ex.loss_mask[1:], strict=True)
            ]
            assert batch.labels[row, :n].tolist() == want
            assert (batch.labels[row, n:] == IGNORE_INDEX).all()


def test_each_epoch_is_a_permutation_and_epochs_differ() -> None:
    examples = _examples(9)
    batches = Batches(examples, batch_size=1, seq_len=64, seed=3, pad_id=0)
    epochs = [[int(batches.next().input_ids[0, 0]) for _ in examples] for _ in range(2)]
    firsts = sorted(e.ids[0] for e in examples)
    assert sorted(epochs[0]) == sorted(epochs[1]) == firsts
    assert epochs[0] != epochs[1]


def test_same_seed_same_batches_and_resume_continues_exactly() -> None:
    examples = _examples(11)

    def stream(b: Batches, k: int) -> list[torch.Tensor]:
        return [b.next().input_ids for _ in range(k)]

    a, b = (Batches(examples, 4, 64, seed=5, pad_id=0) for _ in range(2))
    first = stream(a, 3)
    assert all(torch.equal(x, y) for x, y in zip(first, stream(b, 3), strict=True))
    other = stream(Batches(examples, 4, 64, seed=6, pad_id=0), 3)
    assert not all(torch.equal(x, y) for x, y in zip(first, other, strict=True))
    state = a.state_dict()  # after 12 rows: inside the second epoch
    resumed = Batches(examples, 4, 64, seed=5, pad_id=0)
    resumed.load_state_dict(state)
    for x, y in zip(stream(a, 5), stream(resumed, 5), strict=True):
        assert torch.equal(x, y)
    with pytest.raises(ValueError, match="seed"):
        Batches(examples, 4, 64, seed=9, pad_id=0).load_state_dict(state)


def test_examples_without_targets_are_dropped_and_counted() -> None:
    keep = Example([1, 2, 3], [False, True, True])
    no_target = Example([1, 2, 3], [False, False, False])
    target_past_cut = Example([1, 2, 3, 4], [False, False, False, True])
    batches = Batches([keep, no_target, target_past_cut], batch_size=2, seq_len=2, seed=0, pad_id=0)
    assert batches.dropped == 2
    assert batches.next().input_ids.tolist() == [[1, 2], [1, 2]]
    with pytest.raises(DataError, match="target"):
        Batches([no_target], batch_size=1, seq_len=8, seed=0, pad_id=0)
