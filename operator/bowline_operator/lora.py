"""LoRA adapters of an InferenceService: where their files come from and the runtime flags that serve them.

`spec.adapters` names each adapter and its source (the same schemes as `spec.model.source`);
`spec.lora` bounds the runtime (`--max-lora-rank`, `--max-loras`, `--max-cpu-loras`). Each adapter
gets its own read-only mount under /mnt/adapters/<index> (pvc:// and hostPath://), a download into
a shared emptyDir by an init container (hf://), or its path inside the image. Changing the list
changes the pod template, so the Deployment rolls: the new pods serve the new list.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .spec import InferenceServiceSpec

ADAPTER_DIR = "/mnt/adapters"


@dataclass(slots=True)
class AdapterMounts:
    """Where each adapter is in the container, and what the pod needs to put it there."""

    paths: dict[str, str] = field(default_factory=dict)  # adapter name -> folder in the container
    volumes: list[dict[str, Any]] = field(default_factory=list)
    mounts: list[dict[str, Any]] = field(default_factory=list)
    downloads: list[tuple[str, str]] = field(default_factory=list)  # (hf repo, folder) for init containers


def adapter_mounts(spec: InferenceServiceSpec) -> AdapterMounts:
    out = AdapterMounts()
    for index, adapter in enumerate(spec.adapters):
        source, root = adapter.source, f"{ADAPTER_DIR}/{index}"
        if source.startswith("pvc://"):
            claim, _, sub = source.removeprefix("pvc://").partition("/")
            out.volumes.append({"name": f"adapter-{index}", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}})
            out.mounts.append({"name": f"adapter-{index}", "mountPath": root, "readOnly": True})
            out.paths[adapter.name] = f"{root}/{sub}".rstrip("/")
        elif source.startswith("hostPath://"):
            out.volumes.append({"name": f"adapter-{index}",
                                "hostPath": {"path": source.removeprefix("hostPath://"), "type": "Directory"}})
            out.mounts.append({"name": f"adapter-{index}", "mountPath": root, "readOnly": True})
            out.paths[adapter.name] = root
        elif source.startswith("hf://"):
            out.downloads.append((source.removeprefix("hf://"), root))
            out.paths[adapter.name] = root
        else:
            out.paths[adapter.name] = source
    if out.downloads:
        out.volumes.append({"name": "adapter-cache", "emptyDir": {}})
        out.mounts.append({"name": "adapter-cache", "mountPath": ADAPTER_DIR + "/hf", "readOnly": True})
        # Downloads land under the cache volume; their paths move there too.
        moved = {root: f"{ADAPTER_DIR}/hf/{root.rsplit('/', 1)[-1]}" for _, root in out.downloads}
        out.paths = {name: moved.get(path, path) for name, path in out.paths.items()}
        out.downloads = [(repo, moved[root]) for repo, root in out.downloads]
    return out


def lora_enabled(spec: InferenceServiceSpec) -> bool:
    return bool(spec.adapters) or spec.lora is not None


def lora_args(spec: InferenceServiceSpec, paths: dict[str, str]) -> list[str]:
    """vLLM's flags: --enable-lora, --lora-modules name=path ..., and the bounds that are set."""
    if not lora_enabled(spec):
        return []
    args = ["--enable-lora"]
    if spec.adapters:
        args += ["--lora-modules", *(f"{a.name}={paths[a.name]}" for a in spec.adapters)]
    lora = spec.lora
    if lora is not None:
        for flag, value in (("--max-lora-rank", lora.max_rank), ("--max-loras", lora.max_adapters),
                            ("--max-cpu-loras", lora.max_cpu_adapters)):
            if value is not None:
                args += [flag, str(value)]
    return args


def lora_problems(spec: InferenceServiceSpec, served_name: str | None) -> list[str]:
    """The CRD's adapter rules (unique names, not the served model's name, cache >= batch bound)."""
    problems: list[str] = []
    names = [a.name for a in spec.adapters]
    if len(set(names)) != len(names):
        dupes = sorted({n for n in names if names.count(n) > 1})
        problems.append(f"adapters[].name must be unique (repeated: {', '.join(dupes)})")
    if served_name is not None and served_name in names:
        problems.append("adapters[].name must differ from the served model name")
    lora = spec.lora
    if lora is not None and lora.max_cpu_adapters is not None and lora.max_cpu_adapters < (lora.max_adapters or 1):
        problems.append("lora.maxCpuAdapters must be at least lora.maxAdapters")
    return problems


def status_fields(spec: InferenceServiceSpec) -> dict[str, Any]:
    """status.adapters (the names served) and status.adapterCount (the wide printer column)."""
    return {"adapters": [a.name for a in spec.adapters], "adapterCount": len(spec.adapters)}
