"""The one interface through which the engine talks to hardware. Nothing else names a vendor."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from bowline_runtime.models.fused_ops import FusedOps

if TYPE_CHECKING:
    from bowline_runtime.models.packed_decoder import LayerLoop, PackedDecoder


class Device(ABC):
    """A kind of accelerator (or the CPU): how to address it, measure it and join ranks over it."""

    #: torch device type, e.g. "cpu", "cuda", "npu"
    type: str
    #: torch.distributed backend for tensor parallelism on this device
    dist_backend: str
    #: environment variable that restricts which devices a process sees (None for CPU)
    visible_devices_env: str | None = None
    #: keep each decode group's gathered KV context between steps (see models.attention.DecodeGroup):
    #: saves memory traffic where memory is plentiful (host RAM), costs up to the running contexts' size again
    stages_decode_context: bool = False
    #: tokens per step when --max-num-batched-tokens is not given (the prefill chunk): a step's time grows
    #: with its tokens, and every decode in the batch and every prompt queued behind waits for it
    default_max_num_batched_tokens: int = 2048

    @classmethod
    @abstractmethod
    def is_available(cls) -> bool:
        """Whether this machine has such a device (and its torch extension imports)."""

    @abstractmethod
    def device_count(self) -> int: ...

    def torch_device(self, rank: int = 0) -> torch.device:
        """The torch device a tensor-parallel rank runs on."""
        return torch.device(self.type, rank) if self.type != "cpu" else torch.device("cpu")

    @abstractmethod
    def memory_info(self, rank: int = 0) -> tuple[int, int]:
        """(free, total) bytes of the memory the KV cache would live in."""

    def synchronize(self) -> None:  # noqa: B027 - a deliberate no-op default (the CPU has no queue)
        """Wait for queued kernels; a no-op on the CPU."""

    def set_device(self, rank: int) -> None:  # noqa: B027 - a deliberate no-op default (one CPU device)
        """Bind this process to its rank's device."""

    def release_idle_memory(self) -> None:  # noqa: B027 - a deliberate no-op default (caching allocators keep theirs)
        """Hand memory freed during the last burst back to the system while the engine is idle."""

    def prepare_process(self) -> None:  # noqa: B027 - a deliberate no-op default
        """Tune this process for serving on the device, once per rank before the model loads."""

    def supported_dtypes(self) -> tuple[torch.dtype, ...]:
        return (torch.float32, torch.bfloat16, torch.float16)

    def optimize_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """Swap in this device's faster kernels for standard layers, in place; default: nothing to do."""
        return model

    def paged_decode_kernel(self, dtype: torch.dtype) -> Callable[..., None] | None:
        """A kernel attending decodes straight from the paged KV cache (see models.attention), or None:
        the engine then gathers contexts and attends with torch's batched products."""
        return None

    def paged_prefill_kernel(self, dtype: torch.dtype, head_dim: int) -> Callable[..., None] | None:
        """A kernel attending a prefill chunk straight from the paged KV cache, or None: torch's SDPA."""
        return None

    def paged_cache_writer(self, dtype: torch.dtype) -> Callable[..., None] | None:
        """A kernel writing a step's keys and values into the paged cache (k, v, k_cache, v_cache, slots),
        or None: torch's index_copy_, once for keys and once for values."""
        return None

    def decode_layers(self, decoder: PackedDecoder) -> LayerLoop | None:
        """The packed decoder's layer loop in one call for the steps it accepts (models.packed_decoder.LayerLoop),
        built after optimize_model; default: None, the decoder's own loop."""
        return None

    def fused_ops(self, dtype: torch.dtype) -> FusedOps:
        """The decoder's small fused operations (models.fused_ops); default: the torch reference."""
        return FusedOps()

    def default_dtype(self) -> torch.dtype:
        """The dtype `--dtype auto` means when the model's config does not say."""
        return torch.bfloat16

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
