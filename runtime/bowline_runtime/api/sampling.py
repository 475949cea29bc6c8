"""Turn a request's fields into the engine's SamplingParams, refusing what cannot be honoured.

Pure functions of (request, server settings): unit-tested without a model. Each refusal is an
APIError naming the field, so a client learns what to change instead of getting silently
different behaviour.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from bowline_runtime.api.errors import APIError, bad_request
from bowline_runtime.api.protocol import SamplingFields
from bowline_runtime.engine.request_checks import RequestLimits
from bowline_runtime.engine.sampling_params import GuidedDecodingParams, SamplingParams


@dataclass(slots=True, frozen=True)
class ServerLimits:
    """The server settings that decide whether a request is acceptable."""

    vocab_size: int
    max_model_len: int
    enable_logprob: bool = False
    max_logprobs: int = 20
    guided_any_whitespace: bool = False

    @property
    def request_limits(self) -> RequestLimits:
        """The engine-dependent part, for the engine's own check (engine/request_checks.py)."""
        return RequestLimits(self.vocab_size, self.max_model_len, self.max_logprobs)


def require_logprobs_enabled(limits: ServerLimits, param: str) -> None:
    """Logprobs follow FastDeploy: off unless the server runs with --enable-logprob."""
    if not limits.enable_logprob:
        raise APIError(
            f"{param}: log-probabilities are disabled on this server; start it with --enable-logprob "
            "(or BOWLINE_ENABLE_LOGPROB=true)",
            400,
            param=param,
            code="logprobs_disabled",
        )


def check_logprobs(count: int | None, limits: ServerLimits, param: str) -> None:
    if count is None:
        return
    require_logprobs_enabled(limits, param)  # the ceiling itself is the engine's rule (request_checks)


def resolve_best_of(req: SamplingFields) -> int | None:
    """`num_beams` (sent by the Chinese-LLaMA-Alpaca demo) is another name for best_of."""
    if req.num_beams is not None and req.best_of is not None and req.num_beams != req.best_of:
        raise bad_request(f"num_beams ({req.num_beams}) and best_of ({req.best_of}) disagree; send one", "num_beams")
    return req.best_of if req.best_of is not None else req.num_beams


def _logit_bias(raw: dict[str, float] | None) -> dict[int, float] | None:
    """JSON object keys are strings; the engine wants token ids (their range is the engine's rule)."""
    if not raw:
        return None
    bias: dict[int, float] = {}
    for key, value in raw.items():
        try:
            token_id = int(key)
        except ValueError:
            raise bad_request(f"logit_bias keys must be token ids, got {key!r}", "logit_bias") from None
        bias[token_id] = float(value)
    return bias


def _bad_words_token_ids(raw: list[int] | list[list[int]] | None) -> list[list[int]]:
    """FastDeploy sends a flat list (each id banned on its own); vLLM-style lists of sequences also work."""
    if not raw:
        return []
    sequences = [[x] if isinstance(x, int) else list(x) for x in raw]
    if any(not seq for seq in sequences):
        raise bad_request("bad_words_token_ids must not contain empty sequences", "bad_words_token_ids")
    return sequences


def _json_value(value: dict[str, Any] | str, param: str) -> dict[str, Any] | str:
    if isinstance(value, str):
        try:
            json.loads(value)
        except json.JSONDecodeError as exc:
            raise bad_request(f"{param} is a string but not valid JSON: {exc.msg} at character {exc.pos}", param) from None
    return value


