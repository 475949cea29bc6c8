"""The small routes: /v1/models, /health, /metrics, /version, /tokenize, /detokenize."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from bowline_runtime import __version__
from bowline_runtime.api import openapi
from bowline_runtime.api.metrics import CONTENT_TYPE
from bowline_runtime.api.prompts import render_chat
from bowline_runtime.api.protocol import (
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
)
from bowline_runtime.api.state import get_state
from bowline_runtime.engine.request_checks import check_token_ids

router = APIRouter()


@router.get("/health", response_class=Response, responses=openapi.HEALTH)
async def health(raw_request: Request) -> Response:
    """200 only when a request would be served: Kubernetes readiness and load balancers rely on it."""
    state = get_state(raw_request)
    if state.ready:
        return Response(status_code=200)
    if state.draining:
        reason = "shutting down"
    elif state.load_error is not None:
        reason = f"model failed to load: {state.load_error}"
    elif state.engine is None:
        reason = "loading"
    else:
        reason = "engine stopped"
    return JSONResponse({"status": reason}, status_code=503)


@router.get("/version")
async def version() -> dict[str, str]:
    return {"version": __version__}


@router.get("/metrics", response_class=Response)
async def metrics(raw_request: Request) -> Response:
    return Response(get_state(raw_request).metrics.render(), media_type=CONTENT_TYPE)


@router.get("/v1/models", response_model=ModelList, responses=openapi.LISTING)
async def list_models(raw_request: Request) -> ModelList:
    state = get_state(raw_request)
    max_len = state.engine.max_model_len if state.engine is not None else (state.config.max_model_len or 0)
    card = ModelCard(id=state.model_name, created=state.created, root=state.config.model, max_model_len=max_len)
    adapters = [  # each LoRA adapter is a model of its own, as vLLM lists them
        ModelCard(id=m.name, created=state.created, root=m.path, parent=m.base_model_name or state.model_name,
                  max_model_len=max_len)
        for m in state.lora_modules()
    ]
    return ModelList(data=[card, *adapters])


@router.post("/tokenize", response_model=TokenizeResponse, responses=openapi.TOKENIZER)
async def tokenize(body: TokenizeRequest, raw_request: Request) -> TokenizeResponse:
    """Text or chat messages → token ids, exactly as a completion or chat request would see them."""
    state = get_state(raw_request)
    engine = state.require_engine()
    state.check_model(body.model)
    tokenizer = engine.tokenizer
    if body.messages is not None:
        text = render_chat(
            tokenizer,
            body.messages,
            tools=body.tools,
            request_template=body.chat_template,
            server_template=state.chat_template,
            template_kwargs=body.chat_template_kwargs,
            add_generation_prompt=body.add_generation_prompt,
            continue_final_message=body.continue_final_message,
        )
        ids = tokenizer.encode(text, add_special_tokens=False)
    else:
        ids = tokenizer.encode(body.prompt or "", add_special_tokens=body.add_special_tokens)
    strs = tokenizer.convert_ids_to_tokens(ids) if body.return_token_strs else None
    return TokenizeResponse(count=len(ids), max_model_len=engine.max_model_len, tokens=ids, token_strs=strs)


@router.post("/detokenize", response_model=DetokenizeResponse, responses=openapi.TOKENIZER)
async def detokenize(body: DetokenizeRequest, raw_request: Request) -> DetokenizeResponse:
    state = get_state(raw_request)
    engine = state.require_engine()
    state.check_model(body.model)
    if body.tokens:
        check_token_ids(body.tokens, engine.vocab_size, "tokens")  # before decode: no OverflowError
    return DetokenizeResponse(prompt=engine.tokenizer.decode(body.tokens))
