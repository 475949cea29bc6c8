"""Spec validation: the CRD's per-field schema (via `spec.py`) plus its cross-field CEL rules, in Python.

The API server enforces the same rules with `x-kubernetes-validations`, but clusters without CEL (or
objects created before the CRD was upgraded) reach the operator unchecked. An invalid spec must end as
`Valid=False` with a message a user can act on, never as a half-created Deployment.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from . import model_cache
from .autoscaling import autoscaling_problems
from .lora import lora_problems
from .spec import MANAGED_FLAG_PATTERN, InferenceServiceSpec, parse_spec


@dataclass(frozen=True, slots=True)
class Validated:
    """The outcome of validation: a typed spec, or the problems that prevent rendering it."""

    spec: InferenceServiceSpec | None
    problems: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return self.spec is not None and not self.problems


def cross_field_problems(spec: InferenceServiceSpec) -> list[str]:
    """The CRD's x-kubernetes-validations rules, one message each (the messages are the CRD's own)."""
    problems: list[str] = []
    acc = spec.accelerator
    single = spec.nodes == 1 and spec.pipeline_parallel_size == 1
    ranks = spec.tensor_parallel_size * spec.pipeline_parallel_size
    if acc.type != "cpu":
        if acc.count is None:
            problems.append("accelerator.count is required when accelerator.type is gpu or npu")
        elif not single:
            if ranks != spec.nodes * acc.count:
                problems.append("tensorParallelSize × pipelineParallelSize must equal nodes × accelerator.count")
        else:
            if spec.tensor_parallel_size > acc.count:
                problems.append("tensorParallelSize must not exceed accelerator.count")
            if acc.count % spec.tensor_parallel_size != 0:
                problems.append("tensorParallelSize must divide accelerator.count")
    if acc.type == "cpu" and ranks % spec.nodes != 0:
        problems.append("tensorParallelSize × pipelineParallelSize must be a multiple of nodes")
    if acc.type == "cpu" and acc.resource_name is not None:
        problems.append("accelerator.resourceName applies to gpu and npu only")
    if acc.vendor is not None and not (
        (acc.type == "gpu" and acc.vendor in ("nvidia", "amd")) or (acc.type == "npu" and acc.vendor == "ascend")
    ):
        problems.append("accelerator.vendor must be nvidia or amd for gpu, ascend for npu, and unset for cpu")
    eng = spec.engine
    if eng.max_num_batched_tokens is not None and eng.max_num_seqs is not None and eng.max_num_batched_tokens < eng.max_num_seqs:
        problems.append("engine.maxNumBatchedTokens must be at least engine.maxNumSeqs")
    if any(MANAGED_FLAG_PATTERN.match(arg) for arg in eng.extra_args):
        problems.append("engine.extraArgs must not set flags the operator manages; use the matching spec field")
    spec_dec = spec.speculative
    if spec_dec is not None and (spec_dec.model is None) != (spec_dec.resolved_method == "ngram"):
        problems.append("speculative.model is required for the draft_model method and must be unset for ngram")
    draft_tp = spec_dec.draft_tensor_parallel_size if spec_dec is not None else None
    if (spec_dec is not None and draft_tp is not None and spec_dec.resolved_method != "ngram" and draft_tp != 1
            and (draft_tp != spec.tensor_parallel_size or spec.pipeline_parallel_size > 1)):
        problems.append(
            "speculative.draftTensorParallelSize must be 1 or tensorParallelSize (1 with pipelineParallelSize above 1)"
        )
    problems += autoscaling_problems(spec)
    cache = spec.model.cache
    if spec.nodes > 1 and (spec.autoscaling is not None or (cache is not None and cache.enabled)):
        problems.append("autoscaling and model.cache apply to one-node services (nodes: 1) only")  # both target the Deployment, which a LeaderWorkerSet replaces
    return problems


def _field_problems(error: ValidationError) -> list[str]:
    """pydantic's errors as `spec.path: message`, the way `kubectl apply` reports schema errors."""
    out = []
    for item in error.errors():
        path = ".".join(str(part) for part in item["loc"])
        out.append(f"spec.{path}: {item['msg']}" if path else f"spec: {item['msg']}")
    return out


def validate_spec(raw: dict[str, Any] | None, name: str | None = None) -> Validated:
    """Check a raw spec dict against the schema and the cross-field rules; never raises.

    `name`: the object's metadata.name, the served model name when model.servedModelName is unset."""
    try:
        spec = parse_spec(raw or {})
    except ValidationError as error:
        return Validated(None, tuple(_field_problems(error)))
    problems = (cross_field_problems(spec) + model_cache.problems(spec)
                + lora_problems(spec, spec.model.served_model_name or name))
    return Validated(spec if not problems else None, tuple(problems))
