"""LoRA on tiny K2 checkpoints: only adapters train, merges are exact, adapters are peft's."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel
from safetensors import safe_open
from torch import nn

from reference import hf_text_model
from swarmoe.config import parse_config
from swarmoe.model import Checkpoint, build_model, load_model
from swarmoe.model.linear import Linear
from swarmoe.testing import make_tiny_checkpoint, tiny_config
from swarmoe.train.lora import (
    LORA_TARGETS,
    apply_lora,
    load_adapter,
    lora_state_dict,
    merge_checkpoint,
    merge_lora,
    save_adapter,
)

IDS = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8], [2, 7, 1, 8, 2, 8, 1, 8, 2, 8, 4, 5]])


@pytest.fixture(scope="module", params=["dense", "int4"])
def ckpt(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    return make_tiny_checkpoint(path, int4=request.param == "int4", dtype=torch.float32)


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS)


def _loss(model: nn.Module) -> torch.Tensor:
    logits = model(IDS[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), IDS[:, 1:].reshape(-1))


def _train(model: nn.Module, steps: int = 4) -> list[float]:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = _loss(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        losses.append(_loss(model).item())
    return losses


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    return {n: t.detach().clone() for n, t in tensors.items()}


def test_only_adapters_train_and_the_rest_stays_bit_identical(ckpt):
    model = load_model(ckpt)
    before = _logits(model)
    targets = {n for n, m in model.named_modules() if isinstance(m, Linear)
               and (".self_attn." in n or ".shared_experts." in n)}
    apply_lora(model, rank=4)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{t}.lora_{ab}.default.weight" for t in targets for ab in "AB"}
    # B starts at zero: the adapted model computes what the base did.
    torch.testing.assert_close(_logits(model), before, atol=1e-5, rtol=0)

    frozen = {n: t for n, t in _snapshot(model).items() if "lora_" not in n}
    adapters = {n: t for n, t in _snapshot(model).items() if "lora_" in n}
    if "int4" in str(ckpt):
        assert any(n.endswith("gate_up_packed") for n in frozen)
    assert any(n.endswith("e_score_correction_bias") for n in frozen)
    losses = _train(model)
    assert losses[-1] < losses[0] - 0.05, losses
    after = _snapshot(model)
    for name, value in frozen.items():
        assert after[name].dtype == value.dtype and torch.equal(after[name], value), name
    for name, value in adapters.items():
        assert not torch.equal(after[name], value), f"{name} did not train"
    assert not torch.allclose(_logits(model), before, atol=1e-3)


def _trained(ckpt, rank: int = 4) -> nn.Module:
    model = apply_lora(load_model(ckpt), rank=rank, alpha=2.0 * rank)
    _train(model, steps=2)
    return model


def test_merge_folds_adapters_into_plain_layers(ckpt):
    model = _trained(ckpt)
    adapted = _logits(model)
    merge_lora(model)
    assert not any("lora" in n for n in model.state_dict())
    assert type(model.model.layers[1].self_attn.kv_b_proj) is Linear
    assert sorted(model.state_dict()) == sorted(load_model(ckpt).state_dict())
    torch.testing.assert_close(_logits(model), adapted, atol=1e-5, rtol=0)


def test_adapter_round_trip_and_peft_format(ckpt, tmp_path):
    model = _trained(ckpt, rank=3)
    out = save_adapter(model, tmp_path / "adapter", base=ckpt)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 3 and config["lora_alpha"] == 6.0
    assert config["base_model_name_or_path"] == str(ckpt)
    assert sorted(config["target_modules"]) == sorted(LORA_TARGETS)
    with safe_open(out / "adapter_model.safetensors", framework="pt") as f:
        names = set(f.keys())
    assert names == {"base_model.model." + n for n in lora_state_dict(model)}

    loaded = load_adapter(load_model(ckpt), out)
    saved, restored = lora_state_dict(model), lora_state_dict(loaded)
    assert saved.keys() == restored.keys()
    assert all(torch.equal(saved[n], restored[n]) for n in saved)
    torch.testing.assert_close(_logits(loaded), _logits(model), atol=0, rtol=0)


def test_peft_loads_the_adapter_onto_transformers_deepseek_v3(tmp_path):
    # Attention only: on transformers 5, peft's v4->v5 MoE conversion reads every `*.gate_proj`
    # / `up_proj` / `down_proj` target as the fused routed experts, so it would drop the
    # shared-expert adapters (a peft limitation; our own loader takes them).
    attention = tuple(t for t in LORA_TARGETS if t.startswith("self_attn."))
    ckpt = make_tiny_checkpoint(tmp_path / "base", dtype=torch.float32)
    model = apply_lora(load_model(ckpt), rank=4, targets=attention)
    _train(model, steps=2)
    hf = PeftModel.from_pretrained(hf_text_model(ckpt), str(save_adapter(model, tmp_path / "a")))
    theirs = {n.removeprefix("base_model.model.").replace(".default", "")
              for n, _ in hf.named_parameters() if ".lora_" in n}
    assert theirs == set(lora_state_dict(model))
    with torch.no_grad():
        torch.testing.assert_close(hf(IDS).logits, _logits(model), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merged_checkpoint_loads_and_matches(tmp_path, dtype):
    base = make_tiny_checkpoint(tmp_path / "base", int4=True, dtype=dtype)
    model = apply_lora(load_model(base, dtype=dtype), rank=4)
    _train(model, steps=2)
    adapted = _logits(model)
    adapter = save_adapter(model, tmp_path / "adapter", base)
    merged = merge_checkpoint(base, adapter, tmp_path / "out")

    before, after = Checkpoint(base), Checkpoint(merged)
    assert after.names() == before.names()
    changed = set()
    for name in sorted(before.names()):
        old, new = before.get(name), after.get(name)
        assert new.dtype == old.dtype, name
        if not torch.equal(new, old):
            changed.add(name.removesuffix(".weight"))
    adapted_modules = {n.removesuffix(".lora_A.weight") for n in lora_state_dict(model)
                       if n.endswith("lora_A.weight")}
    assert changed == adapted_modules  # packed INT4 experts, router, norms: bit for bit
    assert (merged / "tiktoken.model").read_bytes() == (base / "tiktoken.model").read_bytes()
    reloaded = _logits(load_model(merged, dtype=dtype))
    in_memory = merge_lora(load_adapter(load_model(base, dtype=dtype), adapter))
    assert torch.equal(reloaded, _logits(in_memory))
    if dtype == torch.float32:  # in bf16 the merged weights are rounded once more
        torch.testing.assert_close(reloaded, adapted, atol=1e-5, rtol=0)


def test_bf16_model_keeps_float32_adapters_and_runs_both_ways(ckpt):
    model = apply_lora(load_model(ckpt, dtype=torch.bfloat16), rank=2)
    adapters = [p for n, p in model.named_parameters() if "lora_" in n]
    assert adapters and all(p.dtype == torch.float32 and p.requires_grad for p in adapters)
    assert _logits(model).dtype == torch.bfloat16
    _loss(model).backward()
    assert all(p.grad is not None for p in adapters)


def test_multimodal_adapts_the_language_model_only():
    model = apply_lora(build_model(parse_config(tiny_config(multimodal=True))), rank=2)
    adapted = {n.split(".lora_")[0] for n, _ in model.named_parameters() if ".lora_" in n}
    assert adapted and all(n.startswith("language_model.model.layers.") for n in adapted)


def test_clear_errors(tmp_path):
    ckpt = make_tiny_checkpoint(tmp_path / "base", dtype=torch.float32)
    model = load_model(ckpt)
    with pytest.raises(ValueError, match="rank must be at least 1"):
        apply_lora(model, rank=0)
    with pytest.raises(ValueError, match="no module of Sequential matches the LoRA targets"):
        apply_lora(nn.Sequential(nn.Linear(4, 4)), rank=2)
    with pytest.raises(ValueError, match="has no LoRA adapters"):
        lora_state_dict(model)
    with pytest.raises(ValueError, match="has no LoRA adapters"):
        merge_lora(model)
    with pytest.raises(FileNotFoundError, match="not a LoRA adapter directory"):
        load_adapter(model, tmp_path)
    apply_lora(model, rank=2)
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        apply_lora(model, rank=2)
    adapter = save_adapter(model, tmp_path / "adapter")
    other = make_tiny_checkpoint(tmp_path / "other", dtype=torch.float32, q_lora_rank=24)
    other_model = load_model(other)
    with pytest.raises(ValueError, match=r"q_[ab]_proj\.lora_[AB]\.weight has shape"):
        load_adapter(other_model, adapter)
    assert sorted(other_model.state_dict()) == sorted(load_model(other).state_dict())
    nope = make_tiny_checkpoint(tmp_path / "nope", dtype=torch.float32, q_lora_rank=None)
    with pytest.raises(ValueError, match="does not fit this model: missing .*q_proj"):
        load_adapter(load_model(nope), adapter)
