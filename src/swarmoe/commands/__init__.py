"""CLI commands by area. Each module defines `register(app)`; keep imports of torch, openai
and friends inside the command bodies so `swarmoe --help` stays fast."""

from __future__ import annotations

import importlib
import pkgutil

import typer


def register_all(app: typer.Typer) -> None:
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        module.register(app)
