"""vLLM's runtime adapter routes: POST /v1/load_lora_adapter and /v1/unload_lora_adapter.

Mounted only when runtime updating is allowed (--allow-runtime-lora-updating, or vLLM's
VLLM_ALLOW_RUNTIME_LORA_UPDATING), as vLLM does; answers are vLLM's plain-text success lines, and
refusals OpenAI error bodies: 400 for an adapter that cannot be served (the message says why:
missing file, rank above --max-lora-rank, shapes that do not fit), 404 for unloading an unknown name.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, ConfigDict

from bowline_runtime.api.state import get_state

router = APIRouter()


class LoadLoRAAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    lora_name: str
    lora_path: str


class UnloadLoRAAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    lora_name: str
    lora_int_id: int | None = None  # vLLM accepts it; names are unique here, so it is not needed


@router.post("/v1/load_lora_adapter", response_class=PlainTextResponse)
async def load_lora_adapter(body: LoadLoRAAdapterRequest, raw_request: Request) -> PlainTextResponse:
    engine = get_state(raw_request).require_engine()
    await engine.load_lora(body.lora_name, body.lora_path)
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")


@router.post("/v1/unload_lora_adapter", response_class=PlainTextResponse)
async def unload_lora_adapter(body: UnloadLoRAAdapterRequest, raw_request: Request) -> PlainTextResponse:
    engine = get_state(raw_request).require_engine()
    await engine.unload_lora(body.lora_name)
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")
