"""Pydantic models of the InferenceService spec: the CRD schema's shape and per-field bounds, in Python.

The CRD's openAPIV3Schema is what the API server enforces; these models enforce the same per-field
rules inside the operator (clusters without CEL or with an old CRD still get clear errors) and give
the renderer typed, defaulted values instead of nested dict lookups. Cross-field rules live in
`validation.py` next to their CEL twins.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

SOURCE_PATTERN = re.compile(r"^(pvc://[a-z0-9]([-a-z0-9.]*[a-z0-9])?(/.*)?|hostPath:///.*|hf://[^/]+/[^/]+|/.*)$")

# Flags the operator sets itself; `engine.extraArgs` may not repeat them (the CRD's CEL rule says the same).
MANAGED_FLAGS = ("model", "served-model-name", "host", "port", "device", "tensor-parallel-size", "max-model-len",
                 "pipeline-parallel-size", "nnodes", "node-rank", "master-addr", "master-port")
MANAGED_FLAG_PATTERN = re.compile(r"^--(" + "|".join(MANAGED_FLAGS) + r")(=.*)?$")


class _Model(BaseModel):
    # camelCase in YAML, snake_case in Python; unknown fields are ignored as the API server prunes them.
    model_config = ConfigDict(populate_by_name=True, extra="ignore", frozen=True,
                              alias_generator=lambda name: re.sub(r"_([a-z])", lambda m: m.group(1).upper(), name))


# A storage quantity (100Gi, 5e9, 1500M): the CRD's pattern for cache.size, as in the claim it becomes.
QUANTITY_PATTERN = r"^([0-9]+(\.[0-9]*)?|\.[0-9]+)([KMGTPE]i|[kMGTPE]|[eE][0-9]+)?$"


class ModelCacheSpec(_Model):
    """A PersistentVolumeClaim per model, filled once by a Job and shared (see model_cache.py)."""

    enabled: bool = False
    storage_class_name: str | None = Field(default=None, max_length=253)
    size: str | int = "100Gi"
    access_mode: Literal["ReadWriteOnce", "ReadWriteMany"] = "ReadWriteOnce"
    delete_policy: Literal["Retain", "Delete"] = "Retain"

    @field_validator("size")
    @classmethod
    def _quantity(cls, value: str | int) -> str | int:
        if not re.match(QUANTITY_PATTERN, str(value)):
            raise ValueError("must be a storage quantity such as 20Gi or 500M")
        return value


class ModelSpec(_Model):
    source: str = Field(min_length=1, max_length=1024)
    served_model_name: str | None = Field(default=None, min_length=1, max_length=256)
    revision: str | None = None
    cache_size_limit: str | int | None = None
    hf_token_secret_name: str | None = None
    cache: ModelCacheSpec = Field(default_factory=ModelCacheSpec)

    @field_validator("source")
    @classmethod
    def _known_scheme(cls, value: str) -> str:
        if not SOURCE_PATTERN.match(value):
            raise ValueError("must be pvc://CLAIM/PATH, hostPath:///DIR, hf://ORG/NAME or an absolute path in the image")
        return value


class AcceleratorSpec(_Model):
    type: Literal["gpu", "npu", "cpu"]
    vendor: Literal["nvidia", "amd", "ascend"] | None = None
    count: int | None = Field(default=None, ge=1, le=64)
    resource_name: str | None = None
    runtime_class_name: str | None = None


class EngineSpec(_Model):
    dtype: Literal["auto", "float16", "bfloat16", "float32"] | None = None
    quantization: Literal["auto", "none", "awq", "w8a8", "smoothquant", "compressed-tensors", "int8"] | None = None
    kv_cache_dtype: Literal["auto", "float16", "bfloat16"] | None = None
    max_num_seqs: int | None = Field(default=None, ge=1)
    max_num_batched_tokens: int | None = Field(default=None, ge=1)
    memory_utilization: float | None = Field(default=None, gt=0, le=1)
    block_size: int | None = Field(default=None, ge=1, le=1024)
    enable_prefix_caching: bool | None = None
    extra_args: list[str] = Field(default_factory=list, max_length=64)


class RuntimeSpec(_Model):
    image: str | None = None
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] | None = None
    port: int = Field(default=8000, ge=1, le=65535)
    env: list[dict[str, Any]] = Field(default_factory=list)
    resources: dict[str, Any] = Field(default_factory=dict)
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[dict[str, Any]] = Field(default_factory=list)
    affinity: dict[str, Any] | None = None
    pod_annotations: dict[str, str] = Field(default_factory=dict)
    pod_labels: dict[str, str] = Field(default_factory=dict)
    service_account_name: str | None = None
    scheduler_name: str | None = None
    run_as_root: bool = False
    startup_timeout_seconds: int = Field(default=1800, ge=60)
    # None: spread across nodes (scheduling.py); [] turns spreading off; a list replaces the default.
    topology_spread_constraints: list[dict[str, Any]] | None = None


# The runtime's vLLM-named gauges a scaler may follow (autoscaling.py maps each to its series).
AUTOSCALING_METRICS = ("num_requests_waiting", "num_requests_running", "kv_cache_usage")


class AutoscalingSpec(_Model):
    min_replicas: int = Field(default=1, ge=1, le=1000)
    max_replicas: int = Field(ge=1, le=1000)
    metric: Literal["num_requests_waiting", "num_requests_running", "kv_cache_usage"] = "num_requests_waiting"
    target: float | None = Field(default=None, gt=0)
    scale_down_delay_seconds: int = Field(default=300, ge=0, le=3600)


class SpeculativeSpec(_Model):
    """Speculative decoding: a draft model (mounted like the main one) or n-gram prompt lookup."""

    method: Literal["draft_model", "ngram"] | None = None  # None: draft_model
    model: ModelSpec | None = None
    num_speculative_tokens: int = Field(ge=1, le=16)
    prompt_lookup_max: int | None = Field(default=None, ge=1, le=64)
    prompt_lookup_min: int | None = Field(default=None, ge=1, le=64)
    disable_by_batch_size: int | None = Field(default=None, ge=1)
    draft_tensor_parallel_size: int | None = Field(default=None, ge=1, le=64)  # 1 or tensorParallelSize

    @property
    def resolved_method(self) -> str:
        return self.method or "draft_model"


# vLLM's --max-lora-rank values; an adapter name is a model id (no spaces, no '=').
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
ADAPTER_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,252}$"


class AdapterSpec(_Model):
    name: str = Field(pattern=ADAPTER_NAME_PATTERN)
    source: str = Field(min_length=1, max_length=1024)

    @field_validator("source")
    @classmethod
    def _known_scheme(cls, value: str) -> str:
        return ModelSpec._known_scheme(value)


class LoRASpec(_Model):
    max_rank: Literal[1, 8, 16, 32, 64, 128, 256, 320, 512] | None = None
    max_adapters: int | None = Field(default=None, ge=1)
    max_cpu_adapters: int | None = Field(default=None, ge=1)


class GatewaySpec(_Model):
    """An InferencePool + InferenceObjective for Gateway API inference routing (see gateway.py)."""

    enabled: bool = False
    pool_name: str | None = Field(default=None, min_length=1, max_length=63, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    priority: int | None = None


class InferenceServiceSpec(_Model):
    model: ModelSpec
    accelerator: AcceleratorSpec
    tensor_parallel_size: int = Field(default=1, ge=1, le=64)
    pipeline_parallel_size: int = Field(default=1, ge=1, le=64)
    nodes: int = Field(default=1, ge=1, le=64)  # pods per model copy; > 1 renders a LeaderWorkerSet
    max_model_len: int | None = Field(default=None, ge=1)
    replicas: int = Field(default=1, ge=0)
    engine: EngineSpec = Field(default_factory=EngineSpec)
    speculative: SpeculativeSpec | None = None
    runtime: RuntimeSpec = Field(default_factory=RuntimeSpec)
    adapters: list[AdapterSpec] = Field(default_factory=list, max_length=64)
    lora: LoRASpec | None = None
    gateway: GatewaySpec = Field(default_factory=GatewaySpec)
    autoscaling: AutoscalingSpec | None = None


def parse_spec(spec: dict[str, Any]) -> InferenceServiceSpec:
    """Parse a spec dict (as stored in the API server) into the typed model; raises pydantic.ValidationError."""
    return InferenceServiceSpec.model_validate(spec)
