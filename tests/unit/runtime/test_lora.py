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
from bowline_runtime.lora import kernel as lora_kernel
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
    running: set[int] = set()
    manager = LoRAManager(shapes, 16, max_loras=1, max_cpu_loras=2, install=installs, base_model_name="tiny",
                          running=lambda: set(running))
    paths = {n: str(write_lora_adapter(tiny_model_dir, tmp_path / n, rank=2, seed=i)) for i, n in enumerate("abc")}
    a, b = manager.add(LoRAModule("a", paths["a"])), manager.add(LoRAModule("b", paths["b"]))
    assert manager.acquire("b") == b and manager.load_for_batch(b, set())
    running.add(b)  # b runs; a is idle and least recently used
    c = manager.add(LoRAModule("c", paths["c"]))
    assert list(manager.loaded) == [b, c] and (a, False) in installs.log
    assert manager.acquire("a") == a and a not in manager.loaded  # named, not loaded until it is scheduled
    assert manager.load_for_batch(a, {b})  # read again from its path; c (idle) makes room
    assert list(manager.loaded) == [b, a]
    assert {m.name for m in manager.modules()} == {"a", "b", "c"}


def test_max_cpu_loras_is_a_hard_bound_and_no_request_is_lost(tiny_model_dir, tmp_path, shapes):
    """Requests of more adapters than --max-cpu-loras: the loaded set never exceeds it, every request runs."""
    from bowline_runtime.lora.adapter import load_adapter as read

    paths = {n: str(write_lora_adapter(tiny_model_dir, tmp_path / n, rank=2, seed=i)) for i, n in enumerate("abcd")}
    sizes: list[int] = []
    installs = _Installs()
    sched = Scheduler(BlockManager(64, 4, False), 8, 64, max_loras=2)
    manager = LoRAManager(shapes, 16, max_loras=2, max_cpu_loras=2, install=installs, base_model_name="tiny",
                          running=lambda: {s.lora_id for s in sched.running if s.lora_id})
    sched.load_lora = manager.load_for_batch
    ids = {n: manager.add(LoRAModule(n, p), read(p, shapes, 16)) for n, p in paths.items()}
    assert len(manager.loaded) == 2  # the last two of the four stay loaded
    seqs = [_seq(i, manager.acquire(n)) for i, n in enumerate("abcdab")]
    for s in seqs:
        sched.add(s)
    ran: set[int] = set()
    for _ in range(20):
        batch = sched.schedule()
        assert {s.lora_id for s in batch.seqs} <= set(manager.loaded)  # what runs is loaded
        sizes.append(len(manager.loaded))
        for s in list(batch.seqs):  # each sequence ends after its first step
            ran.add(s.seq_id)
            sched.finish(s)
            manager.release(s.lora_id)
        if not sched.has_unfinished():
            break
    assert ran == {s.seq_id for s in seqs} and not sched.failed
    assert max(sizes) <= 2
    assert {ids[n] for n in "ab"} & {i for i, loaded in installs.log if loaded}  # a and b were read again


def test_an_adapter_that_cannot_be_read_again_ends_its_requests(tiny_model_dir, tmp_path, shapes):
    import shutil

    path = write_lora_adapter(tiny_model_dir, tmp_path / "a", rank=2)
    other = write_lora_adapter(tiny_model_dir, tmp_path / "b", rank=2, seed=1)
    sched = Scheduler(BlockManager(64, 4, False), 8, 64, max_loras=1)
    manager = LoRAManager(shapes, 16, max_loras=1, max_cpu_loras=1, install=_Installs(), base_model_name="tiny",
                          running=lambda: {s.lora_id for s in sched.running if s.lora_id})
    sched.load_lora = manager.load_for_batch
    a = manager.add(LoRAModule("a", str(path)))
    manager.add(LoRAModule("b", str(other)))  # drops a (idle) to stay within the bound
    shutil.rmtree(path)
    seq = _seq(0, manager.acquire("a"))
    sched.add(seq)
    sched.add(_seq(1, 0))
    batch = sched.schedule()
    assert [s.seq_id for s in batch.seqs] == [1] and sched.failed == [seq] and seq.finish_reason == "abort"
    assert a not in manager.loaded


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


