"""The text layer: K2 tokenizer, chat prompts and assistant-output parsing (no torch here)."""

from swarmoe.text.chat import (
    ChatTemplate,
    ChatTemplateError,
    encode_chat,
    encode_rendered,
    expand_media_pads,
    mark_data,
    render_chat,
    unmark,
)
from swarmoe.text.tokenizer import IncrementalDetokenizer, Tokenizer, TokenizerError
from swarmoe.text.tool_declaration import tools_to_typescript
from swarmoe.text.tool_parser import (
    ParsedMessage,
    StreamDelta,
    StreamingParser,
    ToolCall,
    ToolCallDelta,
    parse_assistant,
)

__all__ = [
    "ChatTemplate",
    "ChatTemplateError",
    "IncrementalDetokenizer",
    "ParsedMessage",
    "StreamDelta",
    "StreamingParser",
    "Tokenizer",
    "TokenizerError",
    "ToolCall",
    "ToolCallDelta",
    "encode_chat",
    "encode_rendered",
    "expand_media_pads",
    "mark_data",
    "parse_assistant",
    "render_chat",
    "tools_to_typescript",
    "unmark",
]
