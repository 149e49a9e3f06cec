"""Checkpoints shipped inside the package, loaded by name wherever a checkpoint path is accepted.

`resolve_checkpoint("swarmoe-mini")` is the packaged directory `checkpoints/swarmoe-mini/`;
an existing local path always wins over a shipped name, and anything else comes back as a
`Path` for the caller to report (`load_config` says "no config.json at ..."). `local_checkpoint`
is the decision the commands make for `--model`: a checkpoint to run in-process, or `None` for
a model name on an OpenAI-compatible endpoint.

This module imports nothing but the standard library, so the loader, the engine and the CLI can
all use it without pulling each other in.
"""

from __future__ import annotations

import os
from pathlib import Path

#: Where the shipped checkpoints live: one directory per name.
CHECKPOINTS_DIR = Path(__file__).resolve().parent

#: The release layout every shipped checkpoint must have.
RELEASE_FILES: tuple[str, ...] = (
    "config.json",
    "model.safetensors",
    "tiktoken.model",
    "tokenizer_config.json",
    "chat_template.jinja",
)

#: Shipped checkpoints: name -> the files its directory under `CHECKPOINTS_DIR` must hold.
#: A sharded checkpoint may stand `model.safetensors.index.json` (and its shards) in for
#: `model.safetensors`.
SHIPPED: dict[str, tuple[str, ...]] = {
    "swarmoe-mini": RELEASE_FILES,
}

_WEIGHTS = "model.safetensors"
_INDEX = "model.safetensors.index.json"


class MissingCheckpointError(FileNotFoundError):
    """A shipped checkpoint name whose packaged files are not there; the message names them."""


def shipped_names() -> list[str]:
    """The names `resolve_checkpoint` knows, sorted."""
    return sorted(SHIPPED)


def shipped_dir(name: str) -> Path:
    """The packaged directory of a shipped checkpoint (which may not exist yet)."""
    if name not in SHIPPED:
        raise KeyError(f"{name!r} is not a shipped checkpoint (shipped: {', '.join(shipped_names())})")
    return CHECKPOINTS_DIR / name


def missing_files(name: str) -> list[str]:
    """The files of shipped checkpoint `name` that its packaged directory lacks."""
    directory = shipped_dir(name)
    missing = []
    for file in SHIPPED[name]:
        if (directory / file).is_file():
            continue
        if file == _WEIGHTS and (directory / _INDEX).is_file():
            continue  # sharded weights; the loader checks the shards the index names
        missing.append(file)
    return missing


def resolve_checkpoint(spec: str | os.PathLike[str]) -> Path:
    """The directory a checkpoint spec means.

    An existing local path wins; a shipped name (`swarmoe-mini`) is its packaged directory, and
    raises `MissingCheckpointError` naming the absent files if that is incomplete; anything else
    is returned as `Path(spec)`, unchanged, for the caller's own handling.
    """
    path = Path(spec)
    if path.exists():
        return path
    name = os.fspath(spec)
    if name not in SHIPPED:
        return path
    missing = missing_files(name)
    if missing:
        directory = shipped_dir(name)
        raise MissingCheckpointError(
            f"shipped checkpoint {name!r} is incomplete: {directory} lacks {', '.join(missing)} "
            "(reinstall swarmoe, or pass a checkpoint directory instead)"
        )
    return shipped_dir(name)


def local_checkpoint(spec: str | os.PathLike[str] | None) -> Path | None:
    """The checkpoint directory `--model SPEC` names, or None when SPEC is a model name for an
    endpoint.

    A local path that exists (a checkpoint directory, or something the loader will reject with
    a message that names it) and a shipped name are checkpoints; any other string, such as
    `kimi-k2.5` or `moonshotai/Kimi-K2.5`, goes to the API. A shipped name with files missing
    raises `MissingCheckpointError`.
    """
    if spec is None or os.fspath(spec) == "":
        return None
    path = Path(spec)
    if path.exists() or os.fspath(spec) in SHIPPED:
        return resolve_checkpoint(spec)
    return None


__all__ = [
    "CHECKPOINTS_DIR",
    "RELEASE_FILES",
    "SHIPPED",
    "MissingCheckpointError",
    "local_checkpoint",
    "missing_files",
    "resolve_checkpoint",
    "shipped_dir",
    "shipped_names",
]
