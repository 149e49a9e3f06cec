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
from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
from safetensors import safe_open
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
