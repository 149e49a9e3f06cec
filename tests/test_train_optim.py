"""The optimizers of `swarmoe train` (AdamW, Muon with per-expert Muon) and QK-clip."""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from swarmoe.config import parse_config
from swarmoe.model.attention import MLAttention
from swarmoe.model.kimi import build_model
from swarmoe.testing.tiny import random_state_dict, tiny_config
from swarmoe.train.optim import build_optimizer
from swarmoe.train.qk_clip import QKClip

VOCAB = 1024
MUON_KEYS = ("lr", "weight_decay", "momentum", "nesterov", "ns_coefficients", "eps", "ns_steps",
             "adjust_lr_fn")


def _model(**overrides) -> nn.Module:
    config = tiny_config(vocab_size=VOCAB, n_routed_experts=8, num_experts_per_tok=2, **overrides)
    model = build_model(parse_config(config))
    model.load_state_dict(random_state_dict(config))
    return model.train()


def _batch(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(seed))


def _loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    logits = model(ids)
    return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))


def _train(model, opt, ids, steps, scheduler=None) -> list[float]:
    losses = []
    for _ in range(steps):
        loss = _loss(model, ids)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()
        losses.append(loss.item())
    return losses


def _groups(opt: torch.optim.Optimizer) -> dict[str, dict]:
    return {g["name"]: g for g in opt.param_groups}


# --- grouping ---------------------------------------------------------------------------------


def test_muon_groups_hidden_matrices_and_experts_adamw_the_rest():
    model = _model()
    frozen = {"model.layers.2.self_attn.q_b_proj.weight", "model.layers.1.mlp.experts.down",
              "model.norm.weight"}
    for name, p in model.named_parameters():
        p.requires_grad_(name not in frozen)
    groups = _groups(build_optimizer(model, "muon", lr=1e-3))
    names = {k: set(g["param_names"]) for k, g in groups.items()}
    assert set(names) == {"muon", "muon_experts", "adamw", "adamw_no_decay"}

    listed = [n for g in groups.values() for n in g["param_names"]]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert len(listed) == len(set(listed)) and set(listed) == trainable
    assert not frozen & set(listed)
    in_groups = {id(p) for g in groups.values() for p in g["params"]}
    assert all(id(b) not in in_groups for b in model.buffers())
    assert not any("e_score_correction_bias" in n for n in listed)

    assert names["muon_experts"] == {n for n in trainable if ".experts." in n}
    assert names["adamw"] == {"model.embed_tokens.weight", "lm_head.weight"}
    params = dict(model.named_parameters())
    assert names["adamw_no_decay"] == {n for n in trainable if params[n].dim() == 1}
    assert names["muon"] == {n for n in trainable if params[n].dim() == 2} - names["adamw"]
    for expected in ("layers.0.self_attn.q_a_proj", "layers.1.mlp.gate", "layers.0.mlp.up_proj",
                     "layers.1.mlp.shared_experts.down_proj", "layers.2.self_attn.kv_b_proj"):
        assert f"model.{expected}.weight" in names["muon"]

    assert groups["adamw_no_decay"]["weight_decay"] == 0.0
    assert groups["adamw"]["weight_decay"] == groups["muon"]["weight_decay"] == 0.1
    for muon in ("muon", "muon_experts"):
        assert groups[muon]["adjust_lr_fn"] == "match_rms_adamw"


def test_adamw_decays_all_but_norms_and_biases():
    model = _model(attention_bias=True)
    opt = build_optimizer(model, "adamw", lr=1e-3, weight_decay=0.05, betas=(0.8, 0.9))
    assert isinstance(opt, torch.optim.AdamW)
    groups = _groups(opt)
    params = dict(model.named_parameters())
    assert set(groups["adamw"]["param_names"]) == {n for n, p in params.items() if p.dim() >= 2}
    no_decay = set(groups["adamw_no_decay"]["param_names"])
    assert no_decay == {n for n, p in params.items() if p.dim() == 1}
    assert "model.layers.0.self_attn.q_a_proj.bias" in no_decay
    assert groups["adamw"]["weight_decay"] == 0.05 and groups["adamw_no_decay"]["weight_decay"] == 0
    assert groups["adamw"]["betas"] == (0.8, 0.9)


