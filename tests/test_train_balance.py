"""Expert balancing in training: the bias update, the sequence-wise loss, the load figures, and
training numerics (forward and gradients through the grouped experts) against transformers."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from swarmoe.model import load_model
from swarmoe.model import moe as moe_module
from swarmoe.model.moe import MoE
from swarmoe.testing import make_tiny_checkpoint
from swarmoe.train.balance import LayerLoad, LoadBalancer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"))
    config = json.loads((path / "config.json").read_text())
    config["model_type"] = "deepseek_v3"  # what `swarmoe train` writes, for transformers
    (path / "config.json").write_text(json.dumps(config))
    return path


def _grads(model, ids):
    logits = model(ids)
    logits = logits.logits if hasattr(logits, "logits") else logits
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    loss.backward()
    return loss


def test_training_gradients_equal_transformers(tiny):
    from transformers import DeepseekV3ForCausalLM

    ours = load_model(tiny, dtype=torch.float32).train()
    ref = DeepseekV3ForCausalLM.from_pretrained(tiny, dtype=torch.float32).train()
    ids = torch.randint(0, 700, (3, 24), generator=torch.Generator().manual_seed(0))
    assert torch.allclose(_grads(ours, ids), _grads(ref, ids), atol=1e-5)
    theirs = dict(ref.named_parameters())
    pairs = {
        "model.embed_tokens.weight": "model.embed_tokens.weight",
        "model.layers.1.self_attn.q_a_proj.weight": "model.layers.1.self_attn.q_a_proj.weight",
        "model.layers.1.self_attn.kv_b_proj.weight": "model.layers.1.self_attn.kv_b_proj.weight",
        "model.layers.1.mlp.gate.weight": "model.layers.1.mlp.gate.weight",
        "model.layers.2.mlp.experts.gate_up": "model.layers.2.mlp.experts.gate_up_proj",
        "model.layers.2.mlp.experts.down": "model.layers.2.mlp.experts.down_proj",
        "model.layers.2.mlp.shared_experts.up_proj.weight": "model.layers.2.mlp.shared_experts.up_proj.weight",
    }
    own = dict(ours.named_parameters())
    for mine, peer in pairs.items():
        g, r = own[mine].grad, theirs[peer].grad
        assert g is not None and r is not None, mine
        assert torch.allclose(g, r, atol=1e-6, rtol=1e-4), (mine, (g - r).abs().max())


def test_grouped_experts_equal_the_per_expert_loop(tiny, monkeypatch):
    ids = torch.randint(0, 700, (2, 16), generator=torch.Generator().manual_seed(1))
    grads = []
    for grouped in (True, False):
        model = load_model(tiny, dtype=torch.float32).train()
        monkeypatch.setattr(moe_module.grouped, "available", lambda x, g=grouped: g)
        _grads(model, ids)
        grads.append({n: p.grad for n, p in model.named_parameters() if "experts" in n})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6), name


def test_bias_update_moves_against_load_and_skips_padding(tiny):
    model = load_model(tiny, dtype=torch.float32).train()
    balancer = LoadBalancer(model, gamma=0.01)
    before = {m.layer_idx: m.gate.e_score_correction_bias.clone()
              for m in model.modules() if isinstance(m, MoE)}
    seen: dict[int, torch.Tensor] = {}
    for moe in (m for m in model.modules() if isinstance(m, MoE)):
        moe.routing_hooks.append(lambda layer, idx: seen.__setitem__(layer, idx.clone()))
    ids = torch.randint(0, 700, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 7:] = 0
    balancer.begin(mask)
    _grads(model, ids)
    loads = balancer.step()
    for load in loads:
        idx = seen[load.layer].view(2, 12, -1)
        real = torch.cat([idx[0], idx[1, :7]]).reshape(-1)
        counts = torch.bincount(real, minlength=len(load.counts))
        assert load.counts == counts.tolist()  # padding positions are not counted
        moe = next(m for m in model.modules() if isinstance(m, MoE) and m.layer_idx == load.layer)
        delta = moe.gate.e_score_correction_bias - before[load.layer]
        expected = 0.01 * torch.sign(counts.float().mean() - counts.float())
        assert torch.allclose(delta, expected)
    assert balancer.step()[0].counts == [0] * len(loads[0].counts)  # counts restart


def test_no_balance_leaves_the_bias_alone(tiny):
    model = load_model(tiny, dtype=torch.float32).train()
    balancer = LoadBalancer(model, update_bias=False)
    before = [b.clone() for n, b in model.named_buffers() if n.endswith("correction_bias")]
    balancer.begin(torch.ones(1, 8, dtype=torch.long))
    _grads(model, torch.randint(0, 700, (1, 8)))
    assert sum(sum(x.counts) for x in balancer.step()) > 0
    after = [b for n, b in model.named_buffers() if n.endswith("correction_bias")]
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))


def test_sequence_loss_matches_its_definition(tiny):
    model = load_model(tiny, dtype=torch.float32).train()
    balancer = LoadBalancer(model, alpha=0.1)
    captured = {}
    for moe in (m for m in model.modules() if isinstance(m, MoE)):
        moe.score_hooks.append(lambda layer, s, i: captured.__setitem__(layer, (s.detach(), i)))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[0, 6:] = 0
    balancer.begin(mask)
    model(torch.randint(0, 700, (2, 10)))
    expected = 0.0
    for scores, idx in captured.values():
        experts, k = scores.shape[-1], idx.shape[-1]
        per_seq = []
        for b, t in ((0, 6), (1, 10)):
            s = scores.view(2, 10, -1)[b, :t]
            chosen = idx.view(2, 10, -1)[b, :t]
            f = torch.stack([(chosen == e).any(-1).float().sum() for e in range(experts)]) * experts / (k * t)
            p = (s / s.sum(-1, keepdim=True)).mean(0)
            per_seq.append((f * p).sum())
        expected += 0.1 * torch.stack(per_seq).mean()
    loss = balancer.loss()
    assert loss is not None and loss.requires_grad
    assert torch.allclose(loss, expected, rtol=1e-5)


def test_layer_load_figures():
    load = LayerLoad(1, [4, 0, 2, 2])
    assert load.mean == 2 and load.max_over_mean == 2 and load.dead == 1
    assert load.cv == pytest.approx((sum((c - 2) ** 2 for c in [4, 0, 2, 2]) / 4) ** 0.5 / 2)


def test_bias_update_alone_balances_a_skewed_router(tiny):
    """With the weights fixed, the bias update by itself undoes a router skew: a quarter of the
    experts made to win on every token lose their excess load within ~gap/γ steps."""
    model = load_model(tiny, dtype=torch.float32).train()
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    ids = torch.randint(0, 700, (8, 64), generator=torch.Generator().manual_seed(0))
    inputs = {}
    hooks = [m.register_forward_hook(lambda m, a, o: inputs.__setitem__(m.layer_idx, a[0])) for m in moes]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    with torch.no_grad():  # +1 logit on an average token for a quarter of the experts
        for moe in moes:
            mean = inputs[moe.layer_idx].reshape(-1, inputs[moe.layer_idx].shape[-1]).mean(0)
            moe.gate.weight[: moe.gate.weight.shape[0] // 4] += mean / mean.square().sum()
    balancer = LoadBalancer(model, gamma=1e-2)
    mask = torch.ones_like(ids)
    worst = []
    for _ in range(120):
        balancer.begin(mask)
        model(ids)  # a training pass (grad enabled): the one the balancer counts
        worst.append(max(x.max_over_mean for x in balancer.step()))
    assert worst[0] > 2.0
    assert max(worst[-20:]) < 1.3