def guided_params(req: SamplingFields, limits: ServerLimits) -> GuidedDecodingParams | None:
    """Collect the request's output-shape constraint; every spelling maps to one GuidedDecodingParams."""
    found: list[tuple[str, dict[str, Any]]] = []
    if req.guided_json is not None:
        found.append(("guided_json", {"json": _json_value(req.guided_json, "guided_json")}))
    if req.guided_regex is not None:
        found.append(("guided_regex", {"regex": req.guided_regex}))
    if req.guided_choice is not None:
        if not req.guided_choice:
            raise bad_request("guided_choice must list at least one choice", "guided_choice")
        found.append(("guided_choice", {"choice": list(req.guided_choice)}))
    if req.guided_grammar is not None:
        found.append(("guided_grammar", {"grammar": req.guided_grammar}))
    if req.structural_tag is not None:
        found.append(("structural_tag", {"structural_tag": _json_value(req.structural_tag, "structural_tag")}))
    so = req.structured_outputs
    if so is not None:
        members = {
            "json": so.json_,
            "regex": so.regex,
            "choice": so.choice,
            "grammar": so.grammar,
            "structural_tag": so.structural_tag,
        }
        for name, value in members.items():
            if value is not None:
                found.append((f"structured_outputs.{name}", {name: value}))
        if so.json_object:
            found.append(("structured_outputs.json_object", {"json_object": True}))
    rf = req.response_format
    if rf is not None and rf.type == "json_object":
        found.append(("response_format", {"json_object": True}))
    elif rf is not None and rf.type == "json_schema":
        assert rf.json_schema is not None and rf.json_schema.json_schema is not None
        found.append(("response_format", {"json": rf.json_schema.json_schema}))
    if not found:
        return None
    if len(found) > 1:
        names = ", ".join(name for name, _ in found)
        raise bad_request(f"give at most one output constraint; this request sets {names}", found[1][0])
    return GuidedDecodingParams(**found[0][1], any_whitespace=limits.guided_any_whitespace)


def build_sampling_params(
    req: SamplingFields,
    limits: ServerLimits,
    *,
    max_tokens: int | None,
    logprobs: int | None,
    prompt_logprobs: int | None = None,
) -> SamplingParams:
    """The engine's parameters for this request. Raises APIError or RequestRejected (both 400)."""
    best_of = resolve_best_of(req)
    temperature = 1.0 if req.temperature is None else req.temperature
    if req.use_beam_search:
        if req.temperature is not None and req.temperature > 1e-5:
            raise bad_request(
                "beam search is deterministic: set temperature to 0 (or leave it out) with use_beam_search",
                "temperature",
            )
        temperature = 0.0
    elif req.length_penalty is not None and req.length_penalty != 1.0:
        raise bad_request("length_penalty only applies with use_beam_search: true", "length_penalty")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if any(s == "" for s in stop):
        raise bad_request("stop strings must not be empty", "stop")
    # Value ranges (and top_k -1 meaning off) are SamplingParams' rules; token-id ranges and
    # lengths are the engine's (engine/request_checks.py): neither is repeated here.
    return SamplingParams(
        n=req.n,
        best_of=best_of,
        temperature=temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=req.top_k if req.top_k is not None else 0,
        min_p=req.min_p or 0.0,
        seed=req.seed,
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
        logit_bias=_logit_bias(req.logit_bias),
        bad_words=list(req.bad_words or []),
        bad_words_token_ids=_bad_words_token_ids(req.bad_words_token_ids),
        min_tokens=req.min_tokens or 0,
        max_tokens=max_tokens,
        ignore_eos=req.ignore_eos,
        stop=stop,
        stop_token_ids=list(req.stop_token_ids or []),
        include_stop_str_in_output=req.include_stop_str_in_output,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        temp_scaled_logprobs=req.temp_scaled_logprobs,
        top_p_normalized_logprobs=req.top_p_normalized_logprobs,
        use_beam_search=req.use_beam_search,
        length_penalty=1.0 if req.length_penalty is None else req.length_penalty,
        skip_special_tokens=req.skip_special_tokens,
        guided=guided_params(req, limits),
        reasoning_max_tokens=req.reasoning_max_tokens,
    )


def check_stream_compatible(req: SamplingFields, params: SamplingParams) -> None:
    """best_of > n picks winners only at the end, so it cannot stream (vLLM refuses it too)."""
    if req.stream and not params.use_beam_search and params.num_candidates > params.n:
        raise bad_request("best_of > n cannot be streamed: the best candidates are only known at the end", "best_of")
