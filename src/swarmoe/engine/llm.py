"""`LLM`: the offline API over the engine — continuous batching, paged latent cache, experts
that fit a memory budget. Shaped like vLLM's `LLM` so users feel at home.
"""

from __future__ import annotations

import itertools
import json
import time
from collections import Counter
from collections.abc import Iterable
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from swarmoe.checkpoints import resolve_checkpoint
from swarmoe.config import load_config
from swarmoe.engine.experts import ExpertCache, load_model_with_expert_budget
from swarmoe.engine.kv_cache import BlockManager, LatentCache, cache_dtype
from swarmoe.engine.runner import ModelRunner
from swarmoe.engine.sampling import SamplingParams, sample
from swarmoe.engine.scheduler import Scheduler
from swarmoe.engine.sequence import Sequence, Status
from swarmoe.model.loader import load_model

Prompt = str | dict[str, Any]
_MEDIA_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    logprobs: list[dict[int, float]] | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: dict[str, float] = field(default_factory=dict)


class LLM:
    """Load a checkpoint and generate from batches of prompts.

    `expert_memory_gb` keeps at most that many GB of routed-expert weights resident; the rest
    stay on disk and are read on demand (tokens are identical with or without a budget).
    `kv_cache_dtype` (default: the model dtype) stores the latent cache narrower, e.g.
    "bfloat16" under a float32 model: half the cache memory, latents rounded; "fp8"
    (float8_e4m3fn, two float32 scales per token and layer) about halves a bf16 cache again, lossy.
    """

    def __init__(
        self,
        model: str | Path,
        dtype: str | torch.dtype = "float32",
        device: str = "cpu",
        expert_memory_gb: float | None = None,
        max_num_seqs: int = 64,
        max_model_len: int | None = None,
        max_num_batched_tokens: int = 2048,
        block_size: int = 16,
        cache_memory_gb: float = 2.0,
        enable_prefix_caching: bool = True,
        kv_cache_dtype: str | torch.dtype | None = None,
    ) -> None:
        store_dtype = cache_dtype(kv_cache_dtype)  # checked before the weights load
        self.path = resolve_checkpoint(model)  # a directory, or a shipped name: "swarmoe-mini"
        self.config = load_config(self.path)
        text = self.config.text
        self.expert_cache: ExpertCache | None = None
        if expert_memory_gb is None:
            self.model = load_model(self.path, dtype=dtype, device=device)
        else:
            self.model, self.expert_cache = load_model_with_expert_budget(
                self.path, expert_memory_gb, dtype=dtype, device=device
            )
        self.tokenizer = checkpoint_tokenizer(self.path)
        self.max_model_len = min(max_model_len or text.max_position_embeddings, text.max_position_embeddings)
        if max_num_batched_tokens < 1 or max_num_seqs < 1 or block_size < 1:
            raise ValueError("max_num_batched_tokens, max_num_seqs and block_size must be positive")
        if store_dtype is None:  # a narrower cache rounds the latents
            store_dtype = getattr(self.model, "language_model", self.model).model.embed_tokens.weight.dtype
        width = text.kv_lora_rank + text.qk_rope_head_dim
        per_token = LatentCache.bytes_per_token(text.num_hidden_layers, width, store_dtype)
        wanted = max_num_seqs * -(-self.max_model_len // block_size)
        affordable = int(cache_memory_gb * 1e9 // (per_token * block_size))
        num_blocks = max(min(wanted, affordable), -(-self.max_model_len // block_size))
        self.cache = LatentCache(text.num_hidden_layers, num_blocks, block_size, width, store_dtype, device,
                                 kv_lora_rank=text.kv_lora_rank)
        self.blocks = BlockManager(num_blocks, block_size, enable_prefix_caching)
        self.scheduler = Scheduler(self.blocks, max_num_seqs, max_num_batched_tokens)
        self.runner = ModelRunner(self.model, self.cache)
        self.eos_ids = _eos_ids(self.path, self.config)
        self._sequences: dict[str, list[Sequence]] = {}
        self._prompts: dict[str, str | None] = {}
        self._counter = itertools.count()
        self.batch_sizes: Counter[int] = Counter()
        """Engine steps by the number of sequences they computed (decodes and prefill chunks
        together): how wide continuous batching ran. Only counted, never read by the engine."""

    # -- requests ---------------------------------------------------------------------------

    def add_request(
        self, prompt: Prompt, params: SamplingParams | None = None, request_id: str | None = None
    ) -> str:
        """Queue one request; raises ValueError naming the bad field, leaving others untouched."""
        return self._enqueue(self._prompt(prompt), params, request_id)

    def _enqueue(
        self,
        prepared: tuple[list[int], str | None, torch.Tensor | None],
        params: SamplingParams | None,
        request_id: str | None,
    ) -> str:
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError("sampling_params must be a SamplingParams")
        ids, text, embeds = prepared
        request_id = request_id or f"req-{next(self._counter)}"
        if request_id in self._sequences:
            raise ValueError(f"request_id {request_id!r} is already in use")
        seq = Sequence(request_id, ids, params, prompt_embeds=embeds)
        if params.seed is not None:
            seq.generator = torch.Generator().manual_seed(params.seed)
        self._sequences[request_id] = [seq]
        self._prompts[request_id] = text
        self.scheduler.add(seq)
        return request_id

    def _prompt(self, prompt: Prompt) -> tuple[list[int], str | None, torch.Tensor | None]:
        text = None
        media = {}
        if isinstance(prompt, str):
            text, ids = prompt, self._encode(prompt)
        elif isinstance(prompt, dict):
            unknown = set(prompt) - {"prompt", "prompt_token_ids", "multi_modal_data"}
            if unknown:
                raise ValueError(f"prompt has unknown key(s): {', '.join(sorted(unknown))}")
            if "prompt_token_ids" in prompt:
                ids = prompt["prompt_token_ids"]
                if isinstance(ids, torch.Tensor):
                    ids = ids.tolist()
                if not isinstance(ids, list) or not all(isinstance(i, int) for i in ids):
                    raise ValueError("prompt_token_ids must be a list of integers")
            elif "prompt" in prompt:
                text, ids = prompt["prompt"], self._encode(prompt["prompt"])
            else:
                raise ValueError("prompt needs 'prompt' or 'prompt_token_ids'")
            media = prompt.get("multi_modal_data") or {}
        else:
            raise ValueError(f"prompt must be a string or a dict, got {type(prompt).__name__}")
        if not ids:
            raise ValueError("prompt is empty")
        vocab = self.config.text.vocab_size
        bad = [i for i in ids if not 0 <= i < vocab and i not in self._media_ids()]
        if bad:
            raise ValueError(f"prompt_token_ids contains {bad[0]}, outside the vocabulary [0, {vocab})")
        if len(ids) >= self.max_model_len:
            raise ValueError(
                f"prompt is {len(ids)} tokens, which leaves no room in max_model_len={self.max_model_len}"
            )
        need = self.blocks.blocks_needed(len(ids) + 1)
        if need > len(self.blocks.blocks):
            raise ValueError(f"prompt is {len(ids)} tokens, more than the cache holds")
        embeds = self._embed_media(ids, media) if media else None
        return ids, text, embeds

    def _media_ids(self) -> set[int]:
        c = self.config
        return {c.image_token_id, c.video_token_id} - {None} if c.is_multimodal else set()

    def _embed_media(self, ids: list[int], media: dict[str, Any]) -> torch.Tensor:
        if not self.config.is_multimodal:
            raise ValueError("multi_modal_data given, but this checkpoint has no vision tower")
        unknown = set(media) - set(_MEDIA_KEYS)
        if unknown:
            raise ValueError(f"multi_modal_data has unknown key(s): {', '.join(sorted(unknown))}")
        device = self.runner.device
        tensors = {k: v.to(device) for k, v in media.items() if v is not None}
        with torch.inference_mode():
            return self.model.embed(torch.tensor([ids], device=device), **tensors)[0]

    def _encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise ValueError("text prompts need a tokenizer (tiktoken.model) in the checkpoint")
        if not isinstance(text, str):
            raise ValueError("prompt must be a string")
        return self.tokenizer.encode(text)

    def abort(self, request_id: str) -> None:
        for seq in self._sequences.get(request_id, []):
            if not seq.is_finished:
                seq.finish_reason = "abort"
                self.scheduler.finish(seq)

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.has_work

    # -- stepping ---------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one engine step; returns the state of every request that moved."""
        work = self.scheduler.schedule()
        if not work:
            return []
        self.batch_sizes[len(work)] += 1
        logits = self.runner.step(work).float().cpu()  # sampling (seeded generators) runs on the CPU
        moved: dict[str, None] = {}
        for row, w in zip(logits, work, strict=True):
            seq = w.seq
            seq.num_computed = w.end
            if seq.num_computed < seq.num_tokens:
                continue  # a prefill chunk; more to come
            moved[seq.request_id] = None
            first = not seq.output_ids
            self._append(seq, row)
            if first and seq.params.n > 1 and seq.index == 0:
                self._fork(seq, row)
        return [self._output(rid) for rid in moved]

    def _append(self, seq: Sequence, logits: torch.Tensor) -> None:
        token, top = sample(logits, seq.params, seq.generator)
        now = time.monotonic()
        seq.first_token_time = seq.first_token_time or now
        seq.output_ids.append(token)
        if top is not None:
            seq.logprobs.append(top)
        if self.tokenizer is not None:
            seq.text = self.tokenizer.decode(seq.output_ids, skip_special_tokens=True)
        reason = self._finish_reason(seq, token)
        if reason:
            seq.finish_reason = reason
            seq.finish_time = now
            self.scheduler.finish(seq)

    def _finish_reason(self, seq: Sequence, token: int) -> str | None:
        p = seq.params
        if not p.ignore_eos and token in self.eos_ids:
            return "stop"
        if token in p.stop_token_ids:
            return "stop"
        if p.stop:
            for s in p.stop:
                cut = seq.text.find(s)
                if cut >= 0:
                    seq.text = seq.text[:cut]
                    return "stop"
        if p.max_tokens is not None and len(seq.output_ids) >= p.max_tokens:
            return "length"
        if seq.num_tokens >= self.max_model_len:
            return "length"
        return None

    def _fork(self, parent: Sequence, logits: torch.Tensor) -> None:
        """n > 1: siblings share the parent's prompt cache and sample their own first token."""
        for index in range(1, parent.params.n):
            child = Sequence(parent.request_id, parent.prompt_ids, parent.params,
                             prompt_embeds=parent.prompt_embeds, index=index)
            if parent.params.seed is not None:
                child.generator = torch.Generator().manual_seed(parent.params.seed + index)
            self._sequences[parent.request_id].append(child)
            if parent.is_finished or not self.blocks.fork(parent, child, self.cache):
                self.scheduler.add(child)  # recompute from scratch when no block is free
                continue
            child.num_computed = len(child.prompt_ids)
            child.status = Status.RUNNING
            self.scheduler.running.append(child)
            self._append(child, logits)

    def _output(self, request_id: str) -> RequestOutput:
        seqs = self._sequences[request_id]
        first = seqs[0]
        n = first.params.n
        finished = len(seqs) == n and all(s.is_finished for s in seqs)
        outputs = [
            CompletionOutput(s.index, s.text, list(s.output_ids), s.finish_reason,
                             list(s.logprobs) if s.params.logprobs is not None else None)
            for s in seqs
        ]
        metrics = {"arrival": first.arrival}
        if first.first_token_time:
            metrics["time_to_first_token"] = first.first_token_time - first.arrival
        if finished:
            metrics["latency"] = max(s.finish_time or time.monotonic() for s in seqs) - first.arrival
            self._sequences.pop(request_id)
            prompt = self._prompts.pop(request_id)
        else:
            prompt = self._prompts[request_id]
        return RequestOutput(request_id, prompt, list(first.prompt_ids), outputs, finished, metrics)

    # -- offline API ------------------------------------------------------------------------

    def generate(
        self,
        prompts: Prompt | Iterable[Prompt],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Run every prompt to completion in one continuously batched loop, in input order."""
        if isinstance(prompts, str | dict):
            prompts = [prompts]
        prompts = list(prompts)
        if isinstance(sampling_params, Seq):
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError("sampling_params must be one object or one per prompt")
        else:
            params = [sampling_params or SamplingParams()] * len(prompts)
        # Validate (and encode any media of) the whole batch once, before queueing any of it.
        prepared = [self._prompt(p) for p in prompts]
        ids = [self._enqueue(pp, sp, None) for pp, sp in zip(prepared, params, strict=True)]
        done: dict[str, RequestOutput] = {}
        while len(done) < len(ids):
            for out in self.step():
                if out.finished:
                    done[out.request_id] = out
        return [done[i] for i in ids]

    def chat_backend(self):  # -> swarmoe.server.local_backend.LocalChatBackend
        """The swarm's chat backend over this engine: `Swarm(model=LLM(...))` calls this.

        Imported lazily: the chat layer sits above the engine, and the swarm below knows
        neither. From then on the backend's engine thread drives this LLM.
        """
        from swarmoe.server.local_backend import local_backend

        return local_backend(self)

    def stats(self) -> dict[str, float]:
        """Cache blocks used / free, prefix hits, preemptions, engine steps and their batch
        widths (`batch_sizes` has the histogram), and expert-cache counters."""
        steps = sum(self.batch_sizes.values())
        out: dict[str, float] = {
            "blocks_total": len(self.blocks.blocks),
            "blocks_used": self.blocks.num_used,
            "blocks_free": self.blocks.num_free,
            "prefix_block_hits": self.blocks.hits,
            "prefix_block_lookups": self.blocks.lookups,
            "preemptions": self.scheduler.preemptions,
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting),
            "steps": steps,
            "mean_batch": sum(n * c for n, c in self.batch_sizes.items()) / steps if steps else 0.0,
            "max_batch": max(self.batch_sizes, default=0),
        }
        if self.expert_cache is not None:
            out.update(self.expert_cache.stats())
        return out


def checkpoint_tokenizer(path: Path):  # -> Tokenizer | None
    """The checkpoint's tokenizer, None when it ships no `tiktoken.model`."""
    if not (path / "tiktoken.model").is_file():
        return None
    from swarmoe.text import Tokenizer

    return Tokenizer.from_pretrained(path)


def _eos_ids(path: Path, config) -> set[int]:
    ids: set[int] = set()
    for source in (config.text.eos_token_id, _generation_eos(path)):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, list):
            ids.update(i for i in source if isinstance(i, int))
    return ids


def _generation_eos(path: Path) -> int | list[int] | None:
    file = path / "generation_config.json"
    if not file.is_file():
        return None
    return json.loads(file.read_text()).get("eos_token_id")
