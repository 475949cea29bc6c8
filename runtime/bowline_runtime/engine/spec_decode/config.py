"""The speculative-decoding settings, from vLLM's flags or its JSON `--speculative-config`.

Older vLLM releases spell it as separate flags (`--speculative-model PATH|[ngram]`,
`--num-speculative-tokens`, `--ngram-prompt-lookup-max/min`, ...); newer ones take one JSON object
(`{"method": "ngram"|"draft_model", "model": ..., "num_speculative_tokens": k, ...}`). Both land here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

NGRAM = "[ngram]"

Method = Literal["ngram", "draft_model"]


@dataclass(frozen=True, slots=True)
class SpeculativeConfig:
    method: Method
    num_speculative_tokens: int
    model: str | None = None  # the draft model folder (draft_model only)
    draft_tensor_parallel_size: int = 1
    prompt_lookup_max: int = 4
    prompt_lookup_min: int = 1
    disable_by_batch_size: int | None = None  # no speculation while this many sequences run

    def __post_init__(self) -> None:
        if self.method not in ("ngram", "draft_model"):
            raise ValueError(f"speculative method must be 'ngram' or 'draft_model', got {self.method!r}")
        if self.num_speculative_tokens < 1:
            raise ValueError(f"--num-speculative-tokens must be >= 1, got {self.num_speculative_tokens}")
        if self.method == "draft_model" and not self.model:
            raise ValueError("the draft_model method needs a draft model (--speculative-model PATH)")
        if self.method == "ngram":
            if not 1 <= self.prompt_lookup_min <= self.prompt_lookup_max:
                raise ValueError(
                    "--ngram-prompt-lookup-min and --ngram-prompt-lookup-max must satisfy 1 <= min <= max, got "
                    f"min={self.prompt_lookup_min} max={self.prompt_lookup_max}"
                )
        if self.draft_tensor_parallel_size < 1:
            raise ValueError(
                f"--speculative-draft-tensor-parallel-size must be >= 1, got {self.draft_tensor_parallel_size}"
            )
        if self.disable_by_batch_size is not None and self.disable_by_batch_size < 1:
            raise ValueError(f"--speculative-disable-by-batch-size must be >= 1, got {self.disable_by_batch_size}")

    @property
    def sharded_draft(self) -> bool:
        """Whether the draft model is sharded over the target's ranks (its TP size, checked by
        `check_draft_tensor_parallel`, is then the target's) instead of running whole beside rank 0."""
        return self.method == "draft_model" and self.draft_tensor_parallel_size > 1


def check_draft_tensor_parallel(spec: SpeculativeConfig, tensor_parallel_size: int, pipeline_parallel_size: int) -> None:
    """vLLM's rule: the draft's TP size is 1 (one unsharded copy beside rank 0) or the target's (the
    draft sharded over the same ranks). The n-gram method has no draft model: vLLM ignores the size there,
    and so do we. A sharded draft runs on the target's tensor-parallel group, which pipeline stages split."""
    size = spec.draft_tensor_parallel_size
    if spec.method != "draft_model" or size == 1:
        return
    flag = f"--speculative-draft-tensor-parallel-size (draft_tensor_parallel_size) {size}"
    if size != tensor_parallel_size:
        allowed = "1 (the draft unsharded beside rank 0)"
        if tensor_parallel_size > 1:
            allowed += f" or {tensor_parallel_size} (the draft sharded over the target's ranks)"
        raise ValueError(
            f"{flag} is not supported with --tensor-parallel-size {tensor_parallel_size}: use {allowed}"
        )
    if pipeline_parallel_size > 1:
        raise ValueError(
            f"{flag} (a sharded draft) does not work with --pipeline-parallel-size {pipeline_parallel_size}: "
            "use 1 (the draft unsharded beside rank 0)"
        )


# JSON keys (vLLM's SpeculativeConfig field names) -> our field names.
_JSON_KEYS = {
    "method": "method",
    "model": "model",
    "num_speculative_tokens": "num_speculative_tokens",
    "draft_tensor_parallel_size": "draft_tensor_parallel_size",
    "prompt_lookup_max": "prompt_lookup_max",
    "prompt_lookup_min": "prompt_lookup_min",
    "disable_by_batch_size": "disable_by_batch_size",
}


def _parse_json(text: str) -> dict[str, Any]:
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--speculative-config is not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise ValueError("--speculative-config must be a JSON object")
    unknown = sorted(set(raw) - set(_JSON_KEYS))
    if unknown:
        raise ValueError(f"--speculative-config: unknown keys {unknown}; known: {sorted(_JSON_KEYS)}")
    return {_JSON_KEYS[k]: v for k, v in raw.items() if v is not None}


def speculative_config_from(config) -> SpeculativeConfig | None:
    """The speculation an EngineConfig asks for, or None. The separate flags fill what the JSON leaves out."""
    values: dict[str, Any] = {}
    if config.speculative_model is not None:
        if config.speculative_model == NGRAM:
            values["method"] = "ngram"
        else:
            values["method"] = "draft_model"
            values["model"] = config.speculative_model
    flags = {
        "num_speculative_tokens": config.num_speculative_tokens,
        "draft_tensor_parallel_size": config.speculative_draft_tensor_parallel_size,
        "prompt_lookup_max": config.ngram_prompt_lookup_max,
        "prompt_lookup_min": config.ngram_prompt_lookup_min,
        "disable_by_batch_size": config.speculative_disable_by_batch_size,
    }
    values.update({k: v for k, v in flags.items() if v is not None})
    if config.speculative_config:
        parsed = _parse_json(config.speculative_config)
        if parsed.get("model") == NGRAM:  # the old spelling inside the new form
            parsed.pop("model")
            parsed.setdefault("method", "ngram")
        if "model" in parsed and "method" not in parsed:
            parsed["method"] = "draft_model"
        values.update(parsed)
    if "method" not in values:
        if len(values):
            raise ValueError(
                "speculative settings were given without a method: set --speculative-model PATH|[ngram] "
                "or --speculative-config '{\"method\": ...}'"
            )
        return None
    if "num_speculative_tokens" not in values:
        raise ValueError("speculative decoding needs --num-speculative-tokens (or num_speculative_tokens in the JSON)")
    if values["method"] == "ngram" and "prompt_lookup_max" in values and "prompt_lookup_min" not in values:
        values["prompt_lookup_min"] = min(1, values["prompt_lookup_max"])
    try:
        for key in ("num_speculative_tokens", "draft_tensor_parallel_size", "prompt_lookup_max",
                    "prompt_lookup_min", "disable_by_batch_size"):
            if key in values:
                values[key] = int(values[key])
    except (TypeError, ValueError):
        raise ValueError(f"speculative setting {key} must be an integer, got {values[key]!r}") from None
    spec = SpeculativeConfig(**values)
    check_draft_tensor_parallel(spec, config.tensor_parallel_size, config.pipeline_parallel_size)
    return spec