def test_nothing_trainable_or_unknown_name_is_refused():
    model = _model()
    with pytest.raises(ValueError, match="unknown optimizer 'sgd'"):
        build_optimizer(model, "sgd", lr=1e-3)  # type: ignore[arg-type]
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no parameter of the model requires grad"):
        build_optimizer(model, "muon", lr=1e-3)


# --- steps, resume, schedules -----------------------------------------------------------------


@pytest.mark.parametrize("name", ["adamw", "muon"])
def test_steps_reduce_the_loss(name):
    torch.manual_seed(0)
    model = _model()
    losses = _train(model, build_optimizer(model, name, lr=1e-2), _batch(), 5)
    assert losses[-1] < 0.8 * losses[0], losses


@pytest.mark.parametrize("name", ["adamw", "muon"])
def test_resume_continues_bit_for_bit(name):
    def warmup(step: int) -> float:
        return min(1.0, (step + 1) / 3)

    ids = _batch()
    model = _model()
    opt = build_optimizer(model, name, lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, warmup)
    _train(model, opt, ids, 2, scheduler)
    saved = io.BytesIO()
    torch.save({"model": model.state_dict(), "optim": opt.state_dict(),
                "sched": scheduler.state_dict()}, saved)
    _train(model, opt, ids, 2, scheduler)

    saved.seek(0)
    checkpoint = torch.load(saved)
    resumed = _model()
    resumed.load_state_dict(checkpoint["model"])
    opt2 = build_optimizer(resumed, name, lr=1e-2)
    scheduler2 = torch.optim.lr_scheduler.LambdaLR(opt2, warmup)
    opt2.load_state_dict(checkpoint["optim"])
    scheduler2.load_state_dict(checkpoint["sched"])
    _train(resumed, opt2, ids, 2, scheduler2)

    for (n, a), b in zip(model.named_parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b), n
    assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in opt2.param_groups]


def test_muon_state_of_other_groups_is_refused():
    model = _model()
    saved = build_optimizer(model, "muon", lr=1e-3).state_dict()
    model.model.embed_tokens.weight.requires_grad_(False)
    model.lm_head.weight.requires_grad_(False)
    with pytest.raises(ValueError, match="param groups"):
        build_optimizer(model, "muon", lr=1e-3).load_state_dict(saved)


def test_lambda_lr_drives_every_group():
    model = _model()
    opt = build_optimizer(model, "muon", lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 if step == 0 else 0.0)
    ids = _batch()
    _train(model, opt, ids, 1, scheduler)
    assert all(g["lr"] == 0.0 for g in opt.param_groups)
    assert all(g["lr"] == 0.0 for member in opt.optimizers for g in member.param_groups)
    before = {n: p.clone() for n, p in model.named_parameters()}
    _train(model, opt, ids, 1)  # lr 0: no group may move
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n


def test_muon_is_torch_muon_on_matrices_and_on_each_expert():
    model = _model()
    opt = build_optimizer(model, "muon", lr=1e-2)
    groups = _groups(opt)
    matrix = model.model.layers[1].self_attn.q_b_proj.weight
    start = matrix.detach().clone()
    stacks = [model.model.layers[1].mlp.experts.gate_up, model.model.layers[2].mlp.experts.down]
    # Each matrix alone, as a parameter of its own torch.optim.Muon.
    refs = [(matrix, None, nn.Parameter(matrix.detach().clone()), groups["muon"])]
    refs += [(s, e, nn.Parameter(s[e].detach().clone()), groups["muon_experts"])
             for s in stacks for e in range(s.shape[0])]
    ref_opts = [torch.optim.Muon([ref], **{k: group[k] for k in MUON_KEYS})
                for _, _, ref, group in refs]
    for seed in range(2):  # the second step uses the momentum of the first
        opt.zero_grad()
        _loss(model, _batch(seed)).backward()
        for (p, e, ref, _), ref_opt in zip(refs, ref_opts, strict=True):
            ref.grad = (p.grad if e is None else p.grad[e]).clone()
            ref_opt.step()
        opt.step()
        for p, e, ref, _ in refs:
            assert torch.equal(p if e is None else p[e], ref)
    assert not torch.equal(matrix, start)  # it did move


