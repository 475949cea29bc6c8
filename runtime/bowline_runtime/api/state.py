"""What the routes share: the engine (once loaded), the settings derived from it, metrics, admission."""

from __future__ import annotations

import time

from fastapi import Request

from bowline_runtime.api.admission import Admission
from bowline_runtime.api.engine_client import EngineClient
from bowline_runtime.api.errors import APIError
from bowline_runtime.api.logprobs import TokenTexts
from bowline_runtime.api.metrics import ServerMetrics
from bowline_runtime.api.prompts import load_chat_template
from bowline_runtime.api.sampling import ServerLimits
from bowline_runtime.config import EngineConfig
from bowline_runtime.engine.outputs import EngineStats
from bowline_runtime.lora.modules import LoRAModule


class ServerState:
    """Lives on `app.state.bowline`. The engine is None until loading finishes."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.model_name = config.model_name
        self.created = int(time.time())
        self.engine: EngineClient | None = None
        self.load_error: BaseException | None = None
        self.draining = False
        self.limits: ServerLimits | None = None
        self.token_texts: TokenTexts | None = None
        self.chat_template = load_chat_template(config.chat_template)
        self.admission = Admission(config.max_num_seqs, config.max_queue_len)
        self.metrics = ServerMetrics(self.model_name, self.stats, cache_config={
            "block_size": str(config.block_size), "enable_prefix_caching": str(config.enable_prefix_caching)})

    def attach(self, engine: EngineClient) -> None:
        """Called once the engine has loaded: from here on the server is ready."""
        self.limits = ServerLimits(
            vocab_size=engine.vocab_size,
            max_model_len=engine.max_model_len,
            enable_logprob=self.config.enable_logprob,
            max_logprobs=self.config.max_logprobs,
            guided_any_whitespace=self.config.guided_decoding_any_whitespace,
        )
        self.token_texts = TokenTexts(engine.tokenizer)
        self.engine = engine

    @property
    def ready(self) -> bool:
        return self.engine is not None and bool(self.engine.is_alive) and not self.draining

    def stats(self) -> EngineStats | None:
        return self.engine.stats() if self.engine is not None else None

    def require_engine(self) -> EngineClient:
        """The engine, or 503 while loading, shutting down, or after a crash."""
        if self.draining:
            raise APIError("the server is shutting down; retry on another replica", 503, headers={"Retry-After": "1"})
        if self.engine is None:
            if self.load_error is not None:
                raise APIError(f"the model failed to load: {self.load_error}", 503)
            raise APIError("the model is still loading; retry shortly", 503, headers={"Retry-After": "5"})
        if not self.engine.is_alive:
            raise APIError("the engine has stopped; the server log has the details", 503)
        return self.engine

    def lora_modules(self) -> list[LoRAModule]:
        """The LoRA adapters served now (none while loading or without --enable-lora)."""
        if not self.config.enable_lora or self.engine is None:
            return []
        return self.engine.lora_modules()

    def check_model(self, requested: str | None) -> str | None:
        """An absent `model` means the served one; a LoRA adapter's name picks that adapter (returned);
        any other name is 404, as OpenAI answers."""
        if requested is not None and requested != self.model_name and self.config.enable_lora:
            if any(m.name == requested for m in self.lora_modules()):
                return requested
        if requested is not None and requested != self.model_name:
            raise APIError(
                f"the model {requested!r} does not exist here; this server serves {self.model_name!r}",
                404,
                param="model",
                code="model_not_found",
            )
        return None


def get_state(request: Request) -> ServerState:
    return request.app.state.bowline
