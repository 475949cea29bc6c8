"""The ranks of one model copy: rank 0 (the driver) schedules and samples; the others run its forward passes.

Each rank is a process holding one shard of the weights and of the KV cache: a tensor-parallel
shard of the layers of one pipeline stage (engine.distributed has the layout). Every step the driver
broadcasts the StepInput (a few small tensors) over torch.distributed, then all ranks run the same
forward (or, for a draft model sharded over the same ranks, a DraftStep: the draft's forward); the
sharded layers' all-reduces keep a stage in step, and point-to-point sends carry the
hidden states from stage to stage and the last stage's logits back to the driver. The backend comes
from the device layer (gloo on CPU, nccl on CUDA, hccl on NPU). Ranks may live in other processes
started on other nodes (`--nnodes`, `--node-rank`): those run `run_worker_node` instead of a server.
"""

from __future__ import annotations

import datetime
import logging
import os
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bowline_runtime.config import EngineConfig, switch_on
from bowline_runtime.devices import Device, get_device
from bowline_runtime.devices.threads import usable_cores
from bowline_runtime.engine import distributed
from bowline_runtime.engine.distributed import Endpoint, Layout
from bowline_runtime.engine.model_runner import ModelRunner, StepInput
from bowline_runtime.models import loader, packed_decoder, vision
from bowline_runtime.models.attention import head_dim
from bowline_runtime.models.packed_decoder import PackedDecoder
from bowline_runtime.models.pipeline_parallel import split_model
from bowline_runtime.models.tensor_parallel import check_divisible, shard_model

logger = logging.getLogger("bowline.worker")

# The collectives' timeout. A worker waits in a broadcast for the next step for as long as the server
# idles, and gloo fails a wait that outlasts it (after 30 minutes idle the group fell apart): a year. A
# rank that dies is caught at once by the liveness watch (engine.distributed), not by this timeout.
_TIMEOUT = datetime.timedelta(days=365)

# Sent to the worker ranks in place of a step when the engine has gone idle (see devices.host_memory).
RELEASE_IDLE_MEMORY = "release-idle-memory"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def layout_of(config: EngineConfig) -> Layout:
    return Layout(config.tensor_parallel_size, config.pipeline_parallel_size, config.nnodes, config.node_rank)


def _endpoint(config: EngineConfig, layout: Layout) -> Endpoint:
    """One node: private free ports on loopback; several: the leader's address and port from the flags."""
    if layout.nnodes == 1:
        port = _free_port()
        watch = _free_port()
        while watch == port:
            watch = _free_port()
        return Endpoint("127.0.0.1", port, config.distributed_init_timeout, watch)
    return Endpoint(config.master_addr, config.master_port, config.distributed_init_timeout)


