"""Kimi K2 / K2.5 networks: decoder layer, text model, causal LM, and the multimodal model.

Module attribute names follow the release tensor names, so a checkpoint maps onto
`state_dict()` keys one to one: K2 `model.layers.N...` / `lm_head`; K2.5 prefixes the text model
with `language_model.` and adds `vision_tower.` and `mm_projector.`.
"""

from __future__ import annotations

import torch
from torch import nn

from swarmoe.config import ModelConfig, TextConfig
from swarmoe.model.attention import MLAttention, RMSNorm, RotaryEmbedding
from swarmoe.model.linear import Linear
from swarmoe.model.moe import MLP, MoE


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp: nn.Module = (
            MoE(cfg, layer_idx) if cfg.is_moe_layer(layer_idx) else MLP(cfg.hidden_size, cfg.intermediate_size)
        )

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class KimiTextModel(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = RotaryEmbedding(cfg.rope, cfg.qk_rope_head_dim)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        check_token_ids(input_ids, self.cfg.vocab_size)
        return self.embed_tokens(input_ids)

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        b, t, _ = inputs_embeds.shape
        if position_ids is None:
            position_ids = torch.arange(t, device=inputs_embeds.device).expand(b, t)
        cos, sin = self.rotary(position_ids)
        mask = None if attention_mask is None else padding_mask(attention_mask, inputs_embeds.dtype)
        x = inputs_embeds
        for layer in self.layers:
            x = layer(x, cos, sin, mask)
        return self.norm(x)


def check_token_ids(input_ids: torch.Tensor, vocab_size: int) -> None:
    if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab_size):
        bad = input_ids[(input_ids < 0) | (input_ids >= vocab_size)][0].item()
        raise ValueError(f"input_ids contains token id {bad}, outside the vocabulary [0, {vocab_size})")


def padding_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive [B,1,T,T] mask: causal, and padded keys hidden. Finite so that rows of padded
    queries stay numbers rather than NaN."""
    b, t = attention_mask.shape
    device = attention_mask.device
    causal = torch.ones(t, t, dtype=torch.bool, device=device).tril()
    allowed = causal[None] & attention_mask.bool()[:, None, :]
    mask = torch.zeros(b, 1, t, t, dtype=dtype, device=device)
    return mask.masked_fill(~allowed[:, None], torch.finfo(dtype).min)


class KimiForCausalLM(nn.Module):
    """Kimi K2 / DeepSeek-V3 text model. `forward(input_ids) -> logits [B,T,vocab]`."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = KimiTextModel(cfg)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.model.embed(_as_batch(input_ids))
        return self.lm_head(self.model(inputs_embeds, position_ids, attention_mask))


def _as_batch(input_ids: torch.Tensor) -> torch.Tensor:
    if input_ids.dim() == 1:
        return input_ids[None]
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
    return input_ids


class KimiK25ForConditionalGeneration(nn.Module):
    """Kimi K2.5: MoonViT-3D tower + patch-merger projector + the K2 text model.

    Each image (or video chunk) is one `<|media_pad|>` run in `input_ids`, already expanded to
    that item's token count; the run is replaced by the projected vision features.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        from swarmoe.model.vision import Projector, VisionTower

        assert cfg.vision is not None
        self.cfg = cfg
        self.language_model = KimiForCausalLM(cfg.text)
        self.vision_tower = VisionTower(cfg.vision)
        self.mm_projector = Projector(cfg.vision, cfg.text.hidden_size)

    def embed(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        video_grid_thw: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token embeddings with every media placeholder replaced by its vision features."""
        from swarmoe.model.vision import encode_media

        input_ids = _as_batch(input_ids)
        media_ids = {self.cfg.image_token_id, self.cfg.video_token_id}
        is_media = torch.zeros_like(input_ids, dtype=torch.bool)
        for token in media_ids:
            is_media |= input_ids == token
        embeds = self.language_model.model.embed(input_ids.masked_fill(is_media, 0))
        if len(media_ids) == 1 and pixel_values is not None and pixel_values_videos is not None:
            raise ValueError(
                "this checkpoint uses one placeholder id for images and videos, so their order "
                "in the prompt is ambiguous: pass images and videos in separate calls"
            )
        for pixels, grid, token, kind in (
            (pixel_values, image_grid_thw, self.cfg.image_token_id, "image"),
            (pixel_values_videos, video_grid_thw, self.cfg.video_token_id, "video"),
        ):
            if pixels is None:
                continue
            if grid is None:
                raise ValueError(f"{kind} pixels were given without {kind}_grid_thw")
            features = encode_media(self.vision_tower, self.mm_projector, pixels.to(embeds.dtype), grid)
            slots = input_ids == token
            if int(slots.sum()) != features.shape[0]:
                raise ValueError(
                    f"{kind} placeholders in input_ids ({int(slots.sum())}) do not match the "
                    f"{kind} features ({features.shape[0]} tokens for grid {grid.tolist()})"
                )
            embeds = embeds.masked_scatter(slots[..., None], features.to(embeds.dtype))
        return embeds

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        video_grid_thw: torch.Tensor | None = None,
    ) -> torch.Tensor:
        embeds = self.embed(input_ids, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw)
        return self.language_model(
            attention_mask=attention_mask, position_ids=position_ids, inputs_embeds=embeds
        )


def build_model(cfg: ModelConfig) -> nn.Module:
    return KimiK25ForConditionalGeneration(cfg) if cfg.is_multimodal else KimiForCausalLM(cfg.text)
