"""One validated engine/server configuration, built from command-line flags or environment variables.

Every flag `--some-flag` can also be set as `BOWLINE_SOME_FLAG`, so a Kubernetes Deployment may use
either args or env. The flag names are vLLM's and FastDeploy's, so reference commands work unchanged.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Literal, get_args, get_origin, get_type_hints

ENV_PREFIX = "BOWLINE_"

DType = Literal["auto", "float32", "float16", "bfloat16"]
# vLLM's --kv-cache-dtype names that Bowline stores (its fp8 formats are not built: they are refused by name).
KVCacheDType = Literal["auto", "float16", "bfloat16"]
# vLLM's names; smoothquant and compressed-tensors are read as w8a8 (models.quantization).
Quantization = Literal["auto", "none", "awq", "w8a8", "smoothquant", "compressed-tensors", "int8"]


@dataclass(slots=True)
class EngineConfig:
    """What the engine and the server need to start. Field names are the flags' names with `_`."""

    model: str
    served_model_name: str | None = None
    tokenizer: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    device: str = "auto"
    dtype: DType = "auto"
    load_format: Literal["auto", "dummy"] = "auto"
    quantization: Quantization = "auto"
    trust_remote_code: bool = False
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29501
    distributed_init_timeout: float = 600.0
    max_model_len: int | None = None
    max_num_seqs: int = 64
    max_num_batched_tokens: int | None = None
    block_size: int = 16
    gpu_memory_utilization: float = 0.9
    kv_cache_memory: int | None = None  # bytes; default on CPU: 1 GiB
    kv_cache_dtype: KVCacheDType = "auto"
    enable_prefix_caching: bool = False
    enable_chunked_prefill: bool = True
    # Speculative decoding (engine/spec_decode): vLLM's separate flags and its JSON form.
    speculative_model: str | None = None
    num_speculative_tokens: int | None = None
    speculative_draft_tensor_parallel_size: int | None = None
    ngram_prompt_lookup_max: int | None = None
    ngram_prompt_lookup_min: int | None = None
    speculative_disable_by_batch_size: int | None = None
    speculative_config: str | None = None
    seed: int = 0
    chat_template: str | None = None
    enable_logprob: bool = False
    max_logprobs: int = 20
    api_key: str | None = None
    max_queue_len: int = 1024
    max_request_body_bytes: int = 4 * 2**20
    shutdown_grace_period: float = 30.0
    tool_call_parser: str | None = None
    reasoning_parser: str | None = None
    guided_decoding_any_whitespace: bool = False
    limit_mm_per_prompt: str | None = None  # vLLM's JSON, e.g. {"image": 2}
    image_fetch_timeout: float = 5.0  # seconds; VLLM_IMAGE_FETCH_TIMEOUT seeds it too
    max_image_bytes: int = 20 * 2**20
    enable_prompt_tokens_details: bool = False
    log_level: str = "info"
    # Multi-LoRA (bowline_runtime.lora), vLLM's flags
    enable_lora: bool = False
    lora_modules: list[str] | None = None  # name=path or JSON items; see lora.modules
    max_lora_rank: int = 16
    max_loras: int = 1
    max_cpu_loras: int | None = None  # None: --max-loras
    allow_runtime_lora_updating: bool = False  # also VLLM_ALLOW_RUNTIME_LORA_UPDATING
    # The reference documents' remaining launch flags (docs/seed-flags.md says what each does here).
    api_server: Literal["openai", "vllm", "both"] = "both"
    tokenizer_mode: Literal["auto", "slow"] = "auto"
    num_scheduler_steps: int = 1
    multi_step_stream_outputs: bool = True
    engine_iteration_timeout_s: float | None = None  # also read from VLLM_ENGINE_ITERATION_TIMEOUT_S
    enforce_eager: bool = False
    disable_async_output_proc: bool = False
    distributed_executor_backend: Literal["mp", "ray"] | None = None

    @property
    def model_name(self) -> str:
        """The name clients send as `model`: the served name, else the model path as given."""
        return self.served_model_name or self.model

    def __post_init__(self) -> None:
        if self.tensor_parallel_size < 1:
            raise ValueError(f"--tensor-parallel-size must be >= 1, got {self.tensor_parallel_size}")
        if self.pipeline_parallel_size < 1:
            raise ValueError(f"--pipeline-parallel-size must be >= 1, got {self.pipeline_parallel_size}")
        if self.nnodes < 1:
            raise ValueError(f"--nnodes must be >= 1, got {self.nnodes}")
        if not 0 <= self.node_rank < self.nnodes:
            raise ValueError(f"--node-rank must be in [0, {self.nnodes}), got {self.node_rank}")
        if (self.tensor_parallel_size * self.pipeline_parallel_size) % self.nnodes:
            raise ValueError(
                f"--tensor-parallel-size x --pipeline-parallel-size ({self.tensor_parallel_size} x "
                f"{self.pipeline_parallel_size}) must split evenly over --nnodes {self.nnodes}"
            )
        if self.block_size < 1:
            raise ValueError(f"--block-size must be >= 1, got {self.block_size}")
        if self.max_num_seqs < 1:
            raise ValueError(f"--max-num-seqs must be >= 1, got {self.max_num_seqs}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"--gpu-memory-utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"--max-model-len must be >= 1, got {self.max_model_len}")
        if self.image_fetch_timeout <= 0:
            raise ValueError(f"--image-fetch-timeout must be > 0, got {self.image_fetch_timeout}")
        parse_mm_limit(self.limit_mm_per_prompt)  # a bad value fails at start-up, not per request
        from bowline_runtime.lora.modules import check_settings, parse_modules

        check_settings(self.enable_lora, parse_modules(self.lora_modules), self.max_lora_rank, self.max_loras,
                       self.max_cpu_loras, self.model_name)
        if self.num_scheduler_steps < 1:
            raise ValueError(f"--num-scheduler-steps must be >= 1, got {self.num_scheduler_steps}")
        if self.engine_iteration_timeout_s is not None and self.engine_iteration_timeout_s <= 0:
            raise ValueError(f"the engine iteration timeout must be > 0 seconds, got {self.engine_iteration_timeout_s}")
        from bowline_runtime.engine.spec_decode.config import speculative_config_from

        speculative = speculative_config_from(self)  # bad speculative settings fail at start-up, with the flag's name
        if speculative is not None and self.num_scheduler_steps > 1:
            raise ValueError("--num-scheduler-steps > 1 cannot be combined with speculative decoding")


