"""EngineConfig from flags and BOWLINE_* environment variables (config.py), in-process."""

from __future__ import annotations

import pytest
from bowline_runtime.config import EngineConfig, build_parser, config_from_args, env_name


def load(argv: list[str], env: dict[str, str] | None = None) -> EngineConfig:
    return config_from_args(build_parser().parse_args(argv), environ=env or {})


def test_defaults_apply_when_neither_flag_nor_env():
    cfg = load(["--model", "m"])
    assert cfg.model == "m"
    assert cfg.max_num_seqs == EngineConfig.__dataclass_fields__["max_num_seqs"].default
    assert cfg.block_size == 16
    assert cfg.enable_prefix_caching is False
    assert cfg.max_model_len is None
    assert cfg.model_name == "m"


def test_env_overrides_default_and_flag_overrides_env():
    env = {"BOWLINE_MAX_NUM_SEQS": "7", "BOWLINE_BLOCK_SIZE": "32", "BOWLINE_SERVED_MODEL_NAME": "envname"}
    cfg = load(["--model", "m", "--block-size", "8"], env)
    assert cfg.max_num_seqs == 7  # from the environment
    assert cfg.block_size == 8  # the flag wins
    assert cfg.served_model_name == "envname" and cfg.model_name == "envname"


def test_model_may_come_from_the_environment():
    assert load([], {"BOWLINE_MODEL": "from-env"}).model == "from-env"


def test_missing_model_raises_naming_flag_and_variable():
    with pytest.raises(ValueError, match=r"--model is required \(or set BOWLINE_MODEL\)"):
        load([])


def test_env_names():
    assert env_name("max_model_len") == "BOWLINE_MAX_MODEL_LEN"


@pytest.mark.parametrize(("raw", "expected"), [("1", True), ("true", True), ("TRUE", True), ("yes", True),
                                               ("on", True), (" True ", True), ("0", False), ("false", False),
                                               ("no", False), ("off", False), ("", False)])
def test_boolean_env_parsing(raw, expected):
    assert load(["--model", "m"], {"BOWLINE_ENABLE_PREFIX_CACHING": raw}).enable_prefix_caching is expected


def test_boolean_flag_overrides_env_both_ways():
    env = {"BOWLINE_ENABLE_PREFIX_CACHING": "true"}
    assert load(["--model", "m", "--no-enable-prefix-caching"], env).enable_prefix_caching is False
    env = {"BOWLINE_ENABLE_PREFIX_CACHING": "false"}
    assert load(["--model", "m", "--enable-prefix-caching"], env).enable_prefix_caching is True


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        ([], {"BOWLINE_ENABLE_PREFIX_CACHING": "treu"}, "BOWLINE_ENABLE_PREFIX_CACHING: cannot read 'treu' (expected true or false)"),
        (["--port", "eighty"], {}, "--port: cannot read 'eighty' (expected an integer)"),
        ([], {"BOWLINE_MAX_NUM_SEQS": "1.5"}, "BOWLINE_MAX_NUM_SEQS: cannot read '1.5' (expected an integer)"),
        (["--gpu-memory-utilization", "lots"], {}, "--gpu-memory-utilization: cannot read 'lots' (expected a number)"),
        (["--dtype", "int4"], {}, "--dtype: cannot read 'int4' (choose one of"),
        ([], {"BOWLINE_LOAD_FORMAT": "pickle"}, "BOWLINE_LOAD_FORMAT: cannot read 'pickle' (choose one of ['auto', 'dummy'])"),
    ],
)
def test_a_bad_value_raises_naming_its_source(argv, env, message):
    with pytest.raises(ValueError) as info:
        load(["--model", "m", *argv], env)
    assert message in str(info.value)


def test_a_good_flag_hides_a_bad_env_value():
    assert load(["--model", "m", "--port", "9000"], {"BOWLINE_PORT": "nope"}).port == 9000


@pytest.mark.parametrize(
    ("argv", "field"),
    [
        (["--block-size", "0"], "--block-size"),
        (["--max-num-seqs", "0"], "--max-num-seqs"),
        (["--tensor-parallel-size", "0"], "--tensor-parallel-size"),
        (["--gpu-memory-utilization", "1.5"], "--gpu-memory-utilization"),
        (["--max-model-len", "0"], "--max-model-len"),
    ],
)
def test_out_of_range_values_raise(argv, field):
    with pytest.raises(ValueError, match=field):
        load(["--model", "m", *argv])


def test_numbers_are_typed():
    cfg = load(["--model", "m", "--gpu-memory-utilization", "0.5", "--max-model-len", "128"],
               {"BOWLINE_KV_CACHE_MEMORY": "1048576"})
    assert cfg.gpu_memory_utilization == 0.5 and isinstance(cfg.gpu_memory_utilization, float)
    assert cfg.max_model_len == 128 and cfg.kv_cache_memory == 1048576
