"""`python -m bowline_runtime generate --model M --input prompts.jsonl --output out.jsonl`: a batch job.

Each input line is a JSON object with `prompt` (text) or `messages` (a chat conversation, templated
as the server templates it), optionally `id` (copied to the output) and any sampling parameter by
its vLLM name (`max_tokens`, `temperature`, `stop`, ...) overriding the command's defaults. Each
output line, in input order, is `{"id", "prompt", "prompt_token_ids", "outputs": [{"index", "text",
"token_ids", "finish_reason", "stop_reason"}]}`. All lines go through the continuous-batching engine
together, as a Kubernetes Job running this command would want.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

from bowline_runtime.config import config_from_args

_LINE_KEYS = {"id", "prompt", "messages", "chat_template_kwargs"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", required=True, help="JSON Lines file: one {prompt|messages, ...} per line")
    parser.add_argument("--output", required=True, help="JSON Lines file written in input order")
    parser.add_argument("--max-tokens", type=int, default=16, help="default max_tokens per line (vLLM's 16)")
    parser.add_argument("--temperature", type=float, default=1.0, help="default temperature per line")
    parser.add_argument("--top-p", type=float, default=1.0, help="default top_p per line")
    parser.add_argument("--top-k", type=int, default=0, help="default top_k per line (0 or -1: off)")


def read_lines(path: Path, defaults: dict[str, Any]) -> list[tuple[dict[str, Any], Any]]:
    """(line, SamplingParams) per non-empty line; a bad line raises ValueError naming its number."""
    from bowline_runtime.offline import SamplingParams

    allowed = {f.name for f in dataclasses.fields(SamplingParams)} - {"guided"}
    items = []
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            line = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{number}: not JSON ({exc.msg})") from None
        if not isinstance(line, dict) or ("prompt" in line) == ("messages" in line):
            raise ValueError(f"{path}:{number}: give exactly one of 'prompt' or 'messages'")
        unknown = set(line) - _LINE_KEYS - allowed
        if unknown:
            raise ValueError(f"{path}:{number}: unknown fields {sorted(unknown)}")
        fields = {**defaults, **{k: v for k, v in line.items() if k in allowed}}
        if isinstance(fields.get("stop"), str):
            fields["stop"] = [fields["stop"]]
        try:
            params = SamplingParams(**fields)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{path}:{number}: {exc}") from None
        items.append((line, params))
    return items


def run(args: argparse.Namespace) -> int:
    from bowline_runtime.offline import LLM

    config = config_from_args(args)
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    defaults = {"max_tokens": args.max_tokens, "temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k}
    items = read_lines(Path(args.input), defaults)
    engine_settings = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name != "model"}
    llm = LLM(config.model, **engine_settings)
    try:
        results: list[Any] = [None] * len(items)
        text_rows = [i for i, (line, _) in enumerate(items) if "prompt" in line]
        chat_rows = [i for i, (line, _) in enumerate(items) if "messages" in line]
        if text_rows:
            outs = llm.generate([items[i][0]["prompt"] for i in text_rows], [items[i][1] for i in text_rows])
            for i, out in zip(text_rows, outs, strict=True):
                results[i] = out
        for i in chat_rows:  # one call per conversation: each may carry its own template kwargs
            line, params = items[i]
            results[i] = llm.chat(line["messages"], params, chat_template_kwargs=line.get("chat_template_kwargs"), use_tqdm=False)[0]
    finally:
        llm.shutdown()
    with open(args.output, "w", encoding="utf-8") as fh:
        for (line, _), out in zip(items, results, strict=True):
            record = {
                "id": line.get("id"),
                "prompt": out.prompt,
                "prompt_token_ids": out.prompt_token_ids,
                "outputs": [
                    {"index": o.index, "text": o.text, "token_ids": o.token_ids, "finish_reason": o.finish_reason,
                     "stop_reason": o.stop_reason}
                    for o in out.outputs
                ],
            }
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")
    print(f"wrote {len(results)} results to {args.output}")
    return 0
