"""vLLM's LoRA flags: `--lora-modules` in both of its forms and the bounds checked at start-up.

`--lora-modules` takes `name=path` items or vLLM's JSON objects
(`{"name": ..., "path": ..., "base_model_name": ...}`); `BOWLINE_LORA_MODULES` takes the same items
separated by whitespace, or a JSON list of them. `--max-lora-rank` accepts vLLM's values only.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

# vLLM's accepted --max-lora-rank values (its kernels are built for these sizes).
ALLOWED_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# An adapter's name is a model id clients send as `model`: no spaces, no '=' (the flag's separator).
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,252}$")
# vLLM accepts either variable; Bowline's own name follows its BOWLINE_* convention.
RUNTIME_UPDATING_ENVS = ("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "BOWLINE_ALLOW_RUNTIME_LORA_UPDATING")


@dataclass(frozen=True, slots=True)
class LoRAModule:
    """One adapter the server offers: clients name it as `model`."""

    name: str
    path: str
    base_model_name: str | None = None  # /v1/models `parent`; None: the served model


def check_name(name: str) -> None:
    """Refuse a name that cannot be a model id (ValueError naming it)."""
    if not _NAME.match(name):
        raise ValueError(
            f"LoRA adapter name {name!r} is not a valid model id (letters, digits and . _ : / -, "
            "starting with a letter or digit)"
        )


def parse_module(item: str) -> LoRAModule:
    """`name=path` or a JSON object with name, path and optionally base_model_name."""
    item = item.strip()
    if item.startswith("{"):
        try:
            data: Any = json.loads(item)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--lora-modules: cannot read {item!r} as JSON ({exc.msg})") from None
        if not isinstance(data, dict) or not isinstance(data.get("name"), str) or not isinstance(data.get("path"), str):
            raise ValueError(f"--lora-modules: {item!r} needs string fields \"name\" and \"path\"")
        base = data.get("base_model_name")
        module = LoRAModule(data["name"], data["path"], base if isinstance(base, str) else None)
    else:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--lora-modules: expected name=path or a JSON object, got {item!r}")
        module = LoRAModule(name.strip(), path.strip())
    check_name(module.name)
    return module


def split_items(raw: str | list[str] | tuple[str, ...] | None) -> list[str]:
    """The items of --lora-modules (a list from argparse) or BOWLINE_LORA_MODULES (one string)."""
    if raw is None:
        return []
    if not isinstance(raw, str):
        return [str(x) for x in raw]
    text = raw.strip()
    if text.startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--lora-modules: cannot read {raw!r} as a JSON list ({exc.msg})") from None
        return [json.dumps(x) if isinstance(x, dict) else str(x) for x in items]
    if text.startswith("{"):
        return [text]
    return text.split()


def parse_modules(raw: str | list[str] | tuple[str, ...] | None) -> list[LoRAModule]:
    """Every adapter of the flag, names unique."""
    modules = [parse_module(item) for item in split_items(raw)]
    seen: set[str] = set()
    for m in modules:
        if m.name in seen:
            raise ValueError(f"--lora-modules: the adapter name {m.name!r} is given twice")
        seen.add(m.name)
    return modules


def check_settings(
    enable_lora: bool, modules: list[LoRAModule], max_lora_rank: int, max_loras: int, max_cpu_loras: int | None,
    served_model_name: str,
) -> None:
    """The start-up rules, each refusal naming its flag (ValueError)."""
    if modules and not enable_lora:
        raise ValueError("--lora-modules needs --enable-lora")
    if not enable_lora:
        return
    if max_lora_rank not in ALLOWED_MAX_LORA_RANKS:
        raise ValueError(f"--max-lora-rank must be one of {list(ALLOWED_MAX_LORA_RANKS)}, got {max_lora_rank}")
    if max_loras < 1:
        raise ValueError(f"--max-loras must be >= 1, got {max_loras}")
    if max_cpu_loras is not None and max_cpu_loras < max_loras:
        raise ValueError(f"--max-cpu-loras ({max_cpu_loras}) must be >= --max-loras ({max_loras})")
    for m in modules:
        if m.name == served_model_name:
            raise ValueError(f"--lora-modules: the adapter name {m.name!r} is the served model's own name")


def runtime_updating_allowed(flag: bool, environ: dict[str, str]) -> bool:
    """--allow-runtime-lora-updating, or either environment variable set to a true value."""
    return flag or any(environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"} for name in RUNTIME_UPDATING_ENVS)
