"""The OpenAI-compatible wire format: every request and response body the server speaks.

This module is the single source of truth for field names, types and ranges (the OpenAPI schema at
`/openapi.json` falls out of it). Names mirror OpenAI's, then vLLM's and FastDeploy's extras, so
their clients and the OpenAI SDK's `extra_body` work unchanged. Unknown fields are ignored, as
OpenAI does; every field declared here either has an effect or is refused with a 400 elsewhere.
Range checks that depend on the server's configuration (vocabulary size, max logprobs, the
served model name) live in `sampling.py` and `prompts.py`, not here.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# ---------------------------------------------------------------------------------------------------
# Shared pieces
# ---------------------------------------------------------------------------------------------------


class OpenAIModel(BaseModel):
    """Requests ignore unknown fields (OpenAI's behaviour) and accept fields by alias or by name."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)


def _is_none(value: Any) -> bool:
    return value is None


class ResponseModel(BaseModel):
    """Response bodies. Fields named in `_omit_if_none` vanish when None, the way OpenAI omits
    extras it did not produce, while core fields such as `finish_reason` stay as explicit nulls.

    The omission is each field's `exclude_if`, set as the subclass is made, so serialising stays in
    pydantic's Rust core; a wrap-mode model serializer would call back into Python for every model
    and every nested one (each logprob entry), ~3.5 us of the ~8 us a streamed chunk took.
    """

    _omit_if_none: ClassVar[frozenset[str]] = frozenset()

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        omitted = cls._omit_if_none & set(cls.model_fields)
        if omitted:
            for name in omitted:
                cls.model_fields[name].exclude_if = _is_none
            cls.model_rebuild(force=True)


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class StreamOptions(OpenAIModel):
    include_usage: bool = False
    continuous_usage_stats: bool = Field(False, description="usage on every chunk, not only the last (vLLM)")


def stream_usage(opts: StreamOptions | None) -> tuple[bool, bool]:
    """(usage chunk at the end, usage on every chunk too): the latter only together with the former."""
    include = bool(opts and opts.include_usage)
    return include, include and bool(opts and opts.continuous_usage_stats)


class JsonSchemaFormat(OpenAIModel):
    name: str = "response"
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(OpenAIModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_present(self) -> ResponseFormat:
        if self.type == "json_schema" and (self.json_schema is None or self.json_schema.json_schema is None):
            raise ValueError('response_format of type "json_schema" needs json_schema.schema')
        return self


class StructuredOutputs(OpenAIModel):
    """vLLM's newer spelling of the guided_* fields: exactly one member may be set."""

    json_: dict[str, Any] | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    structural_tag: dict[str, Any] | str | None = None


class SamplingFields(OpenAIModel):
    """Fields shared by chat and completions: OpenAI's sampling knobs and the vLLM/FastDeploy extras."""

    model: str | None = Field(None, description="must name the served model when given")
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    n: int = Field(1, ge=1, le=128)
    best_of: int | None = Field(None, ge=1, le=128, description="candidates generated; the n most likely are returned")
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    user: str | None = None
    logit_bias: dict[str, float] | None = None
    response_format: ResponseFormat | None = None
    # Extra sampling (vLLM / FastDeploy)
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    min_tokens: int | None = Field(None, ge=0)
    include_stop_str_in_output: bool = False
    bad_words: list[str] | None = None
    bad_words_token_ids: list[int] | list[list[int]] | None = None
    repetition_penalty: float | None = Field(None, gt=0.0)
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    # Beam search (vLLM's demo server)
    use_beam_search: bool = False
    num_beams: int | None = Field(None, ge=1, le=128, description="alias of best_of")
    length_penalty: float | None = None
    # Guided decoding
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    structural_tag: dict[str, Any] | str | None = None
    structured_outputs: StructuredOutputs | None = None
    reasoning_max_tokens: int | None = Field(None, ge=1)
    # Logprob shaping (FastDeploy)
    temp_scaled_logprobs: bool = False
    top_p_normalized_logprobs: bool = False
    # Token-level I/O
    return_token_ids: bool = False
    prompt_token_ids: list[int] | None = Field(None, description="the prompt as token ids: skips templating and tokenising")


# ---------------------------------------------------------------------------------------------------
# Chat completions
# ---------------------------------------------------------------------------------------------------


class ImageURL(OpenAIModel):
    model_config = ConfigDict(extra="allow")
    url: str = Field(..., description="a data: URL (base64 PNG/JPEG/WebP) or an http(s):// URL")
    detail: str | None = None


class ContentPart(OpenAIModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None
    image_url: ImageURL | None = None


class ChatMessage(OpenAIModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None

    @model_validator(mode="after")
    def _known_parts(self) -> ChatMessage:
        if isinstance(self.content, list):
            for part in self.content:
                if part.type == "image_url":
                    if part.image_url is None:
                        raise ValueError('a content part of type "image_url" needs an "image_url": {"url": ...}')
                    continue
                if part.type != "text":
                    raise ValueError(
                        f"content part type {part.type!r} is not supported: send "
                        '{"type": "text", "text": ...} or {"type": "image_url", "image_url": {"url": ...}} parts'
                    )
                if part.text is None:
                    raise ValueError('a content part of type "text" needs a "text" field')
        return self

    def text(self) -> str | None:
        """The content as one string: text parts joined by newlines, as vLLM does."""
        if isinstance(self.content, list):
            return "\n".join(part.text or "" for part in self.content if part.type == "text")
        return self.content

    def image_urls(self) -> list[str]:
        """The URLs of the message's image parts, in order."""
        if not isinstance(self.content, list):
            return []
        return [part.image_url.url for part in self.content if part.type == "image_url" and part.image_url]


class FunctionDefinition(OpenAIModel):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ChatTool(OpenAIModel):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(OpenAIModel):
    name: str


class NamedToolChoice(OpenAIModel):
    type: Literal["function"] = "function"
    function: NamedFunction


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] | list[int] = Field(..., description="chat messages, or the prompt as token ids")
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[ChatTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    metadata: dict[str, Any] | None = None
    # Chat templating
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    disable_chat_template: bool = False
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    echo: bool = Field(False, description="prefix the reply with the last message's content when it is the assistant's")

    @model_validator(mode="after")
    def _checks(self) -> ChatCompletionRequest:
        if not self.messages and self.prompt_token_ids is None:
            raise ValueError("messages must not be empty")
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        if self.continue_final_message and self.add_generation_prompt:
            raise ValueError("continue_final_message and add_generation_prompt cannot both be true")
        return self

    @property
    def output_limit(self) -> int | None:
        """max_completion_tokens wins over the deprecated max_tokens, as in OpenAI's API."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class ChatLogprobTop(ResponseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatLogprobToken(ChatLogprobTop):
    top_logprobs: list[ChatLogprobTop] = Field(default_factory=list)


class ChatLogprobs(ResponseModel):
    content: list[ChatLogprobToken] | None = None


class FunctionCall(ResponseModel):
    name: str
    arguments: str


class ToolCall(ResponseModel):
    id: str = Field(default_factory=lambda: random_id("chatcmpl-tool"))
    type: Literal["function"] = "function"
    function: FunctionCall


class DeltaFunctionCall(ResponseModel):
    _omit_if_none = frozenset({"name", "arguments"})
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(ResponseModel):
    _omit_if_none = frozenset({"id", "type", "function"})
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall | None = None


class PromptTokensDetails(ResponseModel):
    cached_tokens: int = 0  # prompt tokens whose KV blocks came from the prefix cache


class UsageInfo(ResponseModel):
    _omit_if_none = frozenset({"prompt_tokens_details"})
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = None  # with --enable-prompt-tokens-details (vLLM)

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> UsageInfo:
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens)


class ChatResponseMessage(ResponseModel):
    _omit_if_none = frozenset({"reasoning_content", "prompt_token_ids", "completion_token_ids"})
    role: str = "assistant"
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCall] = Field(default_factory=list)
    prompt_token_ids: list[int] | None = None
    completion_token_ids: list[int] | None = None


class ChatCompletionChoice(ResponseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(ResponseModel):
    id: str = Field(default_factory=lambda: random_id("chatcmpl"))
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatCompletionChoice]
    usage: UsageInfo


class DeltaMessage(ResponseModel):
    _omit_if_none = frozenset(
        {"role", "content", "reasoning_content", "tool_calls", "prompt_token_ids", "completion_token_ids"}
    )
    role: str | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None
    prompt_token_ids: list[int] | None = None
    completion_token_ids: list[int] | None = None


class ChatCompletionStreamChoice(ResponseModel):
    _omit_if_none = frozenset({"stop_reason"})
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    arrival_time: float | None = Field(None, description="seconds since the request arrived")


class ChatCompletionChunk(ResponseModel):
    _omit_if_none = frozenset({"usage"})
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatCompletionStreamChoice]
    usage: UsageInfo | None = None


# ---------------------------------------------------------------------------------------------------
# Completions
# ---------------------------------------------------------------------------------------------------


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]] | None = None
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, description="how many alternatives per token (0: the chosen token's only)")
    max_tokens: int | None = Field(None, ge=1, description="absent: up to the context limit")
    suffix: str | None = None

    @model_validator(mode="after")
    def _checks(self) -> CompletionRequest:
        if self.prompt is None and self.prompt_token_ids is None:
            raise ValueError("either prompt or prompt_token_ids is required")
        if self.prompt is not None and self.prompt_token_ids is not None:
            raise ValueError("give prompt or prompt_token_ids, not both")
        if self.prompt == [] or (isinstance(self.prompt, list) and any(p == [] for p in self.prompt)):
            raise ValueError("prompt must not be empty")
        return self

    @property
    def output_limit(self) -> int | None:
        return self.max_tokens


class CompletionLogprobs(ResponseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionChoice(ResponseModel):
    _omit_if_none = frozenset({"prompt_token_ids", "completion_token_ids", "reasoning_content", "stop_reason"})
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    prompt_token_ids: list[int] | None = None
    completion_token_ids: list[int] | None = None
    reasoning_content: str | None = None
    arrival_time: float | None = Field(None, description="seconds since the request arrived")


class CompletionResponse(ResponseModel):
    _omit_if_none = frozenset({"usage"})
    id: str = Field(default_factory=lambda: random_id("cmpl"))
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


# ---------------------------------------------------------------------------------------------------
# Models, tokenizer endpoints, errors
# ---------------------------------------------------------------------------------------------------


class ModelCard(ResponseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "bowline"
    root: str
    parent: str | None = None
    max_model_len: int


class ModelList(ResponseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeRequest(OpenAIModel):
    """Either `prompt` (raw text) or `messages` (rendered with the chat template first), as in vLLM."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    tools: list[ChatTool] | None = None
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        return self


class TokenizeResponse(ResponseModel):
    _omit_if_none = frozenset({"token_strs"})
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(OpenAIModel):
    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(ResponseModel):
    prompt: str


class ErrorInfo(ResponseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(ResponseModel):
    error: ErrorInfo
