"""Guided decoding (JSON Schema, regex, choice, grammar, structural tags) and reasoning budgets.

The engine calls `compile_constraint(params, tokenizer, vocab_size)` once per request and gets a
factory of per-sequence `LogitsConstraint`s (or None). Grammar engine: llguidance (see backend.py
for why). Guided JSON is compact by default: json.dumps' layout and no free whitespace.
"""

from bowline_runtime.guided.compile import cache_info, compile_constraint
from bowline_runtime.guided.constraints import GrammarConstraint, ReasoningConstraint

__all__ = ["GrammarConstraint", "ReasoningConstraint", "cache_info", "compile_constraint"]
