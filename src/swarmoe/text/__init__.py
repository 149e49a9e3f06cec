"""The text layer: K2 tokenizer, chat prompts and assistant-output parsing (no torch here)."""

from swarmoe.text.chat import (
    ChatTemplate,
    ChatTemplateError,
    encode_chat,
    expand_media_pads,
    render_chat,
)
from swarmoe.text.tokenizer import IncrementalDetokenizer, Tokenizer, TokenizerError

__all__ = [
    "ChatTemplate",
    "ChatTemplateError",
    "IncrementalDetokenizer",
    "Tokenizer",
    "TokenizerError",
    "encode_chat",
    "expand_media_pads",
    "render_chat",
]
