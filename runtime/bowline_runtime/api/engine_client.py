"""What the API needs from an engine, as a typing.Protocol.

The in-process AsyncEngine and the client of an engine core running in another process
(engine/core_client.py) both satisfy it structurally, so the routes depend on this surface
only — no `Any`, no attribute probing — and a type checker verifies both implementations.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Protocol

from bowline_runtime.engine.multimodal import ImageInput
from bowline_runtime.engine.outputs import EngineStats, RequestOutput
from bowline_runtime.engine.sampling_params import SamplingParams
from bowline_runtime.lora.modules import LoRAModule


class EngineClient(Protocol):
    tokenizer: Any  # a Hugging Face tokenizer (transformers has no common static type for them)
    max_model_len: int  # prompt + output tokens
    vocab_size: int  # valid token ids are 0..vocab_size-1 (the model's embedding rows)
    image_token_id: int | None  # a vision-language model's image placeholder token; None: text-only

    def generate(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        request_id: str | None = None,
        arrival_time: float | None = None,
        images: list[ImageInput] | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Per-step deltas (engine/outputs.py) until the request finishes; RequestRejected before the first.
        `images`: the prompt's images (engine/multimodal.py), for a vision-language model."""
        ...

    async def abort(self, request_id: str) -> None: ...

    def stats(self) -> EngineStats: ...

    @property
    def is_alive(self) -> bool: ...

    async def shutdown(self) -> None: ...

    def lora_modules(self) -> list[LoRAModule]:
        """The LoRA adapters served now (empty without --enable-lora)."""
        ...

    async def load_lora(self, name: str, path: str) -> None:
        """Serve one more adapter (RequestRejected saying why it cannot)."""
        ...

    async def unload_lora(self, name: str) -> None:
        """Stop serving an adapter: new requests get 404 at once; returns when its last request ended."""
        ...
