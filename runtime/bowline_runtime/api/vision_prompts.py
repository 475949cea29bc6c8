"""Chat requests with images: the prompt ids and pixel values exactly as the model's own processor builds them.

The conversation is rendered by the chat template with one image placeholder per image part, then
the model's processor (AutoProcessor: its image processor and tokenizer) turns text + images into
input ids, expanding each placeholder into as many image tokens as the vision tower yields, and
pixel values. So the ids the engine runs are the ones `processor(text=..., images=...)` gives,
token for token.

Templates take image parts one of two ways, detected from the template source as vLLM does: an
"openai" template loops over a message's content parts and writes the image token for each
`{"type": "image"}` (Hugging Face's llava templates); a "string" template reads content as one
string (vLLM's template_llava.jinja, the tiny text templates), and then each image's placeholder
goes before the message's text, one per line.
"""

from __future__ import annotations

import asyncio
import functools
import re
from typing import Any

from bowline_runtime.api import images as image_io
from bowline_runtime.api.errors import bad_request
from bowline_runtime.api.prompts import message_dicts, render_chat
from bowline_runtime.api.protocol import ChatCompletionRequest, ChatMessage
from bowline_runtime.engine.errors import RequestRejected
from bowline_runtime.engine.multimodal import ImageInput, pixel_hash

# A loop over a message's content, the mark of a template that takes content parts.
_PARTS_LOOP = re.compile(r"for\s+\w+\s+in\s+\w+\s*(\[\s*['\"]content['\"]\s*\]|\.content\b)")


def request_image_urls(req: ChatCompletionRequest) -> list[str]:
    """Every image URL of the conversation, in order; [] for token-id prompts and text-only chats."""
    if not req.messages or isinstance(req.messages[0], int):
        return []
    return [url for msg in req.messages if isinstance(msg, ChatMessage) for url in msg.image_urls()]


def content_format(template: str) -> str:
    """"openai" when the template iterates over content parts, else "string"."""
    return "openai" if _PARTS_LOOP.search(template) else "string"


def template_messages(messages: list[ChatMessage], fmt: str, image_token: str) -> list[dict[str, Any]]:
    """The messages as the template's dicts, with each image part as the template expects it."""
    out = message_dicts(messages)
    for item, msg in zip(out, messages, strict=True):
        if not isinstance(msg.content, list) or not msg.image_urls():
            continue
        if fmt == "openai":
            item["content"] = [
                {"type": "image"} if part.type == "image_url" else {"type": "text", "text": part.text or ""}
                for part in msg.content
            ]
        else:
            item["content"] = "\n".join([image_token] * len(msg.image_urls()) + [msg.text() or ""])
    return out


@functools.lru_cache(maxsize=4)
def load_processor(model_path: str, trust_remote_code: bool) -> Any:
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(model_path, trust_remote_code=trust_remote_code)


def placeholder_runs(ids: list[int], image_token_id: int, num_images: int) -> list[tuple[int, int]]:
    """(offset, length) of each image's placeholder tokens; images of one model expand alike, so the
    placeholders split evenly (two adjacent images make one run of twice the length)."""
    positions = [i for i, t in enumerate(ids) if t == image_token_id]
    if num_images == 0 or len(positions) % num_images:
        raise RequestRejected(
            f"the prompt holds {len(positions)} image tokens for {num_images} image(s): "
            "do not write the image token in text parts",
            image_io.PARAM,
        )
    per = len(positions) // num_images
    runs = []
    for k in range(num_images):
        chunk = positions[k * per : (k + 1) * per]
        if chunk[-1] - chunk[0] != per - 1:
            raise RequestRejected("an image's placeholder tokens are not contiguous in the prompt", image_io.PARAM)
        runs.append((chunk[0], per))
    return runs


def build_prompt(
    req: ChatCompletionRequest, tokenizer: Any, processor: Any, server_template: str | None,
    pil_images: list[Any], image_token_id: int,
) -> tuple[list[int], list[ImageInput]]:
    """Render, then let the processor expand and tokenise: (prompt ids, one ImageInput per image)."""
    if req.disable_chat_template:
        raise bad_request("image inputs need the chat template: do not send disable_chat_template", "messages")
    messages: list[ChatMessage] = req.messages  # type: ignore[assignment]
    template = req.chat_template or server_template or getattr(tokenizer, "chat_template", None)
    template = template or getattr(processor, "chat_template", None)
    image_token = getattr(processor, "image_token", None) or tokenizer.convert_ids_to_tokens(image_token_id)
    text = render_chat(
        tokenizer, messages, tools=req.tools, request_template=req.chat_template, server_template=template,
        template_kwargs=req.chat_template_kwargs, add_generation_prompt=req.add_generation_prompt,
        continue_final_message=req.continue_final_message,
        message_list=template_messages(messages, content_format(template or ""), image_token),
    )
    # The processor's own rule (ProcessorMixin.apply_chat_template): no second BOS after the template's.
    bos = getattr(processor.tokenizer, "bos_token", None)
    special = {} if not (bos and text.startswith(bos)) else {"add_special_tokens": False}
    try:
        out = processor(text=[text], images=pil_images, return_tensors="pt", **special)
    except ValueError as exc:  # the placeholder count and the image count disagree, and the like
        raise RequestRejected(f"the processor refused the images: {exc}", image_io.PARAM) from None
    ids = out["input_ids"][0].tolist()
    pixel_values = out["pixel_values"]
    runs = placeholder_runs(ids, image_token_id, len(pil_images))
    inputs = [
        ImageInput(offset, length, pixel_hash(pixel_values[k]), pixel_values[k].contiguous())
        for k, (offset, length) in enumerate(runs)
    ]
    return ids, inputs


async def image_chat_inputs(state: Any, req: ChatCompletionRequest, tokenizer: Any) -> tuple[list[int], list[ImageInput]]:
    """A chat with image parts: checks, fetches and decodes, then the processor, off the event loop."""
    urls = request_image_urls(req)
    image_token_id = getattr(state.engine, "image_token_id", None)  # engine doubles in tests may lack it
    if image_token_id is None:
        raise RequestRejected(
            f"the model {state.model_name!r} is text-only: it does not accept image_url content parts; "
            "serve a vision-language model (e.g. llava) for images",
            image_io.PARAM,
        )
    config = state.config
    image_io.check_count(len(urls), image_io.parse_mm_limit(config.limit_mm_per_prompt))
    data = await image_io.load_image_bytes(urls, timeout=config.image_fetch_timeout, max_bytes=config.max_image_bytes)

    def prepare() -> tuple[list[int], list[ImageInput]]:
        pil_images = [image_io.decode_image(b, i) for i, b in enumerate(data)]
        processor = load_processor(config.model, config.trust_remote_code)
        return build_prompt(req, tokenizer, processor, state.chat_template, pil_images, image_token_id)

    return await asyncio.to_thread(prepare)
