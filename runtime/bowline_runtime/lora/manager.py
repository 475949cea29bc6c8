"""The engine's adapters: which names exist, which are loaded, which are in use.

Every adapter name maps to an id that is never reused (a name unloaded and loaded again gets a new
one), so prefix-cache chains and the ranks' weight stores can never mix two adapters' weights.

`--max-cpu-loras` is a hard bound, as in vLLM (its CPU cache of adapters): at most that many
adapters' weights are held at any time. Adapters are loaded when a batch needs them: the scheduler
calls `load_for_batch` before admitting the first sequence of an adapter that is not running yet,
and room is made by dropping the least recently used adapter that no running sequence uses.
Running adapters are at most --max-loras <= --max-cpu-loras (the scheduler's bound), so there is
always such an adapter to drop: requests of adapters beyond the bound wait in line, never fail for
memory, and the loaded set never grows past it. A request names an adapter (acquire) without
loading it; an adapter removed while requests still use it keeps its entry until the last of them
ends.
"""

from __future__ import annotations

import itertools
import logging
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from bowline_runtime.engine.errors import RequestRejected
from bowline_runtime.engine.outputs import LoRAGauges
from bowline_runtime.lora.adapter import LoRAAdapter, LoRAError, ModelShapes, load_adapter
from bowline_runtime.lora.delta import LoRALayout
from bowline_runtime.lora.modules import LoRAModule, check_name

logger = logging.getLogger(__name__)

# install(lora_id, adapter) puts an adapter's weights on every rank; install(lora_id, None) drops them.
Installer = Callable[[int, "LoRAAdapter | None"], None]


class LoRANotFound(RequestRejected):
    """No adapter of that name (HTTP 404, as vLLM answers)."""

    status_code = 404


@dataclass(slots=True)
class _Entry:
    module: LoRAModule
    lora_id: int