@pytest.mark.parametrize("kernel_table", [False, True], ids=["torch", "kernel"])
def test_batched_update_equals_each_rows_own_product(tiny_model_dir, tmp_path, shapes, kernel_table):
    if kernel_table and not lora_kernel.usable(torch.device("cpu"), torch.float32):
        pytest.skip("the CPU kernels are not built here (no C compiler, or BOWLINE_CPU_KERNELS=0)")
    adapters = {i: load_adapter(write_lora_adapter(tiny_model_dir, tmp_path / str(i), rank=4, seed=i), shapes, 16)
                for i in (1, 2)}
    store = {i: pack_adapter(a, shapes, 0, 1, torch.float32, torch.device("cpu"), kernel_table=kernel_table)
             for i, a in adapters.items()}
    x = torch.randn(7, 64)
    out = torch.zeros(7, 2 * shapes.sizes["gate_proj"][1])  # the fused gate/up columns
    segments = [(0, 2, 1), (2, 3, 2), (4, 6, 1), (6, 7, 2)]  # row 3 is the base model's
    batch = LoRABatch(store, segments, torch.device("cpu"), 1)
    assert (batch.kernel is not None) == kernel_table
    batch.add(0, "gate_up", x, [out])
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
    # Without the kernel's tables: the torch paths other devices take.
    store = {i: pack_adapter(a, shapes, 0, 1, torch.float32, torch.device("cpu"), kernel_table=False)
             for i, a in adapters.items()}
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


@pytest.mark.parametrize("num_rows", [11, 300])
def test_kernel_update_equals_torch_for_mixed_rows(kernel_isa, tiny_model_dir, tmp_path, shapes, num_rows):
    """The C kernel (kernels/lora.c, built for this CPU and for AVX2 only) against the per-adapter torch
    loop: base rows among the adapters' (contiguous and scattered), ranks below --max-lora-rank,
    adapters on some projections only, every product of two layers, decode- and prefill-sized steps."""
    if not lora_kernel.usable(torch.device("cpu"), torch.float32):
        pytest.skip("the CPU kernels are not built here (no C compiler, or BOWLINE_CPU_KERNELS=0)")
    from bowline_runtime.lora.delta import GROUPS

    specs = ((1, 4, ["q_proj", "v_proj", "down_proj"]), (2, 8, None), (3, 16, ["k_proj", "o_proj", "up_proj"]),
             (4, 2, ["gate_proj"]))
    adapters = {i: load_adapter(write_lora_adapter(tiny_model_dir, tmp_path / str(i), rank=r, seed=i,
                                                   **({"targets": t} if t else {})), shapes, 16)
                for i, r, t in specs}
    cpu = torch.device("cpu")
    with_kernel = {i: pack_adapter(a, shapes, 0, 1, torch.float32, cpu, kernel_table=True) for i, a in adapters.items()}
    with_torch = {i: pack_adapter(a, shapes, 0, 1, torch.float32, cpu, kernel_table=False) for i, a in adapters.items()}
    cut = [0, 2, 3, 4, num_rows // 2, num_rows // 2 + 1, num_rows - 3, num_rows - 1, num_rows]
    # Rows 2..3 and num_rows - 3.. num_rows - 1 are the base model's; adapter 1 has two separate spans.
    segments = [(cut[0], cut[1], 1), (cut[3], cut[4], 3), (cut[4], cut[5], 1), (cut[5], cut[6], 2), (cut[7], cut[8], 4)]
    torch.manual_seed(0)
    for group, parts in GROUPS.items():
        x = torch.randn(num_rows, shapes.sizes[parts[0]][0])
        base = torch.randn(num_rows, sum(shapes.sizes[p][1] for p in parts))
        got, want = base.clone(), base.clone()
        batch = LoRABatch(with_kernel, segments, cpu, 1)
        reference = LoRABatch(with_torch, segments, cpu, 1)
        assert batch.kernel is not None and reference.kernel is None
        for layer in range(shapes.num_layers):
            batch.add(layer, group, x, [got])
            reference.add(layer, group, x, [want])
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        assert torch.equal(got[cut[1]:cut[3]], base[cut[1]:cut[3]])  # base rows untouched
        assert torch.equal(got[cut[6]:cut[7]], base[cut[6]:cut[7]])
