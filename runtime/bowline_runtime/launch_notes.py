"""What Bowline does with the reference documents' launch flags and environment variables that have
no effect of their own here, said once in the start-up log instead of refused.

A launch script copied from a vLLM-Ascend or Chinese-LLaMA-Alpaca-2 deployment must start (never
"unrecognized arguments"), and its operator must be able to read in the log what each setting did.
The table in docs/seed-flags.md is the long form of these lines.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from bowline_runtime.config import EngineConfig

logger = logging.getLogger("bowline.config")

# Environment variables of the Ascend document, and what becomes of them in this process.
ENV_NOTES = {
    "ASCEND_RT_VISIBLE_DEVICES": "honoured by the NPU runtime itself: --device npu sees only these NPUs",
    "PYTORCH_NPU_ALLOC_CONF": "honoured by torch_npu's allocator itself (it reads it when the NPU starts)",
    "VLLM_IMAGE_FETCH_TIMEOUT": "no effect: this server fetches no images",
    "INFER_MODE": "no effect: Bowline has no graph mode (PTA/torchair); it always runs eagerly",
    "PTA_TORCHAIR_DECODE_GEAR_ENABLE": "no effect: Bowline has no graph mode, so no decode gears",
    "PTA_TORCHAIR_DECODE_GEAR_LIST": "no effect: Bowline has no graph mode, so no decode gears",
    "USE_PFA_HIGH_PRECISION_MODE": "no effect: Bowline's attention is torch's, in the model's dtype",
    "USE_IFA_HIGH_PRECISION_MODE": "no effect: Bowline's attention is torch's, in the model's dtype",
    "USE_PREFIX_HIGH_PRECISION_MODE": "no effect: Bowline's attention is torch's, in the model's dtype",
    "HCCL_OP_EXPANSION_MODE": "honoured by HCCL itself for tensor-parallel collectives on NPUs",
}


def launch_notes(config: EngineConfig, environ: Mapping[str, str]) -> list[str]:
    """One sentence per seed setting that is accepted without changing what the engine does (or that
    another component honours), for the settings this launch actually sets."""
    notes = []
    if config.enforce_eager:
        notes.append("--enforce-eager: accepted; Bowline never captures graphs, every step already runs eagerly")
    if config.disable_async_output_proc:
        notes.append(
            "--disable-async-output-proc: accepted; Bowline turns a step's tokens into outputs right after "
            "that step, there is no asynchronous output processor to turn off"
        )
    if config.distributed_executor_backend == "ray":
        notes.append(
            "--distributed-executor-backend ray: Bowline has no Ray executor; tensor-parallel ranks run as "
            "local processes (the mp backend), which needs no Ray cluster"
        )
    elif config.distributed_executor_backend == "mp":
        notes.append("--distributed-executor-backend mp: tensor-parallel ranks run as local processes (the default)")
    if config.num_scheduler_steps > 1:
        stream = "each token as it comes" if config.multi_step_stream_outputs else "a run's tokens at once"
        notes.append(
            f"--num-scheduler-steps {config.num_scheduler_steps}: each scheduling decision runs up to "
            f"{config.num_scheduler_steps} steps with no admission in between; outputs stream {stream}"
        )
    if config.engine_iteration_timeout_s is not None:
        notes.append(
            f"engine iteration timeout {config.engine_iteration_timeout_s:g} s: a longer step fails its requests "
            "and marks the engine unhealthy (/health 503)"
        )
    for name, note in ENV_NOTES.items():
        if name in environ:
            notes.append(f"{name}={environ[name]}: {note}")
    return notes


def log_launch_notes(config: EngineConfig, environ: Mapping[str, str]) -> None:
    for note in launch_notes(config, environ):
        logger.info(note)