# --- QK-clip ----------------------------------------------------------------------------------


def _attention_inputs(model: nn.Module, ids, attention_mask=None) -> list[tuple]:
    """(attention, x, cos, sin) of every MLAttention in one forward pass."""
    seen: list[tuple] = []
    handles = [m.register_forward_pre_hook(lambda m, args: seen.append((m, *args[:3])))
               for m in model.modules() if isinstance(m, MLAttention)]
    with torch.no_grad():
        model(ids, attention_mask=attention_mask)
    for h in handles:
        h.remove()
    return seen


def _brute_logits(attn: MLAttention, x, cos, sin, attention_mask=None) -> torch.Tensor:
    """scale * q·k [B,H,T,T] in float64 from the projections, -inf where no query may look."""
    c = attn.cfg
    with torch.no_grad():
        q_nope, q_rope = attn.queries(x, cos, sin)
        latent, k_rope = attn.latents(x, cos, sin)
        w_k = attn.kv_b_proj.weight.view(c.num_attention_heads, -1, c.kv_lora_rank)
        w_k = w_k[:, : c.qk_nope_head_dim].double()
        k_nope = torch.einsum("bsr,hdr->bhsd", latent.double(), w_k)
    b, h, t, _ = q_nope.shape
    logits = torch.full((b, h, t, t), -math.inf, dtype=torch.float64)
    for i in range(t):
        for j in range(i + 1):  # causal
            dot = (q_nope[:, :, i].double() * k_nope[:, :, j]).sum(-1)
            dot += (q_rope[:, :, i].double() * k_rope[:, None, j].double()).sum(-1)
            logits[:, :, i, j] = attn.scale * dot
    if attention_mask is not None:  # padded keys are hidden
        logits = logits.masked_fill(~attention_mask.bool()[:, None, None, :], -math.inf)
    return logits


@pytest.mark.parametrize("q_lora_rank", [48, None])
@pytest.mark.parametrize("padded", [False, True])
def test_observed_max_logit_is_the_brute_force_one(q_lora_rank, padded):
    model = _model(q_lora_rank=q_lora_rank)
    ids = _batch()
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    mask = mask if padded else None
    layers = [m for m in model.modules() if isinstance(m, MLAttention)]
    observed: list[torch.Tensor] = []
    for attn in layers:
        attn.logit_observer = observed.append
    inputs = _attention_inputs(model, ids, mask)
    brute = [_brute_logits(*args, attention_mask=mask).amax(dim=(0, 2, 3)) for args in inputs]
    assert len(observed) == len(brute) == len(layers)
    for got, want in zip(observed, brute, strict=True):
        assert got.shape == (model.cfg.num_attention_heads,) and got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)

    clip = QKClip(model, tau=1e9)
    _attention_inputs(model, ids, mask)
    clip.after_step()
    assert clip.max_logit == pytest.approx(float(torch.stack(brute).max()), rel=1e-5)
    assert clip.clipped_heads == 0


def _query_weight(attn: MLAttention) -> torch.Tensor:
    return attn.q_proj.weight if attn.cfg.q_lora_rank is None else attn.q_b_proj.weight