def _threads_per_rank(device: Device, local_size: int) -> None:
    """On CPU the ranks of a node share its cores: give each its fair part instead of oversubscribing."""
    if device.type == "cpu":
        torch.set_num_threads(max(1, usable_cores() // local_size))


@dataclass(slots=True)
class LoRAUpdate:
    """Sent to every rank between steps: install an adapter's weights (each rank takes its shard) or drop them."""

    lora_id: int
    adapter: Any  # lora.adapter.LoRAAdapter, or None to drop
    layout: Any  # lora.delta.LoRALayout


@dataclass(slots=True)
class DraftStep:
    """Sent to every rank in place of a step: run this forward on the sharded draft model (a draft whose
    --speculative-draft-tensor-parallel-size is the target's); the driver's shard returns the logits."""

    step: StepInput


def _sharded_draft(config: EngineConfig, device: Device, dtype: torch.dtype, layout: Layout, rank: int, tp_group):
    """This rank's shard of the draft model and its KV heads here, or None: no draft, or one unsharded
    beside rank 0 (built by the proposer alone)."""
    from bowline_runtime.engine.spec_decode import speculative_config_from
    from bowline_runtime.engine.spec_decode.draft_model import build_draft_runner

    spec = speculative_config_from(config)
    if spec is None or not spec.sharded_draft:
        return None
    assert spec.model is not None
    return build_draft_runner(config, spec.model, device, dtype, layout, rank, tp_group)


def _logits_rank(layout: Layout) -> int:
    """The rank that computes logits: the driver, or with stages the first rank of the last stage."""
    return (layout.pipeline_parallel_size - 1) * layout.tensor_parallel_size


def _tp_groups(layout: Layout):
    """Every rank builds every stage's group, in the same order (torch.distributed requires it); keeps its own."""
    if layout.pipeline_parallel_size == 1:
        return None
    tp = layout.tensor_parallel_size
    groups = [dist.new_group(list(range(s * tp, (s + 1) * tp))) for s in range(layout.pipeline_parallel_size)]
    return groups


def build_runner(
    config: EngineConfig, device: Device, dtype: torch.dtype, layout: Layout, rank: int, tp_group=None
) -> ModelRunner:
    device.prepare_process()
    hf_config = loader.load_config(config.model, config.trust_remote_code)
    text_config = hf_config.get_text_config()  # itself for a text model; a vision-language model's LM part
    check_divisible(text_config, layout.tensor_parallel_size)
    model = loader.load_model(
        config.model, hf_config, dtype, config.load_format, config.trust_remote_code, seed=config.seed,
        quantization=config.quantization,
    )
    pp = layout.pipeline_parallel_size
    # Shard first: the plan's layer names no longer match once the stage boundaries wrap their layers.
    shard_model(model, layout.tp_rank(rank), layout.tensor_parallel_size, tp_group)
    split_model(model, layout.pp_rank(rank), pp, layout.tensor_parallel_size, rank)
    torch_device = device.torch_device(layout.local_rank(rank))
    model.to(torch_device)
    # Before the device packs its Linear layers: the decoder fuses q/k/v and gate/up into one product each.
    # Its forward has no stage boundaries: pipeline stages run transformers' own forward.
    lm = vision.language_model(model)  # the model itself, or a vision-language model's LM part
    use_packed = pp == 1 and switch_on(packed_decoder.PACKED_DECODER_ENV) and packed_decoder.supports(lm)
    decoder = PackedDecoder(lm, device.fused_ops(dtype)) if use_packed else None
    if config.enable_lora and pp > 1:
        raise ValueError("--enable-lora does not work with --pipeline-parallel-size above 1 yet")
    if config.enable_lora and decoder is None:
        raise ValueError(
            f"--enable-lora needs a Llama-family model ({', '.join(sorted(packed_decoder.SUPPORTED_MODEL_TYPES))}) "
            f"served by the packed decoder ({packed_decoder.PACKED_DECODER_ENV} on)"
        )
    device.optimize_model(model)
    if decoder is not None:
        decoder.decode_layers = device.decode_layers(decoder)
    runner = ModelRunner(
        model, torch_device, dtype, is_driver=rank == _logits_rank(layout), block_size=config.block_size,
        decoder=decoder, stage_decode_context=device.stages_decode_context,
        decode_kernel=device.paged_decode_kernel(dtype),
        prefill_kernel=device.paged_prefill_kernel(dtype, head_dim(text_config)),
        cache_writer=device.paged_cache_writer(dtype), vision=vision.VisionEncoder.of(model),
        kv_dtype=loader.resolve_kv_cache_dtype(config.kv_cache_dtype, dtype),
    )
    runner.tp_rank, runner.tp_size = layout.tp_rank(rank), layout.tensor_parallel_size
    return runner


def _worker_main(
    config: EngineConfig, layout: Layout, endpoint: Endpoint, rank: int, dtype: torch.dtype, spawned: bool = True
) -> None:
    if spawned:
        # The node's main process owns a spawned rank's life: a Ctrl-C or a SIGTERM sent to the whole
        # process group must reach it alone (on the leader it drains requests, then releases the ranks).
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    device = get_device(config.device)
    device.set_device(layout.local_rank(rank))
    _threads_per_rank(device, layout.local_size)
    store = distributed.connect_store(endpoint, rank)
    release = distributed.watch_leader(endpoint, rank)
    distributed.init_group(device.dist_backend, store, rank, layout.world_size, _TIMEOUT)
    tp_group = _own_group(layout, rank)
    runner = build_runner(config, device, dtype, layout, rank, tp_group)
    draft = _sharded_draft(config, device, dtype, layout, rank, tp_group)  # (runner, kv heads here) or None
    sends_logits = layout.pipeline_parallel_size > 1 and rank == _logits_rank(layout)
    box: list = [None]
    dist.broadcast_object_list(box, src=0)
    while isinstance(box[0], LoRAUpdate):  # --lora-modules adapters come before the KV cache is sized
        runner.set_lora(box[0].lora_id, box[0].adapter, box[0].layout)
        dist.broadcast_object_list(box, src=0)
    num_slots, kv_heads = box[0]
    runner.allocate_kv_cache(num_slots, kv_heads)
    if draft is not None:  # the draft's KV lives in the same block ids, its own tensors
        draft[0].allocate_kv_cache(num_slots, draft[1])
    while True:
        dist.broadcast_object_list(box, src=0)
        step = box[0]
        if step is None:
            break
        if isinstance(step, LoRAUpdate):
            runner.set_lora(step.lora_id, step.adapter, step.layout)
            continue
        if isinstance(step, str) and step == RELEASE_IDLE_MEMORY:
            device.release_idle_memory()
            continue
        if isinstance(step, DraftStep):
            assert draft is not None
            draft[0].execute(step.step)
            continue
        logits = runner.execute(step)
        if sends_logits:
            dist.send(logits.float().contiguous(), dst=0)
    release()
    dist.destroy_process_group()


def _own_group(layout: Layout, rank: int):
    groups = _tp_groups(layout)
    return None if groups is None else groups[layout.pp_rank(rank)]


def run_worker_node(config: EngineConfig) -> int:
    """A node other than the leader (`--node-rank` > 0): its ranks, no server; returns the exit code."""
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    layout = layout_of(config)
    endpoint = _endpoint(config, layout)
    device = get_device(config.device)
    hf_config = loader.load_config(config.model, config.trust_remote_code)
    dtype = loader.resolve_dtype(config.dtype, hf_config, device)
    first, *others = layout.local_ranks
    logger.info(
        "node %d of %d: ranks %d..%d of %d, leader at %s:%d",
        layout.node_rank, layout.nnodes, first, layout.local_ranks[-1], layout.world_size, endpoint.addr, endpoint.port,
    )
    ctx = mp.get_context("spawn")
    procs = [
        ctx.Process(target=_worker_main, args=(config, layout, endpoint, rank, dtype), name=f"bowline-rank{rank}",
                    daemon=True)
        for rank in others
    ]
    for proc in procs:
        proc.start()
    _worker_main(config, layout, endpoint, first, dtype, spawned=False)
    for proc in procs:
        proc.join(timeout=30)
    logger.info("node %d: the leader released the group; exiting", layout.node_rank)
    return 0


class TensorParallelGroup:
    """The driver's handle on all ranks (tensor- and pipeline-parallel); with size 1 it is just the local runner."""

    def __init__(self, config: EngineConfig, device: Device, dtype: torch.dtype, hf_config) -> None:
        self.config = config
        self.device = device
        self.dtype = dtype
        self.layout = layout_of(config)
        self.world_size = self.layout.world_size
        self.procs: dict[int, mp.Process] = {}
        self.runner: ModelRunner | None = None
        self.tp_group = None  # the driver's tensor-parallel group (None: the whole world)
        self.draft_runner: ModelRunner | None = None  # rank 0's shard of a sharded draft model
        self.watchdog: distributed.Watchdog | None = None
        self.failure: str | None = None  # set when a rank is gone: the engine is dead, /health 503
        self.exit_on_failure = False  # in the engine-core process: exiting is how the server learns it
        tp = self.layout.tensor_parallel_size
        hf_config = hf_config.get_text_config()
        self.num_kv_heads_local = check_divisible(hf_config, tp) // tp
        local = self.layout.local_size
        if device.type != "cpu" and local > device.device_count():
            raise ValueError(
                f"{local} ranks per node (--tensor-parallel-size x --pipeline-parallel-size / --nnodes) need "
                f"{local} {device.type} devices, but {device.device_count()} are visible"
                + (f" (check {device.visible_devices_env})" if device.visible_devices_env else "")
            )

    def _on_failure(self, message: str) -> None:
        self.failure = message
        if self.exit_on_failure:
            logger.error("the engine core exits: %s", message)
            os._exit(1)

    def _check_local_ranks(self) -> None:
        for rank, proc in self.procs.items():
            if proc.exitcode is not None:
                raise RuntimeError(f"{self.layout.describe(rank)} exited with code {proc.exitcode} during start-up")
        if self.failure:
            raise RuntimeError(self.failure)

    def start_driver(self) -> ModelRunner:
        tp_group = None
        if self.world_size > 1:
            layout = self.layout
            endpoint = _endpoint(self.config, layout)
            store = distributed.connect_store(endpoint, 0)
            # One node: loopback only; several: every interface, as the store listens.
            self.watchdog = distributed.Watchdog(layout, endpoint.watch_port, self._on_failure,
                                                 "127.0.0.1" if layout.nnodes == 1 else "")
            ctx = mp.get_context("spawn")
            for rank in layout.local_ranks[1:]:
                proc = ctx.Process(
                    target=_worker_main, args=(self.config, layout, endpoint, rank, self.dtype),
                    name=f"bowline-rank{rank}", daemon=True,
                )
                proc.start()
                self.procs[rank] = proc
            self.device.set_device(0)
            _threads_per_rank(self.device, layout.local_size)
            if layout.nnodes > 1:
                logger.info("waiting for %d ranks on %d nodes at %s:%d", self.world_size - 1, layout.nnodes,
                            endpoint.addr, endpoint.port)
            distributed.wait_for_ranks(store, layout, endpoint.init_timeout, self._check_local_ranks)
            distributed.init_group(self.device.dist_backend, store, 0, self.world_size, _TIMEOUT)
            tp_group = _own_group(layout, 0)
        self.tp_group = tp_group
        self.runner = build_runner(self.config, self.device, self.dtype, self.layout, 0, tp_group)
        self._vocab = self.runner.model.config.get_text_config().vocab_size
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
        if self.failure:  # the group is gone: nobody is left to tell
            return
        if self.world_size > 1:
            dist.broadcast_object_list([RELEASE_IDLE_MEMORY], src=0)
        self.device.release_idle_memory()

    def execute(self, step: StepInput) -> torch.Tensor:
        if self.failure:
            raise RuntimeError(self.failure)
        if self.world_size > 1:
            dist.broadcast_object_list([step], src=0)
        logits = self.runner.execute(step)
        if self.layout.pipeline_parallel_size > 1:
            logits = torch.empty((len(step.keep), self._vocab), dtype=torch.float32, device=self.runner.device)
            dist.recv(logits, src=_logits_rank(self.layout))
            logits = logits.to(device=self.runner.device, dtype=self.dtype)
        return logits

    def attach_draft(self, runner: ModelRunner) -> Callable[[StepInput], torch.Tensor | None]:
        """Rank 0's shard of a sharded draft: the callable that runs a draft forward on every rank."""
        self.draft_runner = runner
        return self.execute_draft

    def execute_draft(self, step: StepInput) -> torch.Tensor | None:
        """One forward of the sharded draft: every rank runs its shard (the all-reduces keep them in
        step); the logits come from rank 0, as the target's do without pipeline stages."""
        if self.failure:
            raise RuntimeError(self.failure)
        assert self.draft_runner is not None
        if self.world_size > 1:
            dist.broadcast_object_list([DraftStep(step)], src=0)
        return self.draft_runner.execute(step)

    def shutdown(self) -> None:
        if self.world_size > 1 and dist.is_initialized():
            if self.watchdog is not None:
                self.watchdog.stop()
            try:
                if self.failure is None:
                    dist.broadcast_object_list([None], src=0)
            except RuntimeError as exc:  # a worker is already gone: nothing left to tell it
                logger.warning("tensor-parallel worker gone before shutdown: %s", exc)
            finally:
                for proc in self.procs.values():
                    proc.join(timeout=10)
                    if proc.is_alive():
                        proc.terminate()
                if self.watchdog is not None:
                    self.watchdog.close()
                dist.destroy_process_group()