def parse_mm_limit(value: str | None) -> int | None:
    """`--limit-mm-per-prompt`: vLLM's JSON `{"image": N}` (or its older `image=N`); None: no limit."""
    if value is None or not str(value).strip():
        return None
    text = str(value).strip()
    try:
        limits = json.loads(text) if text.startswith("{") else {
            k.strip(): int(v) for k, v in (item.split("=", 1) for item in text.split(","))
        }
    except (ValueError, TypeError) as exc:
        raise ValueError(f'--limit-mm-per-prompt {value!r}: expected JSON such as {{"image": 2}} ({exc})') from None
    if not isinstance(limits, dict) or not all(isinstance(v, int) and v >= 0 for v in limits.values()):
        raise ValueError(f'--limit-mm-per-prompt {value!r}: expected counts such as {{"image": 2}}')
    unknown = set(limits) - {"image"}
    if unknown:
        raise ValueError(f"--limit-mm-per-prompt {value!r}: only images are served (not {sorted(unknown)})")
    return limits.get("image")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def switch_on(name: str, environ: Mapping[str, str] | None = None) -> bool:
    """An on-by-default switch variable (BOWLINE_CPU_KERNELS and the like): off for 0, false, no or off."""
    value = (os.environ if environ is None else environ).get(name, "1")
    return value.strip().lower() not in {"0", "false", "no", "off"}


def env_name(name: str) -> str:
    """The environment variable that sets a field, e.g. `max_model_len` -> `BOWLINE_MAX_MODEL_LEN`."""
    return ENV_PREFIX + name.upper()


