"""The synchronous engine: admits requests, steps the batch, turns sampled tokens into outputs.

One `step()` = schedule -> one forward over the packed batch -> batched sampling -> stop checks and
incremental detokenisation -> outputs for every request that moved. The async front runs it in a loop.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from bowline_runtime.config import EngineConfig
from bowline_runtime.devices import get_device
from bowline_runtime.engine.block_manager import BlockManager
from bowline_runtime.engine.detokenizer import IncrementalDetokenizer
from bowline_runtime.engine.errors import RequestRejected
from bowline_runtime.engine.model_runner import ModelRunner, StepPlan, prepare_step
from bowline_runtime.engine.multi_step import MultiStepWindow
from bowline_runtime.engine.multimodal import ImageInput, check_images
from bowline_runtime.engine.outputs import CompletionOutput, EngineStats, RequestOutput, TokenLogprob
from bowline_runtime.engine.request_checks import RequestLimits, check_request
from bowline_runtime.engine.sampler import Sampler, token_logprobs
from bowline_runtime.engine.sampling_params import SamplingParams
from bowline_runtime.engine.scheduler import Scheduler
from bowline_runtime.engine.sequence import Sequence
from bowline_runtime.engine.spec_decode import speculative_config_from
from bowline_runtime.engine.worker import TensorParallelGroup
from bowline_runtime.lora.manager import LoRANotFound, build_lora_manager, lora_gauges
from bowline_runtime.models import loader, vision

logger = logging.getLogger("bowline.engine")

CPU_DEFAULT_KV_BYTES = 1 << 30


@dataclass(slots=True)
class PreparedRequest:
    """A request that passed every check, with what it needs precomputed (outside the step loop)."""

    prompt_token_ids: list[int]
    params: SamplingParams
    bad_word_ids: list[list[int]]
    constraint_factory: Any = None
    images: tuple[ImageInput, ...] = ()  # placeholder runs and pixels (engine.multimodal)


@dataclass(slots=True)
class _Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    arrival_time: float
    reported: bool = False  # its first output is out: prompt ids and prompt logprobs went with it
    lora_id: int = 0  # the LoRA adapter serving it (0: the base model)


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.device = get_device(config.device)
        hf_config = loader.load_config(config.model, config.trust_remote_code)
        self.hf_config = hf_config
        text_config = hf_config.get_text_config()  # a vision-language model's language part, else itself
        self.image_token_id = vision.image_token_id(hf_config)  # None: text-only
        self.max_model_len = self._resolve_max_model_len(text_config)
        self.dtype = loader.resolve_dtype(config.dtype, hf_config, self.device)
        self.tokenizer = loader.load_tokenizer(config.tokenizer or config.model, config.trust_remote_code, config.tokenizer_mode)
        self.eos_token_ids = loader.eos_token_ids(config.model, hf_config, self.tokenizer)
        self.vocab_size = text_config.vocab_size
        self.request_limits = RequestLimits(self.vocab_size, self.max_model_len, config.max_logprobs)
        self.tp = TensorParallelGroup(config, self.device, self.dtype, hf_config)
        t0 = time.perf_counter()
        self.runner: ModelRunner = self.tp.start_driver()
        logger.info(
            "loaded %s (%s, %s, %s weights) on %s x%d in %.1f s",
            config.model, type(self.runner.model).__name__, self.dtype, config.load_format,
            self.device.type, config.tensor_parallel_size, time.perf_counter() - t0,
        )
        self.block_size = config.block_size
        # Adapters (and their batch slots) take device memory: placed before the KV cache is sized from what is left.
        self.lora = build_lora_manager(config, hf_config, self.tp.set_lora, self._running_adapters)
        self.speculator = self._load_speculator(hf_config)
        num_blocks = self._num_kv_blocks()
        self.tp.allocate_kv_cache(num_blocks * self.block_size)
        if self.speculator is not None:
            self.speculator.allocate_kv_cache(num_blocks * self.block_size)
        logger.info(
            "KV cache: %d blocks of %d tokens (%d tokens, %.1f MiB per rank, %s)",
            num_blocks, self.block_size, num_blocks * self.block_size,
            num_blocks * self.block_size * self.runner.kv_bytes_per_token(self.tp.num_kv_heads_local) / 2**20,
            str(self.runner.kv_dtype).removeprefix("torch."),
        )
        self.block_manager = BlockManager(num_blocks, self.block_size, config.enable_prefix_caching)
        max_batched = config.max_num_batched_tokens
        if max_batched is None:
            # Without chunking a whole prompt must fit one step, as vLLM also sizes it.
            floor = config.max_num_seqs if config.enable_chunked_prefill else max(config.max_num_seqs, self.max_model_len)
            max_batched = max(self.device.default_max_num_batched_tokens, floor)
        if max_batched < config.max_num_seqs:
            raise ValueError(
                f"--max-num-batched-tokens ({max_batched}) must be at least --max-num-seqs ({config.max_num_seqs})"
            )
        if not config.enable_chunked_prefill and max_batched < self.max_model_len:
            raise ValueError(
                f"without chunked prefill a whole prompt must fit one step: --max-num-batched-tokens ({max_batched}) "
                f"must be at least --max-model-len ({self.max_model_len})"
            )
        self.scheduler = Scheduler(
            self.block_manager, config.max_num_seqs, max_batched, config.enable_chunked_prefill,
            max_loras=config.max_loras if config.enable_lora else 0,
        )
        if self.speculator is not None:
            self.scheduler.num_lookahead_slots = self.speculator.k
        if self.lora is not None:
            self.scheduler.load_lora = self.lora.load_for_batch
        torch.manual_seed(config.seed)  # the draws of requests that bring no seed of their own
        self.sampler = Sampler(min(self.vocab_size, len(self.tokenizer)), self.eos_token_ids)
        self.requests: dict[str, _Request] = {}
        self._seq_ids = itertools.count()
        self.multi_step = MultiStepWindow(config.num_scheduler_steps, config.multi_step_stream_outputs)

    # --- start-up checks ---------------------------------------------------------------------------

    def _resolve_max_model_len(self, hf_config) -> int:
        limit = loader.max_position_limit(hf_config)
        wanted = self.config.max_model_len
        if wanted is None:
            if limit is None:
                raise ValueError("the model config gives no position limit: set --max-model-len")
            return limit
        if limit is not None and wanted > limit:
            raise ValueError(
                f"--max-model-len {wanted} exceeds the model's position limit of {limit} "
                f"(max_position_embeddings in config.json); use at most {limit}"
            )
        return wanted

    def _load_speculator(self, hf_config):
        """The speculative decoder the flags ask for (engine.spec_decode), or None."""
        spec = speculative_config_from(self.config)
        if spec is None:
            return None
        from bowline_runtime.engine.spec_decode.decoder import SpeculativeDecoder

        vocab = min(self.vocab_size, len(self.tokenizer))
        return SpeculativeDecoder(spec, self.config, self.device, self.dtype, hf_config, vocab, self.tp)

    def _num_kv_blocks(self) -> int:
        per_token = self.runner.kv_bytes_per_token(self.tp.num_kv_heads_local)
        if self.speculator is not None:  # a draft model's KV lives in the same blocks
            per_token += self.speculator.kv_bytes_per_token()
        if self.device.type == "cpu" or self.config.kv_cache_memory:
            budget = self.config.kv_cache_memory or CPU_DEFAULT_KV_BYTES
        else:
            free, total = self.device.memory_info(0)
            budget = int(total * self.config.gpu_memory_utilization) - (total - free)
        # More blocks than max_num_seqs full-length sequences could ever use would only waste memory.
        useful = self.config.max_num_seqs * -(-self.max_model_len // self.block_size) + 1
        num_blocks = min(budget // (per_token * self.block_size), useful)
        if num_blocks * self.block_size < self.max_model_len:
            raise ValueError(
                f"the KV cache fits {num_blocks * self.block_size} tokens, fewer than --max-model-len "
                f"{self.max_model_len}: raise --gpu-memory-utilization / --kv-cache-memory or lower --max-model-len"
            )
        return int(num_blocks)

    # --- requests -----------------------------------------------------------------------------------

    def check_request(
        self, prompt_token_ids: list[int], params: SamplingParams, images: list[ImageInput] | None = None
    ) -> PreparedRequest:
        """Refuse what cannot be served (RequestRejected, the same rule the API applies before any
        header is sent); precompute the rest."""
        check_request(prompt_token_ids, params, self.request_limits)
        check_images(images or (), prompt_token_ids, self.image_token_id, "messages")
        bad_word_ids = [list(ids) for ids in params.bad_words_token_ids if ids]
        for word in params.bad_words:
            for variant in {word, " " + word.lstrip()}:
                ids = self.tokenizer.encode(variant, add_special_tokens=False)
                if ids and ids not in bad_word_ids:
                    bad_word_ids.append(ids)
        return PreparedRequest(
            list(prompt_token_ids), params, bad_word_ids, self._compile_constraint(params), tuple(images or ())
        )

    def _compile_constraint(self, params: SamplingParams):
        if params.guided is None and params.reasoning_max_tokens is None:
            return None
        try:
            from bowline_runtime.guided import compile_constraint
        except ImportError as exc:
            raise RequestRejected("guided decoding is not available in this build", "guided_json") from exc
        return compile_constraint(params, self.tokenizer, self.vocab_size)

    def add_request(self, request_id: str, prepared: PreparedRequest, arrival_time: float | None = None) -> None:
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        params = prepared.params
        arrival = arrival_time or time.time()
        lora_id = self._acquire_lora(params.lora_name)
        seqs = []
        for index in range(params.num_candidates):
            seq = Sequence(
                seq_id=next(self._seq_ids),
                request_id=request_id,
                index=index,
                token_ids=list(prepared.prompt_token_ids),
                num_prompt_tokens=len(prepared.prompt_token_ids),
                params=params,
                arrival_time=arrival,
                lora_id=lora_id,
            )
            if params.seed is not None:
                seq.generator = torch.Generator().manual_seed(params.seed + 7919 * index)
            if prepared.constraint_factory is not None:
                seq.constraint = prepared.constraint_factory()
            seq.bad_word_ids = prepared.bad_word_ids
            seq.images = prepared.images
            if params.detokenize:
                seq.detokenizer = IncrementalDetokenizer(
                    self.tokenizer, params.stop, params.include_stop_str_in_output, params.skip_special_tokens
                )
            if params.logprobs is not None:
                seq.logprobs = []
            if params.prompt_logprobs is not None:
                seq.prompt_logprobs = [None]
            seqs.append(seq)
            self.scheduler.add(seq)
        self.requests[request_id] = _Request(request_id, list(prepared.prompt_token_ids), params, seqs, arrival, lora_id=lora_id)

    def _acquire_lora(self, name: str | None) -> int:
        if name is None:
            return 0
        if self.lora is None:
            raise LoRANotFound(f"The model {name!r} does not exist (LoRA is not enabled).", "model")
        return self.lora.acquire(name)

    def _release(self, request: _Request) -> None:
        if request.lora_id and self.lora is not None:
            self.lora.release(request.lora_id)

    def abort_request(self, request_id: str) -> None:
        request = self.requests.pop(request_id, None)
        self.multi_step.drop(request_id)
        if request is None:
            return
        self._release(request)
        for seq in request.seqs:
            if not seq.is_finished:
                seq.finish_reason = "abort"
                self.scheduler.finish(seq)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def stats(self) -> EngineStats:
        stats = EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            num_free_blocks=self.block_manager.num_free_blocks,
            num_total_blocks=self.block_manager.num_blocks,
            spec_decode=self.speculator.stats.copy() if self.speculator is not None else None,
        )
        if self.lora is not None:
            stats.lora = lora_gauges(self.lora, self.scheduler)
        return stats

    # --- the step -------------------------------------------------------------------------------------

    def _running_adapters(self) -> set[int]:
        """The adapters of running sequences (the LoRA manager never drops them)."""
        scheduler = getattr(self, "scheduler", None)  # None while the manager loads --lora-modules
        return {s.lora_id for s in scheduler.running if s.lora_id} if scheduler is not None else set()

    def step(self) -> list[RequestOutput]:
        if self.scheduler.failed:  # their adapter could not be read again: they end, reported as aborted
            failed = {s.request_id: self.requests[s.request_id] for s in self.scheduler.failed
                      if s.request_id in self.requests}
            self.scheduler.failed.clear()
            for request in failed.values():
                for seq in request.seqs:
                    if not seq.is_finished:
                        seq.finish_reason = "abort"
                        self.scheduler.finish(seq)
            return self._outputs_for(failed.values())
        if self.speculator is not None:  # speculation schedules every step itself (no multi-step window)
            return self.speculator.step(self)
        admit = self.multi_step.admits
        batch = self.scheduler.schedule(admit=admit)
        if batch.is_empty and not admit:  # the window's sequences all finished: schedule anew
            self.multi_step.end()
            admit, batch = True, self.scheduler.schedule()
        if batch.is_empty:
            return self.multi_step.flush()
        self.multi_step.advance(admit)
        plan = prepare_step(batch, self.block_size, group_decodes=self.runner.decode_kernel is None)
        logits = self.tp.execute(plan.step)
        now = time.time()
        to_sample: list[Sequence] = []
        rows: list[int] = []
        for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_tokens, strict=True)):
            if plan.prompt_rows[i] is not None:
                self._record_prompt_logprobs(seq, logits, plan, i)
            seq.num_computed_tokens += n
            self.block_manager.register_full_blocks(seq)
            if plan.sample_rows[i] >= 0:
                to_sample.append(seq)
                rows.append(plan.sample_rows[i])
        touched: dict[str, _Request] = {}
        if to_sample:
            # Decode steps sample every row in order: no gather (a list index copies, ~0.15 ms at 16 rows).
            whole = len(rows) == logits.shape[0] and rows == list(range(len(rows)))
            result = self.sampler(logits if whole else logits[rows], to_sample)
            for seq, token_id, lp in zip(to_sample, result.token_ids, result.logprobs, strict=True):
                self._append_token(seq, token_id, lp, now)
                if seq.request_id in self.requests:
                    touched[seq.request_id] = self.requests[seq.request_id]
        return self.multi_step.deliver(self._outputs_for(touched.values()))

    def _outputs_for(self, touched: Iterable[_Request]) -> list[RequestOutput]:
        """Each request a step touched gets its delta; one whose sequences have all finished is released."""
        outputs = []
        for request in touched:
            finished = all(s.is_finished for s in request.seqs)
            outputs.append(self._delta(request, finished))
            if finished:
                del self.requests[request.request_id]
                self._release(request)
        return outputs

    def _record_prompt_logprobs(self, seq: Sequence, logits: torch.Tensor, plan: StepPlan, i: int) -> None:
        first_row, first_pos, count = plan.prompt_rows[i]
        lps = torch.log_softmax(logits[first_row : first_row + count].float()[:, : self.sampler.vocab_size], dim=-1)
        k = seq.params.prompt_logprobs or 0
        for j in range(count):
            target = seq.token_ids[first_pos + j + 1]
            seq.prompt_logprobs.append(token_logprobs(lps[j], target, k))

    def _append_token(self, seq: Sequence, token_id: int, lp: TokenLogprob | None, now: float) -> None:
        params = seq.params
        seq.token_ids.append(token_id)
        if seq.first_token_time is None:
            seq.first_token_time = now
        if lp is not None:
            seq.cumulative_logprob += lp.logprob
            if seq.logprobs is not None:
                seq.logprobs.append(lp)
        if seq.constraint is not None:
            seq.constraint.accept_token(token_id)

        # The sampler masks EOS and stop tokens below min_tokens, so reaching them here is final.
        reason: str | None = None
        detok = seq.detokenizer  # None: detokenize=False, the caller assembles the text (same rules: text_token_ids)
        if token_id in params.stop_token_ids:
            reason, seq.stop_reason = "stop", token_id
            if params.include_stop_str_in_output and detok is not None:
                detok.add_token(token_id, check_stop=False)
        elif token_id in self.eos_token_ids and not params.ignore_eos:
            reason = "stop"
        else:
            matched = None
            if detok is not None:
                matched = detok.add_token(token_id, check_stop=seq.num_output_tokens >= params.min_tokens)
            if matched is not None:
                reason, seq.stop_reason = "stop", matched
            elif seq.constraint is not None and seq.constraint.is_finished():
                reason = "stop"
        if reason is None:
            if params.max_tokens is not None and seq.num_output_tokens >= params.max_tokens:
                reason = "length"
            elif seq.num_tokens >= self.max_model_len:
                reason = "length"
        if reason is not None:
            seq.finish_reason = reason
            if detok is not None:
                detok.finish()
            self.scheduler.finish(seq)

    def _delta(self, request: _Request, finished: bool) -> RequestOutput:
        """What this step added to `request`: O(new tokens), not O(output length), per step."""
        outputs = []
        for seq in request.seqs:
            new_ids = seq.token_ids[seq.num_prompt_tokens + seq.num_sent_tokens :]
            seq.num_sent_tokens += len(new_ids)
            new_lps = None
            if seq.logprobs is not None:
                new_lps = seq.logprobs[seq.num_sent_logprobs :]
                seq.num_sent_logprobs += len(new_lps)
            outputs.append(
                CompletionOutput(
                    index=seq.index,
                    new_token_ids=new_ids,
                    new_text=seq.detokenizer.take_new_text() if seq.detokenizer is not None else "",
                    new_logprobs=new_lps,
                    cumulative_logprob=seq.cumulative_logprob,
                    finish_reason=seq.finish_reason,
                    stop_reason=seq.stop_reason,
                )
            )
        first = request.seqs[0]
        firsts = [s.first_token_time for s in request.seqs if s.first_token_time is not None]
        # The prompt's ids and logprobs do not change: they go once, with the first output (a request
        # is first reported when it samples, i.e. after its whole prompt was computed).
        prompt_ids: list[int] = []
        prompt_logprobs = None
        if not request.reported:
            request.reported = True
            prompt_ids = request.prompt_token_ids
            if first.prompt_logprobs is not None:
                prompt_logprobs = list(first.prompt_logprobs)
        return RequestOutput(
            request_id=request.request_id,
            prompt_token_ids=prompt_ids,
            outputs=outputs,
            finished=finished,
            prompt_logprobs=prompt_logprobs,
            arrival_time=request.arrival_time,
            first_token_time=min(firsts) if firsts else None,
            num_cached_tokens=first.num_cached_tokens,
        )

    def shutdown(self) -> None:
        self.tp.shutdown()


__all__ = ["LLMEngine", "PreparedRequest"]
