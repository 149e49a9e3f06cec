"""From an OpenAI request to what the engine runs: prompt ids, media tensors, sampling params.

`prepare_chat` builds short chats on the event loop and hands images and long chats to a worker
thread (decoding and tokenising them take real CPU time), so the builders below must not touch
the event loop; every problem becomes an `APIError` naming the field.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from swarmoe.config import ModelConfig
from swarmoe.engine.sampling import SamplingParams
from swarmoe.server.errors import APIError, context_error
from swarmoe.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    ImagePart,
    NamedToolChoice,
)
from swarmoe.text import (
    ChatTemplate,
    ChatTemplateError,
    Tokenizer,
    encode_rendered,
    expand_media_pads,
    mark_data,
    render_chat,
)
from swarmoe.text.chat import MEDIA_PAD
from swarmoe.text.tool_parser import ARG_BEGIN, CALL_BEGIN, SECTION_BEGIN, THINK_CLOSE, THINK_OPEN

#: Decoded images larger than this are refused before their pixels are read.
MAX_IMAGE_PIXELS = 50_000_000
_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^,;]*)*),(?P<data>.*)$", re.S)


@dataclass
class ChatPrompt:
    """A rendered chat ready for the engine.

    `forced` is text the server wrote on the model's behalf after the generation prompt (the
    opening of a tool call, for tool_choice required/named); the parser reads it before the
    generated text. `thinking` says whether the prompt left the model inside `<think>`.
    """

    prompt: dict[str, Any]
    num_tokens: int
    forced: str
    thinking: bool | None


# Up to this much message text, a prompt is built on the event loop: rendering and encoding
# a short chat takes ~0.09 ms, handing it to a worker thread and back ~0.23 ms.
LIGHT_CHARS = 16_384


async def prepare_chat(
    req: ChatCompletionRequest, tokenizer: Tokenizer, template: ChatTemplate, config: ModelConfig
) -> ChatPrompt:
    """`chat_prompt` without blocking the event loop on big prompts (images, long contexts)."""
    if _is_light(req):
        return chat_prompt(req, tokenizer, template, config)
    return await asyncio.to_thread(chat_prompt, req, tokenizer, template, config)


def _is_light(req: ChatCompletionRequest) -> bool:
    """Whether building `req`'s prompt is too cheap to be worth a thread: no images, few tools,
    little text."""
    if len(req.tools or ()) > 8:
        return False
    size = 0
    for msg in req.messages:
        if isinstance(msg.content, str):
            size += len(msg.content)
        elif msg.content:
            for part in msg.content:
                if isinstance(part, ImagePart):
                    return False
                size += len(part.text)
    return size <= LIGHT_CHARS


def chat_prompt(
    req: ChatCompletionRequest, tokenizer: Tokenizer, template: ChatTemplate, config: ModelConfig
) -> ChatPrompt:
    """`template` is compiled once per server: compiling costs ~15 ms, rendering ~0.1 ms.

    Message text, tool schemas and template variables are data: only the template's markers
    (and the server's own tool-call opening) become control tokens (`encode_rendered`), so a
    message that spells `<|im_end|>` or `<|media_pad|>` is ordinary text to the model."""
    messages, images = _messages(req)
    choice = req.tool_choice
    tools = None
    if req.tools and choice != "none":
        tools = [t.model_dump(exclude_none=True) for t in req.tools]
    try:
        text = render_chat(messages, tools=tools, template=template, tokenizer=tokenizer,
                           **(req.chat_template_kwargs or {}))
    except ChatTemplateError as exc:
        raise APIError(400, str(exc), param="messages") from None
    thinking = True if text.endswith(THINK_OPEN) else False if text.endswith(THINK_CLOSE) else None
    forced = _forced_tool_call(choice, thinking)  # plain, for the output parser
    try:
        ids = encode_rendered(
            tokenizer, text + _forced_tool_call(choice, thinking, lambda s: mark_data(s, tokenizer))
        )
    except ValueError as exc:
        raise APIError(400, f"messages could not be tokenised: {exc}", param="messages") from None
    prompt: dict[str, Any] = {"prompt_token_ids": ids}
    if images:
        batch = _process_images(images, config)
        try:
            ids = expand_media_pads(ids, tokenizer.special(MEDIA_PAD), batch.token_counts)
        except ValueError:  # text never makes pads: only a custom template could be wrong
            raise APIError(400, f"the chat template wrote a different number of {MEDIA_PAD} "
                                "markers than the messages have images", param="messages") from None
        prompt = {
            "prompt_token_ids": ids,
            "multi_modal_data": {"pixel_values": batch.pixel_values, "image_grid_thw": batch.grid_thw},
        }
    return ChatPrompt(prompt, len(ids), forced, thinking)


def _forced_tool_call(
    choice: Any, thinking: bool | None, data: Callable[[str], str] = str
) -> str:
    """The opening the model must continue: any call (required) or the named function's.
    The function name is the client's text: `data` marks it for encoding (`mark_data`)."""
    if choice == "required":
        call = f"{SECTION_BEGIN[0]}{CALL_BEGIN}functions."
    elif isinstance(choice, NamedToolChoice):
        name = data(choice.function.name)
        call = f"{SECTION_BEGIN[0]}{CALL_BEGIN}functions.{name}:0{ARG_BEGIN}"
    else:
        return ""
    # Reasoning is skipped: close the <think> the prompt opened, as the model does itself.
    return (THINK_CLOSE if thinking else "") + call


def _messages(req: ChatCompletionRequest) -> tuple[list[dict[str, Any]], list[Any]]:
    """Plain dicts for the template, and the decoded images in prompt order."""
    out: list[dict[str, Any]] = []
    images: list[Any] = []
    for i, msg in enumerate(req.messages):
        data = msg.model_dump(exclude_none=True)
        if data["role"] == "developer":
            data["role"] = "system"  # OpenAI's newer name for the system turn
        if isinstance(msg.content, list):
            for j, part in enumerate(msg.content):
                if isinstance(part, ImagePart):
                    images.append(decode_image(part.image_url.url, f"messages.{i}.content.{j}.image_url"))
        out.append(data)
    return out, images


def decode_image(url: str, param: str) -> Any:
    """A PIL image from a base64 data URL; the server never fetches remote URLs."""
    from PIL import Image

    match = _DATA_URL.match(url)
    if match is None:
        raise APIError(400, "images must be data URLs (data:image/png;base64,...); "
                            "the server does not fetch remote URLs", param=param)
    if ";base64" not in match["params"]:
        raise APIError(400, "image data URLs must be base64-encoded", param=param)
    try:
        raw = base64.b64decode(match["data"], validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, "image data URL is not valid base64", param=param) from None
    try:
        image = Image.open(io.BytesIO(raw))
        width, height = image.size
        if width * height > MAX_IMAGE_PIXELS:
            raise APIError(400, f"image is {width}x{height}; at most {MAX_IMAGE_PIXELS} pixels",
                           param=param)
        image.load()
    except APIError:
        raise
    except Exception:  # PIL signals corrupt or unknown files with many exception types
        raise APIError(400, "image could not be decoded", param=param) from None
    return image


def _process_images(images: list[Any], config: ModelConfig):  # -> MediaBatch
    if not config.is_multimodal or config.vision is None:
        raise APIError(400, "this model has no vision tower; send text only", param="messages")
    from swarmoe.text.media import MediaConfig, process_images

    vision = config.vision
    media = MediaConfig(patch_size=vision.patch_size, merge_size=vision.merge_kernel_size[0])
    try:
        return process_images(images, media)
    except ValueError as exc:
        raise APIError(400, f"image: {exc}", param="messages") from None


def completion_prompts(req: CompletionRequest, tokenizer: Tokenizer) -> list[list[int]]:
    """One list of ids per prompt.

    `/v1/completions` is the raw interface, but prompt *text* is still data: it is encoded with
    no special tokens (as OpenAI does), so `<|im_end|>` or `<|media_pad|>` in it stays text and
    can never turn into a turn marker or a media slot. A client that needs control tokens sends
    token ids; those are its own, used as given (the engine refuses ids outside the vocabulary).
    """
    p = req.prompt
    if isinstance(p, str):
        texts_or_ids: list[Any] = [p]
    elif p and isinstance(p[0], int):
        texts_or_ids = [p]
    else:
        texts_or_ids = list(p)
    out = []
    for i, item in enumerate(texts_or_ids):
        param = f"prompt.{i}" if len(texts_or_ids) > 1 else "prompt"
        try:
            ids = tokenizer.encode(item) if isinstance(item, str) else list(item)
        except ValueError as exc:
            raise APIError(400, f"prompt could not be tokenised: {exc}", param=param) from None
        if not ids:
            raise APIError(400, "prompt is empty", param=param)
        out.append(ids)
    return out


def sampling_params(
    req: ChatCompletionRequest | CompletionRequest,
    prompt_tokens: int,
    max_model_len: int,
    *,
    stop_token_ids: list[int],
) -> SamplingParams:
    """Engine sampling settings; the completion budget defaults to the rest of the context."""
    if isinstance(req, ChatCompletionRequest):
        max_tokens = req.max_completion_tokens or req.max_tokens
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
    else:
        max_tokens, logprobs = req.max_tokens, req.logprobs
    room = max_model_len - prompt_tokens
    if room < 1 or (max_tokens is not None and max_tokens > room):
        raise context_error(prompt_tokens, max_tokens or 1, max_model_len)
    try:
        return SamplingParams(
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=-1 if req.top_k is None else req.top_k,
            max_tokens=max_tokens or room,
            stop=req.stop,
            stop_token_ids=stop_token_ids,
            ignore_eos=req.ignore_eos,
            seed=req.seed,
            logprobs=logprobs,
            n=req.n,
        )
    except ValueError as exc:
        field = re.search(r"SamplingParams\.(\w+)", str(exc))
        raise APIError(400, str(exc), param=field[1] if field else None, code="invalid_value") from None
