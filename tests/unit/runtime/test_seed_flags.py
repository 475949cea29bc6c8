"""The reference documents' remaining launch flags parse as vLLM spells them, each has its
environment variable, and the ones with no effect of their own are explained in the log."""

from __future__ import annotations

import pytest
from bowline_runtime.config import build_parser, config_from_args
from bowline_runtime.launch_notes import launch_notes


def config(*argv: str, env: dict[str, str] | None = None):
    return config_from_args(build_parser().parse_args(["--model", "m", *argv]), env or {})


def test_the_ascend_flags_parse_as_written():
    c = config(
        "--num-scheduler-steps=8", "--multi-step-stream-outputs=false", "--enforce-eager", "--trust-remote-code",
        "--distributed-executor-backend", "ray", "--disable-async-output-proc", "--block-size=128",
    )
    assert (c.num_scheduler_steps, c.multi_step_stream_outputs, c.enforce_eager) == (8, False, True)
    assert (c.distributed_executor_backend, c.disable_async_output_proc, c.block_size) == ("ray", True, 128)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [([], True), (["--multi-step-stream-outputs"], True), (["--multi-step-stream-outputs", "False"], False),
     (["--multi-step-stream-outputs=true"], True), (["--no-multi-step-stream-outputs"], False)],
)
def test_multi_step_stream_outputs_takes_vllms_spellings(argv, expected):
    assert config(*argv).multi_step_stream_outputs is expected


def test_the_alpaca_flags_parse_as_written():
    c = config("--tokenizer-mode", "slow", "--tokenizer", "t", "--served-model-name", "chinese-llama-alpaca-2")
    assert (c.tokenizer_mode, c.tokenizer, c.model_name) == ("slow", "t", "chinese-llama-alpaca-2")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--distributed-executor-backend", "slurm"], "choose one of ['mp', 'ray']"),
        (["--tokenizer-mode", "mistral"], "choose one of ['auto', 'slow']"),
        (["--api-server", "grpc"], "choose one of ['openai', 'vllm', 'both']"),
        (["--num-scheduler-steps", "0"], "--num-scheduler-steps must be >= 1"),
    ],
)
def test_bad_values_are_refused_naming_the_choices(argv, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        config(*argv)


def test_the_iteration_timeout_reads_vllms_variable_unless_bowlines_is_set():
    assert config().engine_iteration_timeout_s is None
    assert config(env={"VLLM_ENGINE_ITERATION_TIMEOUT_S": "600"}).engine_iteration_timeout_s == 600.0
    both = {"VLLM_ENGINE_ITERATION_TIMEOUT_S": "600", "BOWLINE_ENGINE_ITERATION_TIMEOUT_S": "30"}
    assert config(env=both).engine_iteration_timeout_s == 30.0
    with pytest.raises(ValueError, match="VLLM_ENGINE_ITERATION_TIMEOUT_S: cannot read 'soon'"):
        config(env={"VLLM_ENGINE_ITERATION_TIMEOUT_S": "soon"})


def test_settings_without_an_effect_of_their_own_are_each_explained():
    c = config("--enforce-eager", "--disable-async-output-proc", "--distributed-executor-backend", "ray",
               "--num-scheduler-steps", "4", "--no-multi-step-stream-outputs")
    env = {"ASCEND_RT_VISIBLE_DEVICES": "0,1", "PYTORCH_NPU_ALLOC_CONF": "expandable_segments:True", "HOME": "/root"}
    notes = launch_notes(c, env)
    joined = "\n".join(notes)
    for fragment in ("--enforce-eager: accepted", "--disable-async-output-proc: accepted", "no Ray executor",
                     "--num-scheduler-steps 4", "a run's tokens at once", "ASCEND_RT_VISIBLE_DEVICES=0,1",
                     "PYTORCH_NPU_ALLOC_CONF=expandable_segments:True: honoured by torch_npu"):
        assert fragment in joined, fragment
    assert "HOME" not in joined
    assert launch_notes(config(), {}) == []


OPENAI = {"/v1/completions", "/v1/chat/completions"}


@pytest.mark.parametrize(("mode", "routes"), [("openai", OPENAI), ("vllm", {"/generate"}), ("both", OPENAI | {"/generate"})])
def test_api_server_chooses_the_route_families(mode, routes):
    from bowline_runtime.api.app import build_app

    paths = set(build_app(config("--api-server", mode)).openapi()["paths"])
    assert routes <= paths
    assert not ({"/v1/completions", "/v1/chat/completions", "/generate"} - routes) & paths
    assert "/health" in paths
