"""`python -m bowline_runtime serve|generate|make-tiny-model`."""

from __future__ import annotations

import argparse
import sys

from bowline_runtime.config import build_parser, config_from_args
from bowline_runtime.host_pages import prefer_huge_pages


def main(argv: list[str] | None = None) -> None:
    prefer_huge_pages()  # before anything imports torch
    parser = argparse.ArgumentParser(prog="bowline-runtime", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve a model over the OpenAI API")
    build_parser(serve)

    from bowline_runtime import batch_cli

    batch = sub.add_parser("generate", help="offline batch generation: JSON Lines prompts in, results out")
    build_parser(batch)
    batch_cli.add_arguments(batch)

    from bowline_runtime.tools.tiny_model import PRESETS

    tiny = sub.add_parser("make-tiny-model", help="write a small random-weight HF model folder")
    tiny.add_argument("out_dir")
    tiny.add_argument("--preset", default="tiny", choices=list(PRESETS))
    tiny.add_argument("--arch", default=None, choices=["llama", "qwen2"],
                      help="architecture (default: the preset's; llama for tiny and bench, qwen2 for qwen2.5-0.5b)")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--vision", action="store_true",
                      help="a llava model: a random CLIP vision tower and projector before the language model")
    tiny.add_argument("--copying", action="store_true",
                      help="hand-set weights that continue a prompt by copying it (induction heads; presets with "
                           "head size 64: bench, small), for n-gram speculative decoding benchmarks")
    tiny.add_argument("--quantization", default=None, choices=["awq", "w8a8"],
                      help="write the model quantized: AutoAWQ 4-bit or compressed-tensors int8 (W8A8)")
    tiny.add_argument("--config-only", action=argparse.BooleanOptionalAction, default=None,
                      help="write config, generation config and tokenizer but no weights, for --load-format dummy "
                           "(default: on for qwen2.5-0.5b, off for the small presets)")

    draft = sub.add_parser("make-draft-model", help="write a speculative-decoding draft of a model folder")
    draft.add_argument("target_dir")
    draft.add_argument("out_dir")
    draft.add_argument("--num-layers", type=int, default=1, help="keep the target's first N layers (default 1)")
    draft.add_argument("--copy", action="store_true", help="a full copy of the target (accepts every proposal)")

    args = parser.parse_args(argv)
    if args.command == "make-draft-model":
        from bowline_runtime.tools.tiny_model import build_draft_model

        path = build_draft_model(args.target_dir, args.out_dir, num_layers=None if args.copy else args.num_layers)
        print(f"wrote a draft of {args.target_dir} to {path}")
        return
    if args.command == "make-tiny-model":
        from bowline_runtime.tools.tiny_model import build_tiny_model

        if args.vision:
            from bowline_runtime.tools.tiny_llava import build_tiny_llava

            path = build_tiny_llava(args.out_dir, preset=args.preset, arch=args.arch, seed=args.seed)
        elif args.copying:
            from bowline_runtime.tools.copying_model import build_copying_model

            try:
                path = build_copying_model(args.out_dir, preset=args.preset, seed=args.seed)
            except ValueError as exc:
                parser.error(str(exc))
        else:
            path = build_tiny_model(args.out_dir, preset=args.preset, arch=args.arch, seed=args.seed,
                                    config_only=args.config_only, quantization=args.quantization)
        weights = "no weights (serve with --load-format dummy)" if not any(path.glob("*.safetensors")) else "weights"
        print(f"wrote {args.preset} model to {path}: config, tokenizer, {weights}")
        return

    if args.command == "generate":
        try:
            sys.exit(batch_cli.run(args))
        except (ValueError, OSError) as exc:
            parser.error(str(exc))

    try:
        config = config_from_args(args)
        _check_parser_names(config)
    except ValueError as exc:
        parser.error(str(exc))
    if config.node_rank > 0:  # a worker node of a multi-node group: ranks only, the leader serves
        from bowline_runtime.engine.worker import run_worker_node

        sys.exit(run_worker_node(config))
    from bowline_runtime.api.server import run_server

    sys.exit(run_server(config))


def _check_parser_names(config) -> None:
    """Refuse an unknown --tool-call-parser / --reasoning-parser now, not at the first request."""
    from bowline_runtime.parsers import get_reasoning_parser, get_tool_parser

    if config.tool_call_parser:
        get_tool_parser(config.tool_call_parser)
    if config.reasoning_parser:
        get_reasoning_parser(config.reasoning_parser)


if __name__ == "__main__":
    main()
