"""Loader: release layouts, and malformed checkpoints failing at load with the tensor's name."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

from swarmoe.cli import app
from swarmoe.config import ConfigError, load_config
from swarmoe.model import CheckpointError, RoutingStats, load_model
from swarmoe.testing import make_tiny_checkpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ck") / "tiny", int4=True)


def rewrite(path, edit):
    """Apply `edit(dict_of_tensors)` to every shard of a copied checkpoint."""
    index = json.loads((path / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    tensors = {}
    for file in files:
        with safe_open(path / file, framework="pt") as f:
            tensors.update({n: f.get_tensor(n) for n in f.keys()})  # noqa: SIM118
        (path / file).unlink()
    edit(tensors)
    save_file(tensors, str(path / "model.safetensors"))
    (path / "model.safetensors.index.json").unlink()


@pytest.fixture
def copy(tiny, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(tiny, dst)
    return dst


EXPERT = "model.layers.1.mlp.experts.3.up_proj.weight_packed"


def test_missing_tensor_is_named(copy):
    rewrite(copy, lambda t: t.pop(EXPERT))
    with pytest.raises(CheckpointError, match=f"missing.*{EXPERT}"):
        load_model(copy)


def test_unexpected_tensor_is_named(copy):
    rewrite(copy, lambda t: t.__setitem__("model.layers.0.self_attn.extra.weight", torch.zeros(2)))
    with pytest.raises(CheckpointError, match="unexpected.*model.layers.0.self_attn.extra.weight"):
        load_model(copy)


def test_misshapen_tensor_is_named(copy):
    name = "model.layers.2.self_attn.kv_b_proj.weight"
    rewrite(copy, lambda t: t.__setitem__(name, t[name][:, :-1].contiguous()))
    with pytest.raises(CheckpointError, match=f"{name} has shape"):
        load_model(copy)


def test_wrong_int4_shape_record_is_named(copy):
    name = "model.layers.2.mlp.experts.0.down_proj.weight_shape"
    rewrite(copy, lambda t: t.__setitem__(name, torch.tensor([1, 2], dtype=torch.int32)))
    with pytest.raises(CheckpointError, match=name):
        load_model(copy)


def test_single_file_checkpoint_without_index_loads(copy):
    rewrite(copy, lambda t: None)
    ids = torch.tensor([[1, 2, 3]])
    assert torch.equal(load_model(copy)(ids), load_model(copy)(ids))


def test_pickles_are_never_loaded(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises((CheckpointError, ConfigError)):
        load_model(tmp_path)


def test_only_safetensors_are_read(copy):
    for shard in copy.glob("*.safetensors"):
        shard.unlink()
    (copy / "model.safetensors.index.json").unlink()
    (copy / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="only safetensors"):
        load_model(copy)


def test_corrupt_shard_fails_at_load(copy):
    shard = sorted(copy.glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(Exception, match="safetensors|header|read"):
        load_model(copy)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"n_group": 3}, "not divisible by n_group"),
        ({"num_key_value_heads": 2}, "num_key_value_heads"),
        ({"mystery_field": 1}, "unknown field.*mystery_field"),
        ({"scoring_func": "softmax"}, "scoring_func"),
        ({"rope_scaling": {"type": "yarn", "factor": 4, "original_max_position_embeddings": 64, "bogus": 1}}, "bogus"),
        ({"hidden_size": 0}, "hidden_size"),
    ],
)
def test_inconsistent_config_is_named(tiny, edit, message):
    raw = json.loads((tiny / "config.json").read_text())
    raw.update(edit)
    with pytest.raises(ConfigError, match=message):
        load_config(raw)


def test_transformers_spelling_is_read():
    from transformers import DeepseekV3Config

    hf = DeepseekV3Config(
        vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
        n_routed_experts=8, n_group=2, topk_group=1, num_experts_per_tok=2,
        rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0,
                         "original_max_position_embeddings": 64, "mscale_all_dim": 1.0},
    ).to_dict()
    cfg = load_config(hf).text
    assert (cfg.rope.type, cfg.rope.factor, cfg.rope.original_max_position_embeddings) == ("yarn", 4.0, 64)
    assert (cfg.n_routed_experts, cfg.n_group, cfg.topk_group) == (8, 2, 1)


def test_routing_stats_count_every_choice(tiny):
    model = load_model(tiny)
    ids = torch.randint(0, 700, (2, 9))
    with torch.no_grad(), RoutingStats.attach(model) as stats:
        model(ids)
    rows = stats.rows()
    assert [r["layer"] for r in rows] == [1, 2]  # layer 0 is dense
    for layer in stats.layers.values():
        assert layer.tokens == 18
        assert int(layer.tokens_per_expert.sum()) == 18 * 4  # top-4
        assert 1 <= layer.experts_touched <= 16
    # Detached on exit: further passes are not counted.
    with torch.no_grad():
        model(ids)
    assert stats.layers[1].tokens == 18


def test_cli_init_tiny_and_inspect(tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["init-tiny", str(tmp_path / "t"), "--fp8"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["inspect", "--model", str(tmp_path / "t"), "--prompt", "hello there"])
    assert result.exit_code == 0, result.output
    assert "experts_touched" in result.output and "kimi_k2" in result.output
    assert "max/mean" in result.output and "dead" in result.output