@pytest.mark.parametrize("q_lora_rank", [48, None])
def test_clip_bounds_the_logits_through_the_clipped_heads_rows_only(q_lora_rank):
    model = _model(q_lora_rank=q_lora_rank)
    c = model.cfg
    heads, d, nope = c.num_attention_heads, c.qk_head_dim, c.qk_nope_head_dim
    boosted = [0, 2]
    with torch.no_grad():
        for attn in model.modules():
            if isinstance(attn, MLAttention):
                _query_weight(attn).view(heads, d, -1)[boosted] *= 30
    ids = _batch()
    inputs = _attention_inputs(model, ids)
    before = [_brute_logits(*args) for args in inputs]
    maxima = torch.stack([b.amax(dim=(0, 2, 3)) for b in before])  # [layers, H]
    tau = 0.5 * float(maxima[:, boosted].min())
    assert float(maxima[:, [1, 3]].max()) < tau  # the setup: only boosted heads exceed tau

    clip = QKClip(model, tau=tau, guard=False)  # K2's rule alone: after the step
    _attention_inputs(model, ids)
    weights = {n: p.clone() for n, p in model.named_parameters()}
    clip.after_step()
    assert clip.clipped_heads == len(boosted) * len(inputs)
    assert clip.max_logit == pytest.approx(float(maxima.max()), rel=1e-5)

    touched = set()
    for layer, (args, old) in enumerate(zip(inputs, before, strict=True)):
        attn = args[0]
        new = _brute_logits(*args)
        gamma = tau / maxima[layer]
        for h in range(heads):
            if h in boosted:
                assert float(new[:, h].max()) <= tau * (1 + 1e-4)
                assert float(new[:, h].max()) >= tau * (1 - 1e-4)
                visible = old[:, h].isfinite()
                torch.testing.assert_close(new[:, h][visible], old[:, h][visible] * gamma[h],
                                           rtol=1e-5, atol=1e-5 * tau)
            else:
                assert torch.equal(new[:, h], old[:, h])
        prefix = next(n for n, m in model.named_modules() if m is attn)
        q_name = f"{prefix}.{'q_proj' if q_lora_rank is None else 'q_b_proj'}.weight"
        kv_name = f"{prefix}.kv_b_proj.weight"
        touched |= {q_name, kv_name}
        q_old = weights[q_name].view(heads, d, -1)
        q_new = _query_weight(attn).view(heads, d, -1)
        kv_old = weights[kv_name].view(heads, nope + c.v_head_dim, -1)
        kv_new = attn.kv_b_proj.weight.view(heads, nope + c.v_head_dim, -1)
        for h in range(heads):
            g = float(gamma[h]) if h in boosted else 1.0
            if h not in boosted:
                assert torch.equal(q_new[h], q_old[h]) and torch.equal(kv_new[h], kv_old[h])
                continue
            torch.testing.assert_close(q_new[h, :nope], q_old[h, :nope] * math.sqrt(g))
            torch.testing.assert_close(q_new[h, nope:], q_old[h, nope:] * g)
            torch.testing.assert_close(kv_new[h, :nope], kv_old[h, :nope] * math.sqrt(g))
            assert torch.equal(kv_new[h, nope:], kv_old[h, nope:])  # values stay
    for n, p in model.named_parameters():  # the shared rotary key and all else stay
        if n not in touched:
            assert torch.equal(p, weights[n]), n


def test_observer_is_opt_in_and_counts_training_passes_only():
    model = _model()
    layers = [m for m in model.modules() if isinstance(m, MLAttention)]
    assert all(attn.logit_observer is None for attn in layers)
    clip = QKClip(model, guard=False)
    model.eval()
    _attention_inputs(model, _batch())
    with pytest.raises(RuntimeError, match="no training forward pass"):
        clip.after_step()
    model.train()
    _attention_inputs(model, _batch(1))
    _attention_inputs(model, _batch(2))  # micro-batches of one step: the larger maximum counts
    clip.after_step()
    assert clip.clipped_heads == 0  # so the weights stay and the steps below see the same logits
    first = clip.max_logit
    _attention_inputs(model, _batch(1))
    clip.after_step()
    second = clip.max_logit
    _attention_inputs(model, _batch(2))
    clip.after_step()
    assert first == max(second, clip.max_logit)
    clip.remove()
    assert all(attn.logit_observer is None for attn in layers)
    assert all(not attn._forward_pre_hooks for attn in layers)


