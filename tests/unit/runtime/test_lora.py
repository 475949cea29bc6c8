"""LoRA pieces without a server: flags, adapter checks, the registry's LRU and in-flight rules, the
scheduler's --max-loras bound, per-adapter prefix-cache chains and the batched update itself."""

from __future__ import annotations

import json

import pytest
import torch
from bowline_runtime.config import build_parser, config_from_args
from bowline_runtime.engine.block_manager import BlockManager
from bowline_runtime.engine.sampling_params import SamplingParams
from bowline_runtime.engine.scheduler import Scheduler
from bowline_runtime.engine.sequence import Sequence
from bowline_runtime.lora.adapter import LoRAAdapter, LoRAError, ModelShapes, load_adapter
from bowline_runtime.lora.delta import LoRABatch, pack_adapter
from bowline_runtime.lora.manager import LoRAManager, LoRANotFound
from bowline_runtime.lora.modules import LoRAModule, parse_modules
from bowline_runtime.tools.tiny_lora import write_lora_adapter


def _config(argv: list[str], environ: dict[str, str] | None = None):
    return config_from_args(build_parser().parse_args(["--model", "m", *argv]), environ or {})


def test_lora_flags_take_both_forms_and_their_env_variables():
    config = _config(["--enable-lora", "--lora-modules", "a=/x", '{"name": "b", "path": "/y", "base_model_name": "m2"}',
                      "--max-lora-rank", "64", "--max-loras", "2", "--max-cpu-loras", "4"])
    assert parse_modules(config.lora_modules) == [LoRAModule("a", "/x"), LoRAModule("b", "/y", "m2")]
    assert (config.max_lora_rank, config.max_loras, config.max_cpu_loras) == (64, 2, 4)
    env = {"BOWLINE_ENABLE_LORA": "1", "BOWLINE_LORA_MODULES": "a=/x c=/z", "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "true"}
    config = _config([], env)
    assert [m.name for m in parse_modules(config.lora_modules)] == ["a", "c"]
    assert config.allow_runtime_lora_updating
    listed = _config([], {"BOWLINE_ENABLE_LORA": "1", "BOWLINE_LORA_MODULES": json.dumps([{"name": "j", "path": "/j"}])})
    assert parse_modules(listed.lora_modules) == [LoRAModule("j", "/j")]


@pytest.mark.parametrize(("argv", "words"), [
    (["--enable-lora", "--max-lora-rank", "24"], "--max-lora-rank must be one of"),
    (["--enable-lora", "--max-loras", "4", "--max-cpu-loras", "2"], "--max-cpu-loras (2) must be >= --max-loras (4)"),
    (["--lora-modules", "a=/x"], "--lora-modules needs --enable-lora"),
    (["--enable-lora", "--lora-modules", "a=/x", "a=/y"], "given twice"),
    (["--enable-lora", "--lora-modules", "m=/x"], "served model's own name"),
    (["--enable-lora", "--lora-modules", "no path"], "expected name=path"),
    (["--enable-lora", "--lora-modules", "bad name!=/x"], "not a valid model id"),
])
def test_bad_lora_flags_are_refused_naming_the_flag(argv, words):
    with pytest.raises(ValueError, match=None) as info:
        _config(argv)
    assert words in str(info.value)


@pytest.fixture(scope="module")
def shapes(tiny_model_dir):
    from transformers import AutoConfig

    return ModelShapes.from_config(AutoConfig.from_pretrained(tiny_model_dir))


def test_adapter_refusals_say_what_is_wrong(tiny_model_dir, tmp_path, shapes):
    path = write_lora_adapter(tiny_model_dir, tmp_path / "a", rank=8)
    config = json.loads((path / "adapter_config.json").read_text())
    for change, words in [
        ({"target_modules": ["q_proj", "embed_tokens"]}, "['embed_tokens']"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"use_dora": True}, "DoRA"),
        ({"r": 4}, "says r=4"),
        ({"target_modules": r".*\.q_proj"}, "not in the adapter's target_modules"),
    ]:
        (path / "adapter_config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(LoRAError) as info:
            load_adapter(path, shapes, max_rank=16)
        assert words in info.value.message
    (path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(LoRAError, match="exceeds --max-lora-rank 1"):
        load_adapter(path, shapes, max_rank=1)
    with pytest.raises(LoRAError, match="does not exist"):
        load_adapter(tmp_path / "nowhere", shapes, max_rank=16)


def test_scaling_is_folded_into_b_with_and_without_rslora(tiny_model_dir, tmp_path, shapes):
    plain = load_adapter(write_lora_adapter(tiny_model_dir, tmp_path / "p", rank=4, alpha=8, seed=3), shapes, 16)
    rs = load_adapter(write_lora_adapter(tiny_model_dir, tmp_path / "r", rank=4, alpha=8, seed=3, use_rslora=True), shapes, 16)
    b_plain, b_rs = plain.weights[(0, "q_proj")][1], rs.weights[(0, "q_proj")][1]
    torch.testing.assert_close(b_plain / 2.0, b_rs / 4.0)  # alpha/r = 2, alpha/sqrt(r) = 4


class _Installs:
    def __init__(self) -> None:
        self.log: list[tuple[int, bool]] = []

    def __call__(self, lora_id: int, adapter) -> None:
        self.log.append((lora_id, adapter is not None))


def _adapter() -> LoRAAdapter:
    return LoRAAdapter(1, {(0, "q_proj"): (torch.zeros(1, 64), torch.zeros(64, 1))})


def test_registry_drops_the_least_recently_used_idle_adapter_and_reloads_it_on_use(tiny_model_dir, tmp_path, shapes):
    installs = _Installs()
    manager = LoRAManager(shapes, 16, max_loras=1, max_cpu_loras=2, install=installs, base_model_name="tiny")
    paths = {n: str(write_lora_adapter(tiny_model_dir, tmp_path / n, rank=2, seed=i)) for i, n in enumerate("abc")}
    a, b = manager.add(LoRAModule("a", paths["a"])), manager.add(LoRAModule("b", paths["b"]))
    manager.acquire("b")  # b is busy; a is idle and least recently used
    c = manager.add(LoRAModule("c", paths["c"]))
    assert list(manager.loaded) == [b, c] and (a, False) in installs.log
    assert manager.acquire("a") == a  # read again from its path; c (idle) makes room
    assert list(manager.loaded) == [b, a]
    d = manager.add(LoRAModule("d", paths["c"]))  # both loaded adapters have requests: beyond the bound
    assert list(manager.loaded) == [b, a, d]
    manager.release(b)  # idle again: the set shrinks back to --max-cpu-loras
    assert list(manager.loaded) == [a, d]
    assert {m.name for m in manager.modules()} == {"a", "b", "c", "d"}


def test_unregistering_keeps_the_weights_until_the_last_request_ends(shapes):
    installs = _Installs()
    manager = LoRAManager(shapes, 16, max_loras=1, max_cpu_loras=1, install=installs, base_model_name="tiny")
    lora_id = manager.add(LoRAModule("a", "/unused"), _adapter())
    manager.acquire("a")
    assert manager.remove("a") == lora_id
    assert not manager.is_gone(lora_id) and (lora_id, False) not in installs.log
    with pytest.raises(LoRANotFound):
        manager.acquire("a")  # new requests: 404
    manager.release(lora_id)
    assert manager.is_gone(lora_id) and installs.log[-1] == (lora_id, False)
    assert manager.add(LoRAModule("a", "/unused"), _adapter()) != lora_id  # a new id: no stale cache chains


def _seq(seq_id: int, lora_id: int, tokens: list[int] | None = None) -> Sequence:
    tokens = tokens or [100 + seq_id] * 5
    return Sequence(seq_id, f"r{seq_id}", 0, tokens, len(tokens), SamplingParams(), lora_id=lora_id)


def test_scheduler_admits_at_most_max_loras_adapters_and_keeps_the_others_in_line():
    sched = Scheduler(BlockManager(64, 4, False), 8, 64, max_loras=1)
    seqs = [_seq(0, 1), _seq(1, 2), _seq(2, 0), _seq(3, 1)]
    for s in seqs:
        sched.add(s)
    batch = sched.schedule()
    assert [s.seq_id for s in batch.seqs] == [0, 2, 3]  # adapter 2 waits; the base model never does
    assert [s.seq_id for s in sched.waiting] == [1]


def test_prefix_cache_chains_are_separate_per_adapter():
    manager = BlockManager(16, 4, True)
    tokens = list(range(10, 19))
    base = _seq(0, 0, list(tokens))
    manager.allocate(base)
    base.num_computed_tokens = 9
    manager.register_full_blocks(base)
    assert manager.can_allocate(_seq(1, 0, list(tokens)))
    again = _seq(1, 0, list(tokens))
    manager.allocate(again)
    assert again.num_cached_tokens == 8
    other = _seq(2, 3, list(tokens))
    manager.allocate(other)
    assert other.num_cached_tokens == 0


def test_batched_update_equals_each_rows_own_product(tiny_model_dir, tmp_path, shapes):
    adapters = {i: load_adapter(write_lora_adapter(tiny_model_dir, tmp_path / str(i), rank=4, seed=i), shapes, 16)
                for i in (1, 2)}
    store = {i: pack_adapter(a, shapes, 0, 1, torch.float32, torch.device("cpu")) for i, a in adapters.items()}
    x = torch.randn(7, 64)
    out = torch.zeros(7, 2 * shapes.sizes["gate_proj"][1])  # the fused gate/up columns
    segments = [(0, 2, 1), (2, 3, 2), (4, 6, 1), (6, 7, 2)]  # row 3 is the base model's
    LoRABatch(store, segments, torch.device("cpu"), 1).add(0, "gate_up", x, [out])
    for start, end, lora_id in segments:
        parts = [adapters[lora_id].weights[(0, m)] for m in ("gate_proj", "up_proj")]
        want = torch.cat([x[start:end] @ a.t() @ b.t() for a, b in parts], dim=-1)
        torch.testing.assert_close(out[start:end], want)
    assert not out[3].any()


def test_stacked_slots_give_the_same_update_as_the_per_adapter_loop(tiny_model_dir, tmp_path, shapes):
    from bowline_runtime.lora.delta import LoRALayout, SlotStacks

    adapters = {i: load_adapter(write_lora_adapter(tiny_model_dir, tmp_path / str(i), rank=r, seed=i,
                                                   targets=t), shapes, 16)
                for i, r, t in ((1, 4, ["q_proj", "v_proj"]), (2, 8, ["k_proj", "o_proj"]), (3, 16, ["q_proj"]))}
    store = {i: pack_adapter(a, shapes, 0, 1, torch.float32, torch.device("cpu")) for i, a in adapters.items()}
    slots = SlotStacks(LoRALayout(shapes, 2, 16), 0, 1, torch.float32, torch.device("cpu"))
    x = torch.randn(6, 64)
    width = sum(shapes.sizes[m][1] for m in ("q_proj", "k_proj", "v_proj"))
    for segments in ([(0, 2, 1), (3, 4, 2), (4, 6, 1)], [(0, 1, 3), (1, 3, 2)], [(2, 6, 1), (0, 1, 3)]):
        loop, stacked = torch.zeros(6, width), torch.zeros(6, width)
        LoRABatch(store, segments, torch.device("cpu"), 1).add(1, "qkv", x, [loop])
        batch = LoRABatch(store, segments, torch.device("cpu"), 1, slots, num_rows=6)
        assert batch.stacks is not None  # two adapters over six rows: the stacked path
        batch.add(1, "qkv", x, [stacked])
        torch.testing.assert_close(stacked, loop)
