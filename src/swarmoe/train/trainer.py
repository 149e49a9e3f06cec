"""The training loop behind `swarmoe train`: from scratch or from a release checkpoint, full
or LoRA, with K2's expert balancing, AdamW or Muon(+QK-clip), resumable to the bit.

A run directory holds `log.jsonl` (one line per step), `step-NNNNNN/` checkpoints (each a
release-layout checkpoint plus the resumable state: float32 weights, optimizer, schedule, data
position, RNG) and, at the end, the final checkpoint in the directory itself, so `--out DIR`
is what `load_model(DIR)`, `LLM(DIR)` and `swarmoe serve --model DIR` take.
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from swarmoe.config import load_config, parse_config
from swarmoe.model.kimi import build_model
from swarmoe.model.loader import load_model
from swarmoe.model.saver import save_checkpoint
from swarmoe.text import Tokenizer
from swarmoe.text.chat import ChatTemplate
from swarmoe.train.balance import LoadBalancer, summarize
from swarmoe.train.data import Batch, Batches, load_examples
from swarmoe.train.state import load_state, save_state

LOG_FILE = "log.jsonl"
OPTIONS_FILE = "train_options.json"


class TrainError(ValueError):
    """A run that cannot start as asked; the message says what to change."""


@dataclass
class TrainOptions:
    """What `swarmoe train` takes; see docs/training.md for each field."""

    data: Path
    out: Path
    steps: int
    config: Path | None = None
    init_from: Path | None = None
    tokenizer: Path | None = None
    batch_size: int = 8
    seq_len: int = 512
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int | None = None
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    optimizer: str = "adamw"
    balance: bool = True
    bias_update_rate: float = 1e-3
    balance_loss_alpha: float = 0.0
    qk_clip: float | None = None
    lora: int = 0
    lora_alpha: float | None = None
    seed: int = 0
    save_every: int = 100
    keep_checkpoints: int = 2
    save_dtype: str = "bfloat16"
    autocast: bool | None = None
    device: str = "cpu"
    resume: bool = False

    def to_json(self) -> dict[str, Any]:
        return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}


@dataclass
class StepRecord:
    step: int
    loss: float
    lr: float
    tokens: int
    tokens_per_s: float
    grad_norm: float
    balance: dict[str, float | int] = field(default_factory=dict)
    layers: list[dict[str, float | int]] = field(default_factory=list)
    max_logit: float | None = None
    clipped_heads: int | None = None
    balance_loss: float | None = None


@dataclass
class TrainResult:
    out: Path
    steps: int
    interrupted: bool
    records: list[StepRecord]


def native_bf16(device: str) -> bool:
    """Whether bf16 autocast pays here (the Trainer's default): CUDA with bf16, or a CPU that
    multiplies bf16 natively (AVX512-BF16 or AMX); elsewhere bf16 GEMMs are emulated and slower
    than float32. On an AMX CPU autocast measured slower than float32 while the routed experts
    ran as a loop of small GEMMs and attention fell back to SDPA's math kernel; with padded
    batched expert GEMMs and the flash kernel it is at least as fast (2 cores, hidden 256,
    batch 4 x 2048: ~790 vs ~780 tok/s on a loaded machine) and 1.3x faster at hidden 512 with
    64 experts (benchmarks/train.py), so the default stays on."""
    if device.startswith("cuda"):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return bool(_cpu_flags() & {"avx512_bf16", "amx_bf16"})


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def learning_rate(step: int, opts: TrainOptions) -> float:
    """Linear warmup, then cosine decay to `min_lr_ratio` of the peak."""
    warmup = opts.warmup_steps if opts.warmup_steps is not None else min(100, opts.steps // 10)
    if step < warmup:
        return opts.lr * (step + 1) / warmup
    span = max(opts.steps - warmup, 1)
    progress = min((step - warmup) / span, 1.0)
    floor = opts.lr * opts.min_lr_ratio
    return floor + (opts.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def init_weights(model: nn.Module, std: float) -> None:
    """Fresh weights: normal(0, std) matrices and embeddings, unit norms, zero biases."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0 if "norm" in name else 0.0)
            else:
                p.normal_(0.0, std)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.zero_()


class Trainer:
    """One run. `run()` trains to `opts.steps`, saving every `save_every` steps, at the end and
    on Ctrl-C (SIGINT / SIGTERM finish the step under way, save, and return)."""

    def __init__(self, opts: TrainOptions, *, on_step: Callable[[StepRecord], None] | None = None):
        self.opts = opts
        self.on_step = on_step
        _check_options(opts)
        self.device = torch.device(opts.device)
        self.out = Path(opts.out)
        self.out.mkdir(parents=True, exist_ok=True)
        resume_dir = latest_checkpoint(self.out) if opts.resume else None
        if opts.resume and resume_dir is None:
            raise TrainError(f"--resume: no checkpoint under {self.out} to resume from")
        self.source = Path(opts.init_from) if opts.init_from else None
        self.config = self._config()
        self.tokenizer_dir = self._tokenizer_dir()
        self.tokenizer = Tokenizer.from_pretrained(self.tokenizer_dir)
        vocab = parse_config(self.config).text.vocab_size
        if len(self.tokenizer) > vocab:
            raise TrainError(
                f"the tokenizer in {self.tokenizer_dir} has {len(self.tokenizer)} tokens but the "
                f"config's vocab_size is {vocab}: set vocab_size >= {len(self.tokenizer)}")
        torch.manual_seed(opts.seed)
        self.model = self._model()
        self.lora = opts.lora > 0
        if self.lora:
            from swarmoe.train.lora import apply_lora

            apply_lora(self.model, opts.lora, opts.lora_alpha)
        self.model.to(self.device).train()
        self.examples = load_examples(opts.data, self.tokenizer, ChatTemplate.from_pretrained(
            self.tokenizer_dir), opts.seq_len)
        if not self.examples:
            raise TrainError(f"{opts.data} gave no example with a token to learn")
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.batches = Batches(self.examples, opts.batch_size, opts.seq_len, opts.seed, pad)
        from swarmoe.train.optim import build_optimizer

        self.optimizer = build_optimizer(self.model, opts.optimizer, opts.lr, opts.weight_decay)
        self.balancer = LoadBalancer(self.model, gamma=opts.bias_update_rate,
                                     alpha=opts.balance_loss_alpha,
                                     update_bias=opts.balance and not self.lora)
        tau = opts.qk_clip if opts.qk_clip is not None else (100.0 if opts.optimizer == "muon" else 0.0)
        self.qk_clip = None
        if tau > 0 and not self.lora:
            from swarmoe.train.qk_clip import QKClip

            self.qk_clip = QKClip(self.model, tau)
        self.autocast = native_bf16(opts.device) if opts.autocast is None else opts.autocast
        self.step = 0
        if resume_dir is not None:
            self._restore(resume_dir)
        else:
            _write_json(self.out / OPTIONS_FILE, opts.to_json())
            (self.out / LOG_FILE).write_text("")

    # --- setup -------------------------------------------------------------------------------

    def _config(self) -> dict[str, Any]:
        opts = self.opts
        if self.source is not None:
            raw = json.loads((self.source / "config.json").read_text())
        else:
            raw = json.loads(Path(opts.config).read_text())  # type: ignore[arg-type]
        try:
            load_config(raw)
        except ValueError as exc:
            raise TrainError(f"config: {exc}") from None
        return _transformers_loadable(raw)

    def _tokenizer_dir(self) -> Path:
        for candidate in (self.opts.tokenizer, self.source):
            if candidate is not None and (Path(candidate) / "tiktoken.model").is_file():
                return Path(candidate)
        if self.opts.tokenizer is not None:
            raise TrainError(f"--tokenizer {self.opts.tokenizer} holds no tiktoken.model")
        raise TrainError("training from a config needs --tokenizer DIR "
                         "(make one with `swarmoe train-tokenizer`)")

    def _model(self) -> nn.Module:
        if self.source is not None:
            return load_model(self.source, dtype=torch.float32, device="cpu")
        model = build_model(parse_config(self.config))
        init_weights(model, float(_text(self.config).get("initializer_range", 0.02)))
        return model

    # --- the loop ----------------------------------------------------------------------------

    def run(self) -> TrainResult:
        records: list[StepRecord] = []
        interrupted = False
        with _stop_signals() as stop:
            while self.step < self.opts.steps:
                record = self.train_step()
                records.append(record)
                self._log(record)
                if self.on_step is not None:
                    self.on_step(record)
                if stop():
                    interrupted = True
                    break
                if self.step % self.opts.save_every == 0 and self.step < self.opts.steps:
                    self.save()
        final = self.save()
        if not interrupted:
            self._publish(final)
        return TrainResult(self.out, self.step, interrupted, records)

    def train_step(self, batch: Batch | None = None) -> StepRecord:
        """One optimizer step on `batch`, by default the run's next one."""
        opts = self.opts
        started = time.perf_counter()
        batch = batch if batch is not None else self.batches.next()
        lr = learning_rate(self.step, opts)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        ids = batch.input_ids.to(self.device)
        labels = batch.labels.to(self.device)
        self.balancer.begin(batch.attention_mask)
        # Rows are right-padded: causal attention alone keeps real tokens off the padding.
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            logits = self.model(ids)
        loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), labels.view(-1),
                               ignore_index=-100)
        balance_loss = self.balancer.loss()
        total = loss + balance_loss if balance_loss is not None else loss
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        params = [p for p in self.model.parameters() if p.requires_grad]
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, opts.grad_clip))
        self.optimizer.step()
        if self.qk_clip is not None:
            self.qk_clip.after_step()
        loads = self.balancer.step()
        self.step += 1
        elapsed = time.perf_counter() - started
        return StepRecord(
            step=self.step, loss=float(loss.detach()), lr=lr, tokens=batch.tokens,
            tokens_per_s=batch.tokens / elapsed, grad_norm=grad_norm,
            balance=summarize(loads), layers=[x.as_dict() for x in loads],
            max_logit=self.qk_clip.max_logit if self.qk_clip is not None else None,
            clipped_heads=self.qk_clip.clipped_heads if self.qk_clip is not None else None,
            balance_loss=float(balance_loss.detach()) if balance_loss is not None else None,
        )

    # --- checkpoints -------------------------------------------------------------------------

    def save(self) -> Path:
        """Write `step-NNNNNN/` (release layout, or the adapter under LoRA, plus resumable
        state) and drop the oldest beyond `keep_checkpoints`."""
        directory = self.out / f"step-{self.step:06d}"
        tmp = self.out / f".step-{self.step:06d}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        self._write_model(tmp)
        save_state(tmp, {
            "step": self.step,
            "model": {n: t for n, t in self.model.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "data": self.batches.state_dict(),
            "rng": torch.get_rng_state(),
        })
        shutil.rmtree(directory, ignore_errors=True)
        tmp.replace(directory)
        for old in sorted(self.out.glob("step-*"))[: -max(self.opts.keep_checkpoints, 1)]:
            shutil.rmtree(old, ignore_errors=True)
        return directory

    def _write_model(self, directory: Path) -> None:
        if self.lora:
            from swarmoe.train.lora import save_adapter

            save_adapter(self.model, directory, base=self.source)
            return
        dtype = getattr(torch, self.opts.save_dtype)
        save_checkpoint(self.model, self.config, directory, dtype=dtype,
                        tokenizer_from=self.tokenizer_dir)

    def _publish(self, checkpoint: Path) -> None:
        """Copy the final checkpoint's model files (not its resumable state) into `out`."""
        for file in checkpoint.iterdir():
            if file.is_file() and not file.name.startswith("trainer_state"):
                shutil.copyfile(file, self.out / file.name)

    def _restore(self, directory: Path) -> None:
        state = load_state(directory)
        saved = json.loads((self.out / OPTIONS_FILE).read_text()) if (
            self.out / OPTIONS_FILE).is_file() else {}
        changed = {k for k in ("optimizer", "lora", "batch_size", "seq_len", "seed", "data")
                   if k in saved and saved[k] != self.opts.to_json()[k]}
        if changed:
            raise TrainError(f"--resume with different {', '.join(sorted(changed))} than the run "
                             f"in {self.out}; start a new --out instead")
        missing, unexpected = self.model.load_state_dict(state["model"], strict=False)
        if missing or unexpected:
            raise TrainError(f"checkpoint {directory} does not fit the model "
                             f"(missing {missing[:4]}, unexpected {unexpected[:4]})")
        self.optimizer.load_state_dict(state["optimizer"])
        self.batches.load_state_dict(state["data"])
        torch.set_rng_state(state["rng"])
        self.step = int(state["step"])
        log = self.out / LOG_FILE
        if log.is_file():  # steps logged after the checkpoint are redone: forget them
            lines = [x for x in log.read_text().splitlines()
                     if x.strip() and json.loads(x)["step"] <= self.step]
            log.write_text("".join(x + "\n" for x in lines))

    def _log(self, record: StepRecord) -> None:
        with open(self.out / LOG_FILE, "a") as f:
            f.write(json.dumps(asdict(record)) + "\n")


def latest_checkpoint(out: Path) -> Path | None:
    found = sorted(p for p in Path(out).glob("step-*") if (p / "trainer_state.json").is_file())
    return found[-1] if found else None


def train(opts: TrainOptions, on_step: Callable[[StepRecord], None] | None = None) -> TrainResult:
    return Trainer(opts, on_step=on_step).run()


def _check_options(opts: TrainOptions) -> None:
    if (opts.config is None) == (opts.init_from is None):
        raise TrainError("give exactly one of --config (train from scratch) or --init-from "
                         "(fine-tune a checkpoint)")
    for name, path in (("--config", opts.config), ("--data", opts.data)):
        if path is not None and not Path(path).is_file():
            raise TrainError(f"{name} {path} does not exist")
    if opts.init_from is not None and not (Path(opts.init_from) / "config.json").is_file():
        raise TrainError(f"--init-from {opts.init_from} is not a checkpoint (no config.json)")
    for name in ("steps", "batch_size", "seq_len", "save_every"):
        if getattr(opts, name) < 1:
            raise TrainError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(opts, name)}")
    if opts.optimizer not in ("adamw", "muon"):
        raise TrainError(f"--optimizer must be adamw or muon, got {opts.optimizer!r}")
    if opts.lr <= 0:
        raise TrainError(f"--lr must be > 0, got {opts.lr}")
    if opts.lora < 0:
        raise TrainError(f"--lora must be >= 1 (or 0 for full fine-tuning), got {opts.lora}")
    if opts.lora and opts.init_from is None:
        raise TrainError("--lora fine-tunes a checkpoint: give --init-from")
    if opts.save_dtype not in ("float32", "bfloat16", "float16"):
        raise TrainError(f"--save-dtype must be float32, bfloat16 or float16, got {opts.save_dtype!r}")


def _text(config: dict[str, Any]) -> dict[str, Any]:
    return config.get("text_config", config)


def _transformers_loadable(raw: dict[str, Any]) -> dict[str, Any]:
    """The config as saved: a K2 text config (`kimi_k2`, which transformers has no class for)
    becomes `deepseek_v3`, the same architecture, so `DeepseekV3ForCausalLM.from_pretrained`
    reads the checkpoint as it is, per-expert tensors included."""
    raw = json.loads(json.dumps(raw))
    if raw.get("model_type") == "kimi_k2":
        raw["model_type"] = "deepseek_v3"
        raw["architectures"] = ["DeepseekV3ForCausalLM"]
        raw.pop("auto_map", None)
    return raw


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2))


@contextmanager
def _stop_signals() -> Iterator[Callable[[], bool]]:
    """SIGINT / SIGTERM ask the loop to stop after the step under way; a second SIGINT
    interrupts at once."""
    asked: list[int] = []

    def handler(signum: int, frame: object) -> None:
        if asked and signum == signal.SIGINT:
            raise KeyboardInterrupt
        asked.append(signum)

    try:
        previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread: no signal handling
        yield lambda: False
        return
    try:
        yield lambda: bool(asked)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
