"""A training run's resumable state, stored without pickle: tensors in safetensors, the rest JSON.

Optimizer and scheduler state dicts are nested dicts and lists of numbers, strings and tensors;
`flatten` moves every tensor into a flat name -> tensor map (the JSON keeps a reference to
it) so that a checkpoint loads with `safetensors` and `json` alone, as the loader's rule asks.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

STATE_TENSORS = "trainer_state.safetensors"
STATE_JSON = "trainer_state.json"
_REF = "__tensor__"


def flatten(value: Any, tensors: dict[str, torch.Tensor], path: str = "") -> Any:
    """`value` with each tensor replaced by a reference into `tensors` (filled in place)."""
    if isinstance(value, torch.Tensor):
        tensors[path] = value.detach().cpu().contiguous().clone()
        return {_REF: path}
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str | int):
                raise TypeError(f"state key {key!r} at {path or '<root>'} is not a str or int")
            # JSON keys are strings: remember int keys (optimizer state is keyed by param index).
            name = f"{key}" if isinstance(key, str) else f"#{key}"
            out[name] = flatten(item, tensors, f"{path}.{name}" if path else name)
        return out
    if isinstance(value, list | tuple):
        items = [flatten(v, tensors, f"{path}[{i}]") for i, v in enumerate(value)]
        return items if isinstance(value, list) else {"__tuple__": items}
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise TypeError(f"cannot store {type(value).__name__} at {path or '<root>'}")


def unflatten(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, dict):
        if set(value) == {_REF}:
            return tensors[value[_REF]]
        if set(value) == {"__tuple__"}:
            return tuple(unflatten(v, tensors) for v in value["__tuple__"])
        return {(int(k[1:]) if k.startswith("#") else k): unflatten(v, tensors)
                for k, v in value.items()}
    if isinstance(value, list):
        return [unflatten(v, tensors) for v in value]
    return value


def save_state(directory: Path, state: dict[str, Any]) -> None:
    tensors: dict[str, torch.Tensor] = {}
    tree = flatten(state, tensors)
    tmp = directory / f".{STATE_TENSORS}.tmp"
    save_file(tensors, str(tmp))
    tmp.replace(directory / STATE_TENSORS)
    tmp = directory / f".{STATE_JSON}.tmp"
    tmp.write_text(json.dumps(tree))
    tmp.replace(directory / STATE_JSON)


def load_state(directory: Path) -> dict[str, Any]:
    files = directory / STATE_JSON, directory / STATE_TENSORS
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"{directory} holds no resumable state (missing {', '.join(missing)})")
    return unflatten(json.loads(files[0].read_text()), load_file(str(files[1])))