def _boosted_model(boosted=(0, 2), factor=30.0, **overrides) -> nn.Module:
    model = _model(**overrides)
    c = model.cfg
    with torch.no_grad():
        for attn in model.modules():
            if isinstance(attn, MLAttention):
                _query_weight(attn).view(c.num_attention_heads, c.qk_head_dim, -1)[list(boosted)] *= factor
    return model


@pytest.mark.parametrize("q_lora_rank", [48, None])
def test_guard_bounds_the_logits_of_the_forward_pass_itself(q_lora_rank):
    """The guard clips before a layer's forward, by the logits of its actual input, so the pass
    that follows (and its observer) sees logits <= tau; heads under tau stay untouched."""
    model = _boosted_model(q_lora_rank=q_lora_rank)
    ids = _batch()
    before = torch.stack([_brute_logits(*a).amax(dim=(0, 2, 3)) for a in _attention_inputs(model, ids)])
    tau = 0.5 * float(before[:, [0, 2]].min())
    assert float(before[:, [1, 3]].max()) < tau
    weights = {n: p.clone() for n, p in model.named_parameters()}

    clip = QKClip(model, tau=tau)
    observed: list[torch.Tensor] = []
    for attn in (m for m in model.modules() if isinstance(m, MLAttention)):
        attn.logit_observer = (lambda f: lambda m: (observed.append(m), f(m)))(attn.logit_observer)
    inputs = _attention_inputs(model, ids)  # registered after the guard: sees the same inputs
    for (attn, *args), got in zip(inputs, observed, strict=True):
        brute = _brute_logits(attn, *args).amax(dim=(0, 2, 3))  # the clipped weights, this input
        torch.testing.assert_close(got.double(), brute, rtol=1e-5, atol=1e-6)
        assert float(got.max()) <= tau * (1 + 1e-5)
        assert float(got[[0, 2]].min()) >= tau * (1 - 1e-5)  # clipped to tau, not below
    # Layer 0 has the same input as before, so its heads under tau keep their logits exactly.
    torch.testing.assert_close(observed[0][[1, 3]].double(), before[0, [1, 3]], rtol=1e-6, atol=0)
    clip.after_step()
    assert clip.max_logit <= tau * (1 + 1e-5)
    # What the guard found before clipping: layer 0's input is the unguarded pass's (the later
    # layers' inputs changed with the clipped layers below them).
    assert clip.max_logit_unclipped >= float(before[0].max()) * (1 - 1e-5)
    assert clip.clipped_heads == 2 * len(inputs)  # by the guard; after_step found nothing over
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, weights[n])}
    assert moved and all(n.endswith(("q_proj.weight", "q_b_proj.weight", "kv_b_proj.weight"))
                         for n in moved)

    model.eval()  # evaluation passes are not guarded
    again = {n: p.clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        model(ids)
    assert all(torch.equal(p, again[n]) for n, p in model.named_parameters())


def test_guard_keeps_every_training_forward_under_tau_where_the_rule_after_the_step_does_not():
    """A high learning rate pushes logits past tau: K2's rule alone (the clip after each step)
    lets the next forward pass exceed tau again; with the guard no forward pass does."""
    tau = 3.0
    worst = {}
    for guard in (False, True, None):
        torch.manual_seed(0)
        model = _model()
        clip = QKClip(model, tau=float("inf") if guard is None else tau, guard=bool(guard))
        opt = torch.optim.AdamW(model.parameters(), lr=3e-2)
        seen = []
        for step in range(30):
            loss = _loss(model, _batch(step % 4))
            opt.zero_grad()
            loss.backward()
            opt.step()
            clip.after_step()
            seen.append(clip.max_logit)
        worst[guard] = max(seen)
    assert worst[None] > 2 * tau  # without any clip the run exceeds tau
    assert worst[False] > tau * 1.01  # the clip after the step alone leaves forward passes over
    assert worst[True] <= tau * (1 + 1e-5)


def test_lora_wrapped_projection_is_refused():
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=2, target_modules=["q_b_proj"])
    model = peft.inject_adapter_in_model(config, _model())
    with pytest.raises(TypeError, match=r"layers\.0\.self_attn\.q_b_proj is a peft\..*Linear"):
        QKClip(model)
