"""Tensor-parallel ranks: rank 0 (the driver) schedules and samples; ranks 1..N-1 run its forward passes.

Each rank is a process holding one shard of the weights and of the KV cache. Every step the driver
broadcasts the StepInput (a few small tensors) over torch.distributed, then all ranks run the same
forward; the sharded layers' all-reduces keep them in step. The backend comes from the device layer
(gloo on CPU, nccl on CUDA, hccl on NPU).
"""

from __future__ import annotations

import datetime
import logging
import signal
import socket
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bowline_runtime.config import EngineConfig, switch_on
from bowline_runtime.devices import Device, get_device
from bowline_runtime.devices.threads import usable_cores
from bowline_runtime.engine.model_runner import ModelRunner, StepInput
from bowline_runtime.models import loader, packed_decoder, vision
from bowline_runtime.models.attention import head_dim
from bowline_runtime.models.packed_decoder import PackedDecoder
from bowline_runtime.models.tensor_parallel import check_divisible, shard_model

logger = logging.getLogger("bowline.worker")

_TIMEOUT = datetime.timedelta(minutes=30)

# Sent to the worker ranks in place of a step when the engine has gone idle (see devices.host_memory).
RELEASE_IDLE_MEMORY = "release-idle-memory"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _threads_per_rank(device: Device, world_size: int) -> None:
    """On CPU the ranks share the cores: give each its fair part instead of oversubscribing."""
    if device.type == "cpu":
        torch.set_num_threads(max(1, usable_cores() // world_size))


@dataclass(slots=True)
class LoRAUpdate:
    """Sent to every rank between steps: install an adapter's weights (each rank takes its shard) or drop them."""

    lora_id: int
    adapter: Any  # lora.adapter.LoRAAdapter, or None to drop
    layout: Any  # lora.delta.LoRALayout


def build_runner(config: EngineConfig, device: Device, dtype: torch.dtype, rank: int, world_size: int) -> ModelRunner:
    device.prepare_process()
    hf_config = loader.load_config(config.model, config.trust_remote_code)
    text_config = hf_config.get_text_config()  # itself for a text model; a vision-language model's LM part
    check_divisible(text_config, world_size)
    model = loader.load_model(
        config.model, hf_config, dtype, config.load_format, config.trust_remote_code, seed=config.seed,
        quantization=config.quantization,
    )
    shard_model(model, rank, world_size)
    torch_device = device.torch_device(rank)
    model.to(torch_device)
    # Before the device packs its Linear layers: the decoder fuses q/k/v and gate/up into one product each.
    lm = vision.language_model(model)  # the model itself, or a vision-language model's LM part
    use_packed = switch_on(packed_decoder.PACKED_DECODER_ENV) and packed_decoder.supports(lm)
    decoder = PackedDecoder(lm, device.fused_ops(dtype)) if use_packed else None
    if config.enable_lora and decoder is None:
        raise ValueError(
            f"--enable-lora needs a Llama-family model ({', '.join(sorted(packed_decoder.SUPPORTED_MODEL_TYPES))}) "
            f"served by the packed decoder ({packed_decoder.PACKED_DECODER_ENV} on)"
        )
    device.optimize_model(model)
    runner = ModelRunner(
        model, torch_device, dtype, is_driver=rank == 0, block_size=config.block_size, decoder=decoder,
        stage_decode_context=device.stages_decode_context, decode_kernel=device.paged_decode_kernel(dtype),
        prefill_kernel=device.paged_prefill_kernel(dtype, head_dim(text_config)),
        cache_writer=device.paged_cache_writer(dtype), vision=vision.VisionEncoder.of(model),
    )
    runner.tp_rank, runner.tp_size = rank, world_size
    return runner


def _worker_main(config: EngineConfig, rank: int, world_size: int, port: int, dtype: torch.dtype) -> None:
    # The driver owns a worker's life: a Ctrl-C or a SIGTERM sent to the whole process group must
    # reach the driver alone, which drains requests and then releases the workers in order.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    device = get_device(config.device)
    device.set_device(rank)
    _threads_per_rank(device, world_size)
    dist.init_process_group(
        device.dist_backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size, timeout=_TIMEOUT
    )
    runner = build_runner(config, device, dtype, rank, world_size)
    box: list = [None]
    dist.broadcast_object_list(box, src=0)
    while isinstance(box[0], LoRAUpdate):  # --lora-modules adapters come before the KV cache is sized
        runner.set_lora(box[0].lora_id, box[0].adapter, box[0].layout)
        dist.broadcast_object_list(box, src=0)
    num_slots, kv_heads = box[0]
    runner.allocate_kv_cache(num_slots, kv_heads)
    while True:
        dist.broadcast_object_list(box, src=0)
        step = box[0]
        if step is None:
            break
        if isinstance(step, LoRAUpdate):
            runner.set_lora(step.lora_id, step.adapter, step.layout)
            continue
        if step == RELEASE_IDLE_MEMORY:
            device.release_idle_memory()
            continue
        runner.execute(step)
    dist.destroy_process_group()


class TensorParallelGroup:
    """The driver's handle on all ranks; with size 1 it is just the local model runner."""

    def __init__(self, config: EngineConfig, device: Device, dtype: torch.dtype, hf_config) -> None:
        self.config = config
        self.device = device
        self.dtype = dtype
        self.world_size = config.tensor_parallel_size
        self.procs: list[mp.Process] = []
        self.runner: ModelRunner | None = None
        hf_config = hf_config.get_text_config()
        check_divisible(hf_config, self.world_size)
        kv_heads = getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads
        self.num_kv_heads_local = kv_heads // self.world_size
        if device.type != "cpu" and self.world_size > device.device_count():
            raise ValueError(
                f"--tensor-parallel-size {self.world_size} needs {self.world_size} {device.type} devices, "
                f"but {device.device_count()} are visible"
                + (f" (check {device.visible_devices_env})" if device.visible_devices_env else "")
            )

    def start_driver(self) -> ModelRunner:
        if self.world_size > 1:
            port = _free_port()
            ctx = mp.get_context("spawn")
            for rank in range(1, self.world_size):
                proc = ctx.Process(
                    target=_worker_main, args=(self.config, rank, self.world_size, port, self.dtype),
                    name=f"bowline-tp-rank{rank}", daemon=True,
                )
                proc.start()
                self.procs.append(proc)
            self.device.set_device(0)
            _threads_per_rank(self.device, self.world_size)
            dist.init_process_group(
                self.device.dist_backend, init_method=f"tcp://127.0.0.1:{port}", rank=0,
                world_size=self.world_size, timeout=_TIMEOUT,
            )
        self.runner = build_runner(self.config, self.device, self.dtype, 0, self.world_size)
        return self.runner

    def allocate_kv_cache(self, num_slots: int) -> None:
        if self.world_size > 1:
            dist.broadcast_object_list([(num_slots, self.num_kv_heads_local)], src=0)
        self.runner.allocate_kv_cache(num_slots, self.num_kv_heads_local)

    def set_lora(self, lora_id: int, adapter: Any, layout: Any) -> None:
        """Install (or drop, adapter None) a LoRA adapter on every rank, between steps."""
        if self.world_size > 1:
            dist.broadcast_object_list([LoRAUpdate(lora_id, adapter, layout)], src=0)
        self.runner.set_lora(lora_id, adapter, layout)

    def release_idle_memory(self) -> None:
        """The engine is idle: every rank hands back the memory its last burst freed."""
        if self.world_size > 1:
            dist.broadcast_object_list([RELEASE_IDLE_MEMORY], src=0)
        self.device.release_idle_memory()

    def execute(self, step: StepInput) -> torch.Tensor:
        if self.world_size > 1:
            dist.broadcast_object_list([step], src=0)
        return self.runner.execute(step)

    def shutdown(self) -> None:
        if self.world_size > 1 and dist.is_initialized():
            try:
                dist.broadcast_object_list([None], src=0)
            except RuntimeError as exc:  # a worker is already gone: nothing left to tell it
                logger.warning("tensor-parallel worker gone before shutdown: %s", exc)
            finally:
                for proc in self.procs:
                    proc.join(timeout=10)
                    if proc.is_alive():
                        proc.terminate()
                dist.destroy_process_group()
