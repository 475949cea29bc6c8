"""Accelerator profiles as data: what a pod needs to see its devices, per vendor.

Everything vendor-specific in a rendered pod comes from this table, so supporting a new device plugin
is a new row here, not new branches in `render.py`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from . import __version__

IMAGE_REGISTRY = "ghcr.io/bowline-dev"


@dataclass(frozen=True, slots=True)
class HostMount:
    """A file or directory from the node, mounted at the same path in the container."""

    name: str
    path: str
    type: str  # hostPath type: Directory or File; a missing path fails the pod early, not mid-load
    read_only: bool = True


@dataclass(frozen=True, slots=True)
class AcceleratorProfile:
    """How one kind of accelerator is requested and exposed to the runtime."""

    key: str  # gpu-nvidia, gpu-amd, npu-ascend, cpu
    device: str  # the runtime's --device
    resource_name: str | None  # the device plugin's extended resource; None for CPU
    image: str  # default runtime image
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: tuple[dict[str, str], ...] = ()
    host_mounts: tuple[HostMount, ...] = ()
    # Environment derived from the device count, e.g. ASCEND_RT_VISIBLE_DEVICES=0,1,...
    env: Callable[[int], dict[str, str]] = lambda count: {}


def _ascend_env(count: int) -> dict[str, str]:
    # The Ascend device plugin maps the granted NPUs to logical ids 0..count-1 inside the container.
    return {"ASCEND_RT_VISIBLE_DEVICES": ",".join(str(i) for i in range(count))}


PROFILES: dict[str, AcceleratorProfile] = {
    "gpu-nvidia": AcceleratorProfile(
        key="gpu-nvidia",
        device="cuda",
        resource_name="nvidia.com/gpu",
        image=f"{IMAGE_REGISTRY}/bowline-runtime-cuda:{__version__}",
        # GPU nodes are commonly tainted so that only GPU pods land there.
        tolerations=({"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},),
    ),
    "gpu-amd": AcceleratorProfile(
        key="gpu-amd",
        device="cuda",  # ROCm builds of torch expose AMD GPUs as "cuda"
        resource_name="amd.com/gpu",
        image=f"{IMAGE_REGISTRY}/bowline-runtime-rocm:{__version__}",
        tolerations=({"key": "amd.com/gpu", "operator": "Exists", "effect": "NoSchedule"},),
    ),
    "npu-ascend": AcceleratorProfile(
        key="npu-ascend",
        device="npu",
        resource_name="huawei.com/Ascend910",
        image=f"{IMAGE_REGISTRY}/bowline-runtime-ascend:{__version__}",
        node_selector={"accelerator/huawei-npu": "ascend-1980"},
        # The CANN runtime inside the image talks to the node's driver through these host paths.
        host_mounts=(
            HostMount("ascend-driver", "/usr/local/Ascend/driver", "Directory"),
            HostMount("ascend-add-ons", "/usr/local/Ascend/add-ons", "Directory"),
            HostMount("hccn", "/etc/hccn.conf", "File"),
            HostMount("npu-smi", "/usr/local/sbin/npu-smi", "File"),
            HostMount("localtime", "/etc/localtime", "File"),
        ),
        env=_ascend_env,
    ),
    "cpu": AcceleratorProfile(
        key="cpu",
        device="cpu",
        resource_name=None,
        image=f"{IMAGE_REGISTRY}/bowline-runtime-cpu:{__version__}",
    ),
}

DEFAULT_VENDOR = {"gpu": "nvidia", "npu": "ascend"}


def profile_for(accelerator_type: str, vendor: str | None = None) -> AcceleratorProfile:
    """The profile for an accelerator type and optional vendor (gpu defaults to NVIDIA, npu to Ascend)."""
    if accelerator_type == "cpu":
        return PROFILES["cpu"]
    vendor = vendor or DEFAULT_VENDOR[accelerator_type]
    return PROFILES[f"{accelerator_type}-{vendor}"]
