"""The `swarmoe` command line: one typer app; each area registers its commands from
`swarmoe.commands.*`, which import their heavy dependencies only when a command runs."""

from __future__ import annotations

import typer

from swarmoe.commands import register_all

app = typer.Typer(
    name="swarmoe",
    help="Kimi K2.5-style MoE runtime and agent swarm.",
    no_args_is_help=True,
    add_completion=False,
)
register_all(app)


def main() -> None:
    app()
