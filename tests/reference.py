"""Build transformers' reference models from a swarmoe checkpoint directory.

The checkpoint is in the release layout (per-expert tensors, release names, INT4/FP8 experts);
transformers 5.24 wants its own layout, so the conversion lives here, in the tests, and the
quantised experts are dequantised with compressed-tensors' own unpacking (an independent
implementation of the format).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate|up|down)_proj\.(\w+)$")


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for shard in sorted(path.glob("*.safetensors")):
        with safe_open(shard, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118
                tensors[name] = f.get_tensor(name)
    return tensors


def hf_text_config(raw: dict) -> DeepseekV3Config:
    raw = dict(raw)
    for key in ("model_type", "architectures", "quantization_config", "topk_method",
                "scoring_func", "torch_dtype", "rope_scaling", "rope_theta"):
        raw.pop(key, None)
    src = json.loads(json.dumps(raw))
    return DeepseekV3Config(**src, num_mtp_layers=0)


def hf_rope(raw: dict) -> dict:
    scaling = dict(raw.get("rope_scaling") or {})
    kind = scaling.pop("type", scaling.pop("rope_type", "default"))
    return {"rope_type": kind, "rope_theta": raw.get("rope_theta", 10000.0), **scaling}


def dequant_reference(parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """One expert projection to float32, with compressed-tensors / plain block maths."""
    if "weight_packed" in parts:
        shape = torch.Size(parts["weight_shape"].tolist())
        q = unpack_from_int32(parts["weight_packed"], 4, shape).float()
        scale = parts["weight_scale"].float()
        return (q.view(shape[0], -1, 32) * scale[..., None]).view(shape)
    if "weight_scale_inv" in parts:
        w = parts["weight"].float()
        s = parts["weight_scale_inv"].float()
        s = s.repeat_interleave(128, 0)[: w.shape[0]].repeat_interleave(128, 1)[:, : w.shape[1]]
        return w * s
    return parts["weight"].float()


def hf_text_state(tensors: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """Release names -> transformers DeepseekV3ForCausalLM names, experts stacked."""
    experts: dict[str, dict[int, dict[str, dict[str, torch.Tensor]]]] = {}
    state = {}
    for name, t in tensors.items():
        if not name.startswith(prefix):
            continue
        name = name[len(prefix):]
        m = _EXPERT.match(name)
        if m:
            layer, e, proj, kind = m.group(1), int(m.group(2)), m.group(3), m.group(4)
            experts.setdefault(layer, {}).setdefault(e, {}).setdefault(proj, {})[kind] = t
        else:
            state[name] = t.float()
    for layer, per_expert in experts.items():
        order = sorted(per_expert)
        gate_up = [torch.cat([dequant_reference(per_expert[e]["gate"]),
                              dequant_reference(per_expert[e]["up"])]) for e in order]
        down = [dequant_reference(per_expert[e]["down"]) for e in order]
        state[f"{layer}.gate_up_proj"] = torch.stack(gate_up)
        state[f"{layer}.down_proj"] = torch.stack(down)
    return state


def hf_text_model(path: Path) -> DeepseekV3ForCausalLM:
    raw = json.loads((path / "config.json").read_text())
    text_raw = raw.get("text_config", raw)
    config = hf_text_config(text_raw)
    config.rope_parameters = hf_rope(text_raw)
    prefix = "language_model." if "text_config" in raw else ""
    model = DeepseekV3ForCausalLM(config).float().eval()
    missing, unexpected = model.load_state_dict(hf_text_state(read_checkpoint(path), prefix), strict=False)
    assert not unexpected, unexpected
    # transformers builds zero-width shared experts when there are none: nothing to load there.
    empty = {n for n, p in model.named_parameters() if p.numel() == 0}
    assert not [m for m in missing if "rotary" not in m and m not in empty], missing
    return model


# ---- transformers' Kimi_K25 layout -> the release layout ------------------------------------


def hf_to_release(state_dict: dict[str, torch.Tensor], num_heads: int) -> dict[str, torch.Tensor]:
    """transformers 5.24 Kimi_K25 vision/projector names -> release checkpoint names.

    Accepts keys of `Kimi_K25VisionModel` / `Kimi_K25MultimodalProjection` under the prefixes
    `vision_tower.` / `mm_projector.` (or `model.vision_tower.` etc. from the full model).
    transformers splits `wqkv` into q/k/v and permutes q and k for half-split rope; the release
    keeps them fused and interleaved, so that permutation is undone here.
    """
    renames = [
        (
            r"^(?:model\.)?vision_tower\.layers\.(\d+)\.norm1\.",
            r"vision_tower.encoder.blocks.\1.norm0.",
        ),
        (
            r"^(?:model\.)?vision_tower\.layers\.(\d+)\.norm2\.",
            r"vision_tower.encoder.blocks.\1.norm1.",
        ),
        (
            r"^(?:model\.)?vision_tower\.layers\.(\d+)\.mlp\.fc1\.",
            r"vision_tower.encoder.blocks.\1.mlp.fc0.",
        ),
        (
            r"^(?:model\.)?vision_tower\.layers\.(\d+)\.mlp\.fc2\.",
            r"vision_tower.encoder.blocks.\1.mlp.fc1.",
        ),
        (
            r"^(?:model\.)?vision_tower\.layers\.(\d+)\.attn\.proj\.",
            r"vision_tower.encoder.blocks.\1.wo.",
        ),
        (r"^(?:model\.)?vision_tower\.final_layernorm\.", "vision_tower.encoder.final_layernorm."),
        (
            r"^(?:model\.)?vision_tower\.patch_embed\.pos_emb\.position_embeddings$",
            "vision_tower.patch_embed.pos_emb.weight",
        ),
        (r"^(?:model\.)?vision_tower\.patch_embed\.proj\.", "vision_tower.patch_embed.proj."),
        (r"^(?:model\.)?mm_projector\.pre_norm\.", "mm_projector.pre_norm."),
        (r"^(?:model\.)?mm_projector\.in_proj\.", "mm_projector.proj.0."),
        (r"^(?:model\.)?mm_projector\.out_proj\.", "mm_projector.proj.2."),
    ]

    def interleave(t: torch.Tensor) -> torch.Tensor:
        # per head: [2, head_dim/2] (half split) -> [head_dim/2, 2] (adjacent pairs)
        rows = t.shape[0]
        return t.reshape(num_heads, 2, rows // num_heads // 2, -1).transpose(1, 2).reshape(t.shape)

    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for name, tensor in state_dict.items():
        m = re.match(
            r"^(?:model\.)?vision_tower\.layers\.(\d+)\.attn\.([qkv])_proj\.(weight|bias)$", name
        )
        if m:
            block, which, kind = m.groups()
            qkv.setdefault((block, kind), {})[which] = (
                tensor if which == "v" else interleave(tensor)
            )
            continue
        for pattern, repl in renames:
            new, n = re.subn(pattern, repl, name)
            if n:
                out[new] = tensor
                break
        else:
            raise KeyError(f"no release name for {name}")
    for (block, kind), parts in qkv.items():
        out[f"vision_tower.encoder.blocks.{block}.wqkv.{kind}"] = torch.cat(
            [parts["q"], parts["k"], parts["v"]]
        )
    return out


def int4_pack_reference(w: torch.Tensor) -> dict[str, torch.Tensor]:
    """One [out, in] weight as compressed-tensors pack-quantized INT4 (symmetric, group 32),
    packed by compressed-tensors itself: `weight_packed`, `weight_scale` (bf16), `weight_shape`."""
    rows, cols = w.shape
    groups = w.float().reshape(rows, cols // 32, 32)
    scale = (groups.abs().amax(-1) / 7).clamp_min(1e-6).to(torch.bfloat16)
    q = torch.round(groups / scale.float()[..., None]).clamp(-8, 7).to(torch.int8).reshape(rows, cols)
    return {
        "weight_packed": pack_to_int32(q, 4),
        "weight_scale": scale,
        "weight_shape": torch.tensor([rows, cols], dtype=torch.int32),
    }


_HF_STACKED = re.compile(r"^(.*\.mlp\.experts)\.(gate_up_proj|down_proj)$")


def split_experts(name: str, stacked: torch.Tensor, int4: bool = False) -> dict[str, torch.Tensor]:
    """A transformers stacked expert tensor (`...mlp.experts.gate_up_proj` [E, 2I, H] or
    `down_proj` [E, H, I]) -> the release's per-expert `...mlp.experts.E.{gate,up,down}_proj.*`."""
    m = _HF_STACKED.match(name)
    if not m:
        raise KeyError(f"{name} is not a stacked expert tensor")
    layer, kind = m.groups()
    out = {}
    for e in range(stacked.shape[0]):
        if kind == "gate_up_proj":
            gate, up = stacked[e].chunk(2, dim=0)
            parts = {"gate": gate, "up": up}
        else:
            parts = {"down": stacked[e]}
        for proj, w in parts.items():
            base = f"{layer}.{e}.{proj}_proj."
            if int4:
                out |= {base + k: v for k, v in int4_pack_reference(w).items()}
            else:
                out[base + "weight"] = w.clone()
    return out


