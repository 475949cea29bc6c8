"""Text for the outputs of requests the engine does not detokenize, assembled on the server's side.

Why here: with the engine core in its own process (vLLM v1's split), decoding token ids to text in
the core would put two `tokenizer.decode` calls per token and sequence inside every step, on the
critical path of the whole batch. The server process decodes instead, while the core already runs the
next step. Requests with stop strings (and beam search) stay decoded in the core: a stop string must
end its sequence in the step that matched it, so no token after it is generated or counted.

The rules mirror `LLMEngine._append_token` exactly, so the text is the same either way: every
generated token is decoded except the one that finished the output when it is an EOS token
(`ignore_eos` off) or a stop token id and `include_stop_str_in_output` is off.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection

from bowline_runtime.engine.detokenizer import IncrementalDetokenizer
from bowline_runtime.engine.outputs import CompletionOutput, RequestOutput
from bowline_runtime.engine.sampling_params import SamplingParams


def decoded_by_server(params: SamplingParams) -> bool:
    """Whether the server assembles this request's text (the engine then gets detokenize=False)."""
    return params.detokenize and not params.stop and not params.use_beam_search


def engine_params(params: SamplingParams) -> SamplingParams:
    """The parameters the engine gets: the same, with detokenize=False where the server decodes."""
    return dataclasses.replace(params, detokenize=False) if decoded_by_server(params) else params


def text_token_ids(out: CompletionOutput, params: SamplingParams, eos_token_ids: Collection[int]) -> list[int]:
    """The ids of this delta whose text is shown: all but a finishing EOS or stop token (see module doc)."""
    ids = out.new_token_ids
    if not ids or out.finish_reason != "stop":
        return ids
    last = ids[-1]
    if isinstance(out.stop_reason, int) and not isinstance(out.stop_reason, bool):
        return ids if params.include_stop_str_in_output else ids[:-1]
    if out.stop_reason is None and last in eos_token_ids and not params.ignore_eos:
        return ids[:-1]
    return ids


class DeltaDetokenizer:
    """Fills `new_text` of each delta of one engine request, one incremental decoder per output index."""

    def __init__(self, tokenizer, params: SamplingParams, eos_token_ids: Collection[int]) -> None:
        self.tokenizer = tokenizer
        self.params = params
        self.eos_token_ids = eos_token_ids
        self._decoders: dict[int, IncrementalDetokenizer] = {}

    def fill(self, delta: RequestOutput) -> RequestOutput:
        for out in delta.outputs:
            decoder = self._decoders.get(out.index)
            if decoder is None:
                decoder = self._decoders[out.index] = IncrementalDetokenizer(
                    self.tokenizer, [], False, self.params.skip_special_tokens
                )
            for token_id in text_token_ids(out, self.params, self.eos_token_ids):
                decoder.add_token(token_id, check_stop=False)
            if out.finish_reason is not None:
                decoder.finish()
            out.new_text = decoder.take_new_text()
        return delta
