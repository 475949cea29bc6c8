"""From a request to prompt token ids: chat templates and tokenising.

The prompt's rules (non-empty, in the vocabulary, shorter than the context) are the engine's
(engine/request_checks.py); this module only calls them where a prompt must be valid before it
is decoded.

The chat template comes, first match wins, from the request's `chat_template`, the server's
`--chat-template` (a file, or the template text itself), then the tokenizer's own.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from bowline_runtime.api.errors import bad_request
from bowline_runtime.api.protocol import ChatCompletionRequest, ChatMessage, ChatTool, CompletionRequest
from bowline_runtime.engine.errors import RequestRejected
from bowline_runtime.engine.request_checks import RequestLimits, check_prompt


def load_chat_template(value: str | None) -> str | None:
    """`--chat-template` names a Jinja file or is the template itself (vLLM accepts both)."""
    if not value:
        return None
    if os.path.isfile(value):
        with open(value, encoding="utf-8") as fh:
            return fh.read()
    if "{" not in value:
        raise ValueError(f"--chat-template {value!r} is neither a file nor a Jinja template")
    return value


def message_dicts(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Messages as the Jinja templates expect them: content as one string, extras only when set."""
    out = []
    for msg in messages:
        item: dict[str, Any] = {"role": msg.role, "content": msg.text()}
        for key in ("name", "tool_calls", "tool_call_id", "reasoning_content"):
            value = getattr(msg, key)
            if value is not None:
                item[key] = value
        out.append(item)
    return out


def render_chat(
    tokenizer: Any,
    messages: list[ChatMessage],
    *,
    tools: list[ChatTool] | None = None,
    request_template: str | None = None,
    server_template: str | None = None,
    template_kwargs: dict[str, Any] | None = None,
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
    message_list: list[dict[str, Any]] | None = None,
) -> str:
    """The prompt text the model sees for a conversation. `message_list`: the messages already as
    the template's dicts (image prompts give content as parts, see api/vision_prompts.py)."""
    template = request_template or server_template
    if template is None and not getattr(tokenizer, "chat_template", None):
        raise bad_request(
            "this model has no chat template: start the server with --chat-template FILE, send "
            "chat_template, or send disable_chat_template: true",
            "messages",
        )
    kwargs = dict(template_kwargs or {})
    # The template's own arguments must not be overridden through chat_template_kwargs.
    for reserved in ("tools", "chat_template", "add_generation_prompt", "continue_final_message", "tokenize"):
        kwargs.pop(reserved, None)
    try:
        text = tokenizer.apply_chat_template(
            message_list if message_list is not None else message_dicts(messages),
            tools=[t.model_dump(exclude_none=True) for t in tools] if tools else None,
            chat_template=template,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            tokenize=False,
            **kwargs,
        )
    except Exception as exc:  # jinja2 errors, transformers' ValueErrors: the template or messages are wrong
        raise bad_request(f"the chat template could not render these messages: {exc}", "messages") from None
    if not isinstance(text, str):  # some tokenizers return a list for a batch of one
        text = text[0]
    return text


def chat_prompt_ids(req: ChatCompletionRequest, tokenizer: Any, server_template: str | None) -> list[int]:
    """Token ids for a chat request. Token-id inputs skip templating entirely."""
    if req.prompt_token_ids is not None:
        return list(req.prompt_token_ids)
    if req.messages and isinstance(req.messages[0], int):
        return list(req.messages)  # type: ignore[arg-type]
    messages: list[ChatMessage] = req.messages  # type: ignore[assignment]
    if req.disable_chat_template:
        # FastDeploy: the raw text is the prompt; with several messages their texts are joined.
        text = "".join(m.text() or "" for m in messages)
    else:
        text = render_chat(
            tokenizer,
            messages,
            tools=req.tools,
            request_template=req.chat_template,
            server_template=server_template,
            template_kwargs=req.chat_template_kwargs,
            add_generation_prompt=req.add_generation_prompt,
            continue_final_message=req.continue_final_message,
        )
    return tokenizer.encode(text, add_special_tokens=False)


@dataclass(slots=True)
class Prompt:
    """One completions prompt: its ids, and its text for `echo` (decoded when given as ids)."""

    token_ids: list[int]
    text: str


def completion_prompts(req: CompletionRequest, tokenizer: Any, limits: RequestLimits, param: str) -> list[Prompt]:
    """A completions request may carry one prompt or a batch: text(s) or token-id list(s).

    Token-id prompts pass the engine's prompt check before they are decoded for `echo`: a
    tokenizer handed an id outside 0..2^32 raises OverflowError instead of a message.
    """
    raw: Any = req.prompt if req.prompt_token_ids is None else req.prompt_token_ids
    if isinstance(raw, str):
        items: list[str | list[int]] = [raw]
    elif raw and all(isinstance(x, int) for x in raw):
        items = [list(raw)]
    else:
        items = list(raw)
    if not items:
        raise RequestRejected("the prompt is empty: give at least one prompt", param)
    prompts = []
    for item in items:
        if isinstance(item, str):
            ids = tokenizer.encode(item, add_special_tokens=True)
            check_prompt(ids, limits, param)
            prompts.append(Prompt(ids, item))
        else:
            check_prompt(item, limits, param)
            prompts.append(Prompt(list(item), tokenizer.decode(item)))
    return prompts
