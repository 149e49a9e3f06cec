"""Tokenizer files for tiny test checkpoints, in the exact layout of a Kimi K2.5 release.

`write_tiny_tokenizer` writes `tiktoken.model` (a byte-level BPE learned from a small built-in
corpus), `tokenizer_config.json` (the K2 special tokens at the release's offsets after the base
vocabulary) and `chat_template.jinja`, through `swarmoe.text.release_files`. Everything is deterministic, so two runs give identical
files and a test checkpoint's vocabulary size is stable.
"""

from __future__ import annotations

from collections import Counter
from functools import lru_cache
from pathlib import Path

import regex

from swarmoe.text.release_files import (
    K2_SPECIAL_TOKENS,
    release_tokenizer_config,
    write_tokenizer_files,
)
from swarmoe.text.tokenizer import K2_PAT_STR

#: The release-layout config builder under the name tests have always imported.
tiny_tokenizer_config = release_tokenizer_config

# English prose, Python and JSON, chat-shaped text and Chinese, so that merges cover words,
# code punctuation and multi-byte Han characters alike.
_CORPUS = """
The quick brown fox jumps over the lazy dog. The dog was not amused, and the fox ran into the
forest. In the morning the sun rose over the hills and the birds began to sing. She said that
the weather would be sunny today, but it started to rain in the afternoon. We should check the
weather before we leave. What is the weather like in Beijing today? It is sunny and warm.
A mixture of experts routes every token to a few experts; each expert is a small feed-forward
network. The router scores the experts, selects the top eight, and weights their outputs.
Attention lets every token look at the tokens before it. The model reads the prompt, then it
generates one token at a time until it reaches the end of the answer.
Please summarize the following document in three sentences. The report describes the results
of the experiment, the methods that were used, and the conclusions of the authors.
I think the answer is 42, because 6 times 7 is 42. Let me check the calculation again: 6 * 7 =
42. Yes, the result is correct. The numbers 1, 2, 3, 10, 100, 1000 and 2025 appear here.

def get_weather(city: str) -> dict:
    \"\"\"Return the weather for a city.\"\"\"
    if not city:
        raise ValueError("city must not be empty")
    return {"city": city, "weather": "sunny", "temperature": 26.5}

for i in range(10):
    print(f"step {i}: loss = {loss:.4f}")
    total += i * i

class Expert(nn.Module):
    def __init__(self, hidden: int, inner: int) -> None:
        super().__init__()
        self.up = nn.Linear(hidden, inner)
        self.down = nn.Linear(inner, hidden)

    def forward(self, x):
        return self.down(self.up(x).relu())

{"name": "get_weather", "arguments": {"city": "Beijing", "unit": "celsius"}}
{"type": "function", "function": {"name": "search", "parameters": {"type": "object"}}}
[{"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "Hi there."}]

User: Can you help me write a function that sorts a list of numbers?
Assistant: Of course. Here is a short function that returns the sorted list.

今天天气很好，我们去公园散步吧。北京是中国的首都，也是一座历史悠久的城市。
人工智能正在改变世界，大模型可以回答问题、写代码、翻译文章。
我想知道明天的天气怎么样。请帮我查一下北京和上海的天气。
这个问题很有意思，让我想一想。首先，我们需要理解问题的意思，然后一步一步地分析。
专家混合模型把每个词元分配给少数几个专家，从而在保持计算量的同时扩大参数规模。
"""

DEFAULT_NUM_MERGES = 512


@lru_cache(maxsize=8)
def _learned_vocab(num_merges: int) -> tuple[bytes, ...]:
    """Byte-level BPE: the 256 bytes, then merged tokens in the order they were learned.

    Ties between equally frequent pairs go to the smaller byte pair, so the result never
    depends on hash order. Learning stops early if the corpus runs out of pairs.
    """
    splitter = regex.compile(K2_PAT_STR, regex.V1)
    words = Counter(w.encode("utf-8") for w in splitter.findall(_CORPUS))
    pieces = {w: [bytes([b]) for b in w] for w in words}
    vocab = [bytes([b]) for b in range(256)]
    known = set(vocab)
    while len(vocab) < 256 + num_merges:
        pairs: Counter[tuple[bytes, bytes]] = Counter()
        for word, count in words.items():
            seq = pieces[word]
            for pair in zip(seq, seq[1:], strict=False):
                pairs[pair] += count
        if not pairs:
            break
        left, right = min(pairs, key=lambda p: (-pairs[p], p))
        merged = left + right
        if merged not in known:
            known.add(merged)
            vocab.append(merged)
        for word, seq in pieces.items():
            if len(seq) < 2:
                continue
            out: list[bytes] = []
            i = 0
            while i < len(seq):
                if i + 1 < len(seq) and seq[i] == left and seq[i + 1] == right:
                    out.append(merged)
                    i += 2
                else:
                    out.append(seq[i])
                    i += 1
            pieces[word] = out
    return tuple(vocab)


def write_tiny_tokenizer(directory: str | Path, num_merges: int = DEFAULT_NUM_MERGES) -> int:
    """Write the tokenizer files of a tiny K2.5-layout checkpoint; return the total vocab size.

    The total is the base BPE vocabulary plus 256 special slots, i.e. what the model's
    embedding and lm_head must be sized to.
    """
    if num_merges < 0:
        raise ValueError(f"num_merges must be >= 0, got {num_merges}")
    return write_tokenizer_files(directory, _learned_vocab(num_merges))


__all__ = [
    "DEFAULT_NUM_MERGES",
    "K2_SPECIAL_TOKENS",
    "tiny_tokenizer_config",
    "write_tiny_tokenizer",
]
