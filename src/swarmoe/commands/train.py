"""`swarmoe train` (train or fine-tune a K2-architecture model) and `swarmoe train merge`
(a LoRA adapter folded into its base, written as a release-layout checkpoint)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

train_app = typer.Typer(
    help="Train or fine-tune a K2-architecture MoE model (see docs/training.md).",
    invoke_without_command=True,
    no_args_is_help=False,
)


def register(app: typer.Typer) -> None:
    app.add_typer(train_app, name="train")


@train_app.callback()
def train(
    ctx: typer.Context,
    data: Annotated[Path | None, typer.Option(help="JSONL: {'text': ...} or {'messages': [...], 'tools': [...]} lines.")] = None,
    out: Annotated[Path | None, typer.Option(help="Run directory: checkpoints, log.jsonl, the final model.")] = None,
    steps: Annotated[int | None, typer.Option(help="Optimizer steps.")] = None,
    config: Annotated[Path | None, typer.Option(help="A K2 text config.json, to train from scratch.")] = None,
    init_from: Annotated[Path | None, typer.Option(help="A release-layout checkpoint to fine-tune.")] = None,
    tokenizer: Annotated[Path | None, typer.Option(help="Tokenizer directory (default: --init-from's).")] = None,
    batch_size: Annotated[int, typer.Option(help="Sequences per step.")] = 8,
    seq_len: Annotated[int, typer.Option(help="Tokens per sequence (longer ones are cut).")] = 512,
    lr: Annotated[float, typer.Option(help="Peak learning rate (warmup, then cosine).")] = 3e-4,
    warmup_steps: Annotated[int | None, typer.Option(help="Warmup steps (default min(100, steps/10)).")] = None,
    weight_decay: Annotated[float, typer.Option(help="Decoupled weight decay of matrices.")] = 0.1,
    optimizer: Annotated[str, typer.Option(help="adamw, or muon (AdamW for embeddings, norms, head).")] = "adamw",
    balance: Annotated[bool, typer.Option("--balance/--no-balance", help="Auxiliary-loss-free bias update.")] = True,
    bias_update_rate: Annotated[float, typer.Option(help="γ of the bias update.")] = 1e-3,
    balance_loss: Annotated[float, typer.Option(help="α of the sequence-wise balance loss (0: off).")] = 0.0,
    qk_clip: Annotated[float | None, typer.Option(help="QK-clip threshold τ (default 100 with muon, off with adamw; 0: off).")] = None,
    lora: Annotated[int, typer.Option(help="LoRA rank on attention and shared experts (0: full fine-tuning).")] = 0,
    lora_alpha: Annotated[float | None, typer.Option(help="LoRA alpha (default: the rank).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of weights, data order and everything random.")] = 0,
    save_every: Annotated[int, typer.Option(help="Checkpoint every N steps (and at the end).")] = 100,
    save_dtype: Annotated[str, typer.Option(help="dtype of saved weights: bfloat16, float32, float16.")] = "bfloat16",
    autocast: Annotated[bool | None, typer.Option("--autocast/--no-autocast", help="bf16 autocast (default: where the hardware multiplies bf16 natively).")] = None,
    device: Annotated[str, typer.Option(help="cpu, or cuda where present.")] = "cpu",
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out from its last checkpoint.")] = False,
) -> None:
    """Train a K2-architecture model from a config, or fine-tune a checkpoint (full or LoRA)."""
    if ctx.invoked_subcommand is not None:
        return
    missing = [f"--{n}" for n, v in (("data", data), ("out", out), ("steps", steps)) if v is None]
    if missing:
        raise typer.BadParameter(f"swarmoe train needs {', '.join(missing)}")
    from swarmoe.train.trainer import Trainer, TrainError, TrainOptions

    opts = TrainOptions(
        data=data, out=out, steps=steps, config=config, init_from=init_from, tokenizer=tokenizer,  # type: ignore[arg-type]
        batch_size=batch_size, seq_len=seq_len, lr=lr, warmup_steps=warmup_steps,
        weight_decay=weight_decay, optimizer=optimizer, balance=balance,
        bias_update_rate=bias_update_rate, balance_loss_alpha=balance_loss, qk_clip=qk_clip,
        lora=lora, lora_alpha=lora_alpha, seed=seed, save_every=save_every, save_dtype=save_dtype,
        autocast=autocast, device=device, resume=resume,
    )
    try:
        with _Progress(steps) as progress:  # type: ignore[arg-type]
            trainer = Trainer(opts, on_step=progress.update)
            progress.start(trainer.step, len(trainer.examples), trainer.batches.dropped)
            result = trainer.run()
    except (TrainError, ValueError, FileNotFoundError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    where = f"{result.out}/step-{result.steps:06d}" if result.interrupted else str(result.out)
    typer.echo(f"{'stopped' if result.interrupted else 'done'} at step {result.steps}; "
               f"checkpoint in {where}" + (" (continue with --resume)" if result.interrupted else ""))


@train_app.command("merge")
def merge(
    base: Annotated[Path, typer.Option(help="The checkpoint the adapter was trained on.")],
    adapter: Annotated[Path, typer.Option(help="The adapter directory (a run's out or step-N).")],
    out: Annotated[Path, typer.Option(help="Where to write base + adapter (release layout).")],
) -> None:
    """Fold a LoRA adapter into its base and write a release-layout checkpoint."""
    from swarmoe.train.lora import merge_checkpoint

    try:
        path = merge_checkpoint(base, adapter, out)
    except (ValueError, FileNotFoundError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"wrote {path}")


class _Progress:
    """A live line (step, loss, tokens/s, lr, balance) on a terminal; a plain line per
    `every` steps elsewhere, so logs of background runs stay readable."""

    def __init__(self, steps: int) -> None:
        import sys

        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        self.console = Console(stderr=True)
        self.live = sys.stderr.isatty()
        self.every = max(1, steps // 50)
        self.progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[stats]}"), TimeRemainingColumn(), console=self.console,
            disable=not self.live,
        )
        self.task = self.progress.add_task("train", total=steps, stats="")

    def __enter__(self) -> _Progress:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(*exc)

    def start(self, step: int, examples: int, dropped: int) -> None:
        self.progress.update(self.task, completed=step)
        skipped = (f" ({dropped} skipped: no target token within --seq-len)" if dropped else "")
        self.console.print(f"{examples - dropped} training sequences{skipped}; "
                           f"starting at step {step}")

    def update(self, record) -> None:  # noqa: ANN001 - a StepRecord
        balance = record.balance.get("max_over_mean")
        stats = (f"loss {record.loss:.4f} · {record.tokens_per_s:,.0f} tok/s · lr {record.lr:.2e}"
                 + (f" · max/mean load {balance:.2f}" if balance is not None else "")
                 + (f" · max logit {record.max_logit:.1f}" if record.max_logit is not None else ""))
        self.progress.update(self.task, completed=record.step, stats=stats)
        if not self.live and (record.step % self.every == 0 or record.step == 1):
            self.console.print(f"step {record.step} · {stats}")