class LoRAManager:
    def __init__(
        self, shapes: ModelShapes, max_rank: int, max_loras: int, max_cpu_loras: int | None, install: Installer,
        base_model_name: str, running: Callable[[], set[int]] = set,
    ) -> None:
        """`running()`: the adapter ids of the sequences running now (they must stay loaded)."""
        self.shapes = shapes
        self.max_rank = max_rank
        self.max_loras = max_loras
        self.capacity = max(max_cpu_loras or max_loras, max_loras)
        self.base_model_name = base_model_name
        self._install = install
        self._running = running
        self._ids = itertools.count(1)
        self.entries: dict[str, _Entry] = {}
        self.names: dict[int, str] = {}  # id -> name, also for removed adapters still in use
        self._paths: dict[int, LoRAModule] = {}  # id -> module, to read it again (removed ones too)
        self.loaded: OrderedDict[int, None] = OrderedDict()  # least recently used first
        self.in_use: Counter[int] = Counter()  # requests accepted (waiting or running) per adapter
        self._removed: set[int] = set()  # unregistered, kept until their last request ends

    # --- registry ------------------------------------------------------------------------------

    def modules(self) -> list[LoRAModule]:
        return [e.module for e in self.entries.values()]

    def lookup(self, name: str) -> int | None:
        entry = self.entries.get(name)
        return entry.lora_id if entry is not None else None

    def add(self, module: LoRAModule, adapter: LoRAAdapter | None = None) -> int:
        """Register an adapter (read from its path unless given, so a bad one is refused now: LoRAError)
        and keep it loaded if that fits the bound without dropping a running adapter."""
        check_name(module.name)
        if module.name == self.base_model_name:
            raise LoRAError(f"the adapter name {module.name!r} is the served model's own name", "lora_name")
        if module.name in self.entries:
            raise LoRAError(f"The lora adapter '{module.name}' has already been loaded.", "lora_name")
        adapter = adapter or load_adapter(module.path, self.shapes, self.max_rank)
        lora_id = next(self._ids)
        self.entries[module.name] = _Entry(module, lora_id)
        self.names[lora_id] = module.name
        self._paths[lora_id] = module
        if self._make_room(self._running()):
            self._load(lora_id, adapter)
        return lora_id

    def remove(self, name: str) -> int:
        """Unregister `name` (new requests get 404); its weights go when no request uses them."""
        entry = self.entries.pop(name, None)
        if entry is None:
            raise LoRANotFound(f"The lora adapter '{name}' cannot be found.", "lora_name")
        self._removed.add(entry.lora_id)
        if not self.in_use[entry.lora_id]:
            self._drop(entry.lora_id)
        return entry.lora_id

    def is_gone(self, lora_id: int) -> bool:
        """Removed and no longer used by any request."""
        return lora_id not in self.names

    # --- use by requests ------------------------------------------------------------------------

    def acquire(self, name: str) -> int:
        """The id serving `name` for one more request (its weights are loaded when it is scheduled)."""
        entry = self.entries.get(name)
        if entry is None:
            raise LoRANotFound(f"The lora adapter '{name}' cannot be found.", "model")
        self.in_use[entry.lora_id] += 1
        return entry.lora_id

    def release(self, lora_id: int) -> None:
        self.in_use[lora_id] -= 1
        if self.in_use[lora_id] <= 0:
            del self.in_use[lora_id]
            if lora_id in self._removed:
                self._drop(lora_id)

    def load_for_batch(self, lora_id: int, running: set[int]) -> bool:
        """Make `lora_id` loaded before its first sequence joins the running ones (`running`: the
        adapters running already, never dropped); False if it cannot be read again (logged)."""
        if lora_id in self.loaded:
            self.loaded.move_to_end(lora_id)
            return True
        module = self._paths.get(lora_id)
        if module is None or not self._make_room(running):
            return False
        try:
            adapter = load_adapter(module.path, self.shapes, self.max_rank)
        except LoRAError as exc:
            logger.error("LoRA adapter %r cannot be read again from %s: %s", module.name, module.path, exc.message)
            return False
        self._load(lora_id, adapter)
        return True

    def _make_room(self, running: set[int]) -> bool:
        """Drop least recently used adapters outside `running` until one more fits; False if none can go."""
        while len(self.loaded) >= self.capacity:
            idle = next((i for i in self.loaded if i not in running), None)
            if idle is None:
                return False
            self._evict(idle)
        return True

    def _load(self, lora_id: int, adapter: LoRAAdapter) -> None:
        self._install(lora_id, adapter)
        self.loaded[lora_id] = None

    def _evict(self, lora_id: int) -> None:
        del self.loaded[lora_id]
        self._install(lora_id, None)

    def _drop(self, lora_id: int) -> None:
        if lora_id in self.loaded:
            self._evict(lora_id)
        self._removed.discard(lora_id)
        self.names.pop(lora_id, None)
        self._paths.pop(lora_id, None)
        self.in_use.pop(lora_id, None)

    # --- gauges ------------------------------------------------------------------------------

    def name_of(self, lora_id: int) -> str:
        return self.names.get(lora_id, str(lora_id))


def lora_gauges(manager: LoRAManager, scheduler) -> LoRAGauges:
    """The adapters of running and of waiting sequences, each named once, in a stable order."""
    running = sorted({manager.name_of(s.lora_id) for s in scheduler.running if s.lora_id})
    waiting = sorted({manager.name_of(s.lora_id) for s in scheduler.waiting if s.lora_id})
    return LoRAGauges(tuple(running), tuple(waiting), manager.max_loras)


def build_lora_manager(
    config, hf_config, install: Callable[[int, LoRAAdapter | None, LoRALayout], None],
    running: Callable[[], set[int]] = set,
) -> LoRAManager | None:
    """The engine's manager with --lora-modules registered (each is read and checked; the last
    --max-cpu-loras of them stay loaded, the others are read again when first scheduled); None
    without --enable-lora."""
    if not config.enable_lora:
        return None
    from bowline_runtime.lora.modules import parse_modules

    shapes = ModelShapes.from_config(hf_config)
    layout = LoRALayout(shapes, config.max_loras, config.max_lora_rank)
    manager = LoRAManager(
        shapes, config.max_lora_rank, config.max_loras, config.max_cpu_loras,
        lambda lora_id, adapter: install(lora_id, adapter, layout), config.model_name, running,
    )
    for module in parse_modules(config.lora_modules):
        try:
            manager.add(module)
        except LoRAError as exc:
            raise ValueError(f"--lora-modules {module.name}: {exc.message}") from None
    return manager