def hf_k25_to_release(
    state_dict: dict[str, torch.Tensor], num_vision_heads: int, int4: bool = False
) -> dict[str, torch.Tensor]:
    """A whole transformers `Kimi_K25ForConditionalGeneration` state dict -> release names:
    `model.language_model.X` -> `language_model.model.X`, `lm_head` -> `language_model.lm_head`,
    stacked experts -> per-expert tensors (INT4 pack-quantized on request), vision and projector
    through `hf_to_release`."""
    out: dict[str, torch.Tensor] = {}
    vision = {}
    for name, t in state_dict.items():
        if name.startswith(("model.vision_tower.", "model.mm_projector.")):
            vision[name] = t
        elif name.startswith("model.language_model."):
            new = "language_model.model." + name[len("model.language_model."):]
            if _HF_STACKED.match(new):
                out |= split_experts(new, t, int4)
            else:
                out[new] = t
        elif name == "lm_head.weight":
            out["language_model.lm_head.weight"] = t
        else:
            raise KeyError(f"no release name for {name}")
    return out | hf_to_release(vision, num_vision_heads)


def write_release_checkpoint(path: Path, tensors: dict[str, torch.Tensor], config: dict,
                             shards: int = 2) -> Path:
    """Sharded safetensors with `model.safetensors.index.json`, and `config.json`."""
    path.mkdir(parents=True, exist_ok=True)
    names = sorted(tensors)
    per = -(-len(names) // shards)
    weight_map = {}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        chunk = {n: tensors[n].contiguous() for n in names[i * per:(i + 1) * per]}
        save_file(chunk, str(path / file), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(chunk, file)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return path