_HELP = {
    "model": "Hugging Face model folder (config.json, safetensors, tokenizer)",
    "served_model_name": "name clients pass as `model` (default: the --model value)",
    "tokenizer": "tokenizer folder, if not the model folder",
    "device": "auto picks npu, then cuda, then cpu",
    "dtype": "weights and activations dtype; auto takes the config's, float32 on CPU",
    "load_format": "dummy: random weights from config.json (benchmarks at real shapes)",
    "quantization": "weights' format: auto follows config.json's quantization_config; awq (4-bit AutoAWQ), "
    "w8a8 (alias smoothquant: compressed-tensors int8 weights and per-token int8 activations), int8 (weight-only, "
    "quantized at load from a float checkpoint), none",
    "tensor_parallel_size": "shard the model over this many devices (processes)",
    "pipeline_parallel_size": "split the layers into this many stages (processes), each of "
    "--tensor-parallel-size ranks",
    "nnodes": "nodes (processes started separately) sharing one model copy; each runs "
    "tensor x pipeline parallel size / nnodes ranks [default from LWS_GROUP_SIZE]",
    "node_rank": "this node's index; 0 serves HTTP, the others run ranks only [default from LWS_WORKER_INDEX]",
    "master_addr": "the leader's address (node 0) [default from LWS_LEADER_ADDRESS]",
    "master_port": "the leader's rendezvous port; the next port carries the liveness watch",
    "distributed_init_timeout": "seconds the leader waits for every rank to join (the error names the missing ones)",
    "max_model_len": "bound on prompt + output tokens (default: the model's position limit)",
    "max_num_seqs": "most sequences in one batch",
    "max_num_batched_tokens": "most tokens in one forward step (prefill chunking bound; default 512 on CPU, "
    "2048 on accelerators, at least --max-model-len without chunked prefill)",
    "block_size": "KV-cache block size in tokens",
    "gpu_memory_utilization": "fraction of accelerator memory for weights + KV cache",
    "kv_cache_memory": "KV-cache size in bytes (CPU default: 1 GiB; overrides the utilization fraction)",
    "kv_cache_dtype": "KV-cache element type: auto is the model's dtype; float16 or bfloat16 under a float32 "
    "model hold twice the tokens in the same memory and halve what attention reads per step (keys and values "
    "are rounded as they are stored; attention still sums in float32)",
    "enable_prefix_caching": "share full KV blocks between requests with the same prefix",
    "enable_chunked_prefill": "split long prompts over steps (off: a prompt waits until it fits one step whole)",
    "speculative_model": "draft model folder (same tokenizer), or [ngram] for prompt lookup: speculative decoding",
    "num_speculative_tokens": "tokens proposed per sequence and step for speculative decoding",
    "speculative_draft_tensor_parallel_size": "the draft model's tensor-parallel size: 1 (unsharded beside rank 0, the default) "
    "or --tensor-parallel-size (sharded over the same ranks)",
    "ngram_prompt_lookup_max": "longest n-gram matched in the prompt + output ([ngram] method; default 4)",
    "ngram_prompt_lookup_min": "shortest n-gram matched ([ngram] method; default 1)",
    "speculative_disable_by_batch_size": "no speculation while at least this many sequences run",
    "speculative_config": "speculative decoding as JSON: {\"method\": \"ngram\"|\"draft_model\", \"model\": ..., "
    "\"num_speculative_tokens\": k, \"prompt_lookup_max\": ..., ...}",
    "seed": "seed of the engine's random state: dummy weights and requests that give no seed",
    "chat_template": "Jinja chat template file (or inline template) overriding the tokenizer's",
    "enable_logprob": "allow logprobs in responses",
    "api_key": "require `Authorization: Bearer KEY` on /v1 routes",
    "max_queue_len": "requests waiting beyond this get HTTP 429",
    "max_request_body_bytes": "larger request bodies get HTTP 413 before they are read (0: no limit; default 4 MiB)",
    "shutdown_grace_period": "seconds to finish in-flight requests after SIGTERM",
    "tool_call_parser": "parser for tool calls in generated text (e.g. hermes)",
    "reasoning_parser": "parser splitting reasoning from content (e.g. qwen3, deepseek_r1)",
    "guided_decoding_any_whitespace": "let guided JSON contain free whitespace (default: compact JSON)",
    "limit_mm_per_prompt": 'most images per request, as JSON: {"image": N} (default: no limit)',
    "image_fetch_timeout": "seconds to fetch a request's http(s) image URLs (default 5; also read from "
    "VLLM_IMAGE_FETCH_TIMEOUT)",
    "max_image_bytes": "largest image accepted, fetched or in a data: URL (default 20 MiB)",
    "enable_prompt_tokens_details": "report usage.prompt_tokens_details.cached_tokens (prefix-cache hits) in chat usage",
    "enable_lora": "serve LoRA adapters over the base model (requests name one as `model`)",
    "lora_modules": "adapters to serve: name=path or {\"name\": ..., \"path\": ..., \"base_model_name\": ...}, several",
    "max_lora_rank": "largest adapter rank accepted (one of 1, 8, 16, 32, 64, 128, 256, 320, 512)",
    "max_loras": "most adapters in one batch",
    "max_cpu_loras": "most adapters held loaded, a hard bound (the least recently used not running is dropped; >= --max-loras)",
    "allow_runtime_lora_updating": "enable /v1/load_lora_adapter and /v1/unload_lora_adapter "
    "(also VLLM_ALLOW_RUNTIME_LORA_UPDATING)",
    "api_server": "which routes to serve: openai (/v1/...), vllm (vLLM's native POST /generate) or both",
    "tokenizer_mode": "slow: the Python tokenizer where the model ships one (vLLM's --tokenizer-mode slow)",
    "num_scheduler_steps": "multi-step scheduling: decode steps per scheduling decision (no admission in between)",
    "multi_step_stream_outputs": "stream each token of a multi-step run (false: send the steps' tokens at once)",
    "engine_iteration_timeout_s": "seconds one engine step may run before its requests fail and the engine is "
    "marked unhealthy (also VLLM_ENGINE_ITERATION_TIMEOUT_S; default: no limit)",
    "enforce_eager": "accepted: Bowline always runs eagerly (it captures no graphs)",
    "disable_async_output_proc": "accepted: Bowline's output processing is already synchronous with the step",
    "distributed_executor_backend": "mp (tensor-parallel ranks as processes, what Bowline does); ray is accepted "
    "and runs mp",
}
# Flags that take several values.
_NARGS = {"lora_modules": "+"}

