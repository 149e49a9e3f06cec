"""save_checkpoint writes what load_model reads: every release tensor, bit for bit."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from swarmoe.model import Checkpoint, load_model
from swarmoe.model.saver import save_checkpoint
from swarmoe.testing import make_tiny_checkpoint


def _tensors(path) -> dict[str, torch.Tensor]:
    ckpt = Checkpoint(path)
    return {name: ckpt.get(name) for name in sorted(ckpt.names())}


@pytest.mark.parametrize("kind", ["bf16", "int4", "fp8", "multimodal"])
def test_saved_checkpoint_equals_the_one_loaded(tmp_path, kind):
    src = make_tiny_checkpoint(
        tmp_path / "src", int4=kind == "int4", fp8=kind == "fp8", multimodal=kind == "multimodal"
    )
    config = json.loads((src / "config.json").read_text())
    model = load_model(src, dtype=torch.bfloat16)
    out = save_checkpoint(model, config, tmp_path / "out", dtype=torch.bfloat16,
                          tokenizer_from=src, shard_bytes=64 << 10)
    before, after = _tensors(src), _tensors(out)
    assert sorted(before) == sorted(after)
    for name, value in before.items():
        assert after[name].dtype == value.dtype, name
        assert torch.equal(after[name], value), name
    assert len(list(out.glob("model-*.safetensors"))) > 1
    assert (out / "tiktoken.model").read_bytes() == (src / "tiktoken.model").read_bytes()
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    with torch.no_grad():
        assert torch.equal(load_model(out, dtype=torch.float32)(ids),
                           load_model(src, dtype=torch.float32)(ids))


def test_float32_model_saved_as_bfloat16_keeps_router_in_float32(tmp_path):
    src = make_tiny_checkpoint(tmp_path / "src")
    config = json.loads((src / "config.json").read_text())
    model = load_model(src, dtype=torch.float32)
    out = save_checkpoint(model, config, tmp_path / "out", dtype=torch.bfloat16)
    with safe_open(str(next(out.glob("model-*.safetensors"))), "pt") as f:
        dtypes = {n: f.get_tensor(n).dtype for n in f.keys()}  # noqa: SIM118
    router = [n for n in dtypes if n.endswith(("mlp.gate.weight", "e_score_correction_bias"))]
    assert router and all(dtypes[n] == torch.float32 for n in router)
    assert any(d == torch.bfloat16 for d in dtypes.values())
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