# Flags vLLM spells `--flag true|false` as well as bare `--flag` (vLLM's StoreBoolean): the Ascend
# document writes `--multi-step-stream-outputs false`.
_VALUE_BOOLS = {"multi_step_stream_outputs"}

# vLLM's own environment variables that name a setting here, read when the BOWLINE_ one is unset.
VLLM_ENV_ALIASES = {
    "engine_iteration_timeout_s": "VLLM_ENGINE_ITERATION_TIMEOUT_S",
    "image_fetch_timeout": "VLLM_IMAGE_FETCH_TIMEOUT",
}


# A LeaderWorkerSet sets these in every pod of a group; flags and BOWLINE_* variables still win.
LWS_ENV = {"master_addr": "LWS_LEADER_ADDRESS", "nnodes": "LWS_GROUP_SIZE", "node_rank": "LWS_WORKER_INDEX"}


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """Add one flag per EngineConfig field; each defaults to its environment variable, then the field default."""
    parser = parser or argparse.ArgumentParser(prog="bowline-runtime serve")
    for f in fields(EngineConfig):
        env = env_name(f.name)
        help_text = f"{_HELP.get(f.name, f.name.replace('_', ' '))} [env {env}]"
        annotation = str(f.type)
        if f.name in _VALUE_BOOLS:
            parser.add_argument(_flag(f.name), nargs="?", const="true", default=None, help=help_text)
            parser.add_argument("--no-" + _flag(f.name)[2:], dest=f.name, action="store_const", const="false")
        elif annotation == "bool":
            parser.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            parser.add_argument(_flag(f.name), default=None, nargs=_NARGS.get(f.name), help=help_text)
    return parser


def _coerce(annotation: str, raw: Any) -> Any:
    if raw is None:
        return None
    if annotation.startswith("list"):
        from bowline_runtime.lora.modules import split_items

        return split_items(raw)
    if annotation == "bool":
        if isinstance(raw, bool):
            return raw
        word = str(raw).strip().lower()
        if word in {"1", "true", "yes", "on"}:
            return True
        if word in {"0", "false", "no", "off", ""}:
            return False
        raise ValueError("expected true or false")
    if "int" in annotation and "float" not in annotation:
        try:
            return int(raw)
        except ValueError:
            raise ValueError("expected an integer") from None
    if "float" in annotation:
        try:
            return float(raw)
        except ValueError:
            raise ValueError("expected a number") from None
    return raw


def _choices(name: str) -> tuple[Any, ...]:
    """The allowed values of a Literal-typed field (--dtype, --load-format); () for the rest."""
    hint = get_type_hints(EngineConfig)[name]
    if get_origin(hint) is not Literal:  # Literal[...] | None: the Literal's values
        hint = next((a for a in get_args(hint) if get_origin(a) is Literal), hint)
    return get_args(hint) if get_origin(hint) is Literal else ()


def config_from_args(args: argparse.Namespace, environ: dict[str, str] | None = None) -> EngineConfig:
    """Flags win over environment variables; both win over defaults. Bad values raise ValueError."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for f in fields(EngineConfig):
        raw, source = getattr(args, f.name, None), _flag(f.name)
        if raw is None:
            raw, source = environ.get(env_name(f.name)), env_name(f.name)
        if raw is None and f.name in LWS_ENV:
            raw, source = environ.get(LWS_ENV[f.name]), LWS_ENV[f.name]
        if raw is None and f.name in VLLM_ENV_ALIASES:
            raw, source = environ.get(VLLM_ENV_ALIASES[f.name]), VLLM_ENV_ALIASES[f.name]
        if raw is None:
            continue
        try:
            values[f.name] = _coerce(str(f.type), raw)
            choices = _choices(f.name)
            if choices and values[f.name] not in choices:
                raise ValueError(f"choose one of {list(choices)}")
        except ValueError as exc:
            raise ValueError(f"{source}: cannot read {raw!r} ({exc})") from None
    if "allow_runtime_lora_updating" not in values:  # vLLM's variable works too
        from bowline_runtime.lora.modules import runtime_updating_allowed

        values["allow_runtime_lora_updating"] = runtime_updating_allowed(False, dict(environ))
    if "model" not in values:
        raise ValueError(f"--model is required (or set {env_name('model')})")
    return EngineConfig(**values)
