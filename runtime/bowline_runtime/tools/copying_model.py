"""A model that continues its prompt by copying it: hand-set weights, no training, a real Llama checkpoint.

Why: n-gram prompt lookup only pays where the model repeats text from its context, and random weights
never do (0 % of proposals accepted), so a benchmark of it on random weights measures nothing. Trained
models copy through *induction heads* (Olsson et al., 2022): one head copies each position's previous
token into the position; a later head looks for the earlier position whose previous token is the
current one and outputs the token found there. This module writes those two heads as weights, in a
model of a preset's shapes (so every product costs what the random model's does), and zeroes the
rest: greedy decoding then continues a prompt "... A B C ... A" with "B C ...", as a model asked to
repeat text does.

The residual stream (hidden size H >= 225) holds, per position:
    C  [0]           1: a constant, for position-only attention
    E  [1, 49)       a random unit code of the token, for matching (48 dims)
    U  [49, 113)     a random unit code of the token, for output (64 dims)
    P  [113, 161)    the previous token's E, written by layer 0
    O  [161, 225)    the U found by layer 1's match, which the LM head reads
Every norm weight is the norm's constant scale (each block's input has the same length at every
position), so the norms pass the stream on unchanged.

Layer 0, head 0: queries and keys from C only, on the rotary embedding's six fastest pairs; the query
is turned back by one position, so the score is A * sum_i cos((t - j - 1) * theta_i): largest at
j = t - 1 for every distance up to the context length (margin 0.57 A at the neighbours). Its values
are E, its output goes to P. Layer 1, head 0: queries from E, keys from P, on the 24 slowest pairs
(a large rope_theta turns them by at most ~0.5 rad over 500 positions), so a key whose P is the
current token's E scores B, any other at most about a third of that; values U, output to O. The LM
head scores every token's U against O. Other heads, all MLPs and all other layers are zero.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

ROPE_THETA = 1e12
_C, _E, _U, _P, _O = 0, slice(1, 49), slice(49, 113), slice(113, 161), slice(161, 225)
MIN_HIDDEN = 225
HEAD_DIM = 64
_POSITION_PAIRS = range(6)  # the fastest rotary pairs: position-only attention
_CONTENT_PAIRS = range(8, 32)  # the slowest: content matching, nearly unturned
_A = 360.0  # previous-token head: scores margin 0.57 * A / sqrt(64) ~ 25 over the neighbours
_B = 240.0  # matching head: ~0.7 * B / sqrt(64) ~ 21 over the next best context token
_LOGIT_SCALE = 4.0


def _unit_rows(n: int, dim: int, gen: torch.Generator) -> torch.Tensor:
    rows = torch.randn(n, dim, generator=gen)
    return rows / rows.norm(dim=1, keepdim=True)


def _content_dims() -> list[int]:
    """The head dimensions of the slow rotary pairs: each pair is dimension i and i + 32 (rotate-half form)."""
    return list(_CONTENT_PAIRS) + [i + HEAD_DIM // 2 for i in _CONTENT_PAIRS]


def fits(hidden: int, head_dim: int, layers: int) -> bool:
    """Whether shapes hold the circuit: the stream's five parts, the heads' rotary pairs, two layers."""
    return hidden >= MIN_HIDDEN and head_dim == HEAD_DIM and layers >= 2


def copying_state_dict(config, seed: int = 0) -> dict[str, torch.Tensor]:
    """The weights (transformers' Llama names) of an induction-copying model of `config`'s shapes."""
    hidden, vocab, layers = config.hidden_size, config.vocab_size, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    if not fits(hidden, head_dim, layers):
        raise ValueError(f"a copying model needs hidden size >= {MIN_HIDDEN}, head size {HEAD_DIM} and 2 layers or "
                         f"more, not {hidden}, {head_dim} and {layers}")
    theta = [ROPE_THETA ** (-2 * i / head_dim) for i in range(head_dim // 2)]
    gen = torch.Generator().manual_seed(seed)
    codes_e, codes_u = _unit_rows(vocab, 48, gen), _unit_rows(vocab, 64, gen)
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    inter = config.intermediate_size
    state: dict[str, torch.Tensor] = {}

    embed = torch.zeros(vocab, hidden)
    embed[:, _C] = 1.0
    embed[:, _E] = codes_e
    embed[:, _U] = codes_u
    state["model.embed_tokens.weight"] = embed
    # A block's input is C, E, U (3 unit parts) at layer 0 and those and P at layer 1; the norm divides by
    # the root mean square, sqrt(parts / hidden), so a weight of that size gives the stream back. The
    # MLPs and the later layers are zero, so their norms do not matter.
    for index in range(layers):
        p = f"model.layers.{index}."
        parts = 3 if index == 0 else 4
        state[p + "input_layernorm.weight"] = torch.full((hidden,), math.sqrt(parts / hidden))
        state[p + "post_attention_layernorm.weight"] = torch.ones(hidden)
        q = torch.zeros(heads * head_dim, hidden)
        k = torch.zeros(kv_heads * head_dim, hidden)
        v = torch.zeros(kv_heads * head_dim, hidden)
        o = torch.zeros(hidden, heads * head_dim)
        if index == 0:  # head 0 attends to the previous position and copies its E into P
            for i in _POSITION_PAIRS:
                q[i, _C], q[i + head_dim // 2, _C] = _A * math.cos(theta[i]), -_A * math.sin(theta[i])
                k[i, _C] = 1.0
            v[:48, _E] = torch.eye(48)
            o[_P, :48] = torch.eye(48)
        elif index == 1:  # head 0 finds the position whose previous token is this one and copies its U into O
            dims = _content_dims()
            q[dims, _E] = _B * torch.eye(48)
            k[dims, _P] = torch.eye(48)
            v[:64, _U] = torch.eye(64)
            o[_O, :64] = torch.eye(64)
        state[p + "self_attn.q_proj.weight"] = q
        state[p + "self_attn.k_proj.weight"] = k
        state[p + "self_attn.v_proj.weight"] = v
        state[p + "self_attn.o_proj.weight"] = o
        state[p + "mlp.gate_proj.weight"] = torch.zeros(inter, hidden)
        state[p + "mlp.up_proj.weight"] = torch.zeros(inter, hidden)
        state[p + "mlp.down_proj.weight"] = torch.zeros(hidden, inter)
    state["model.norm.weight"] = torch.ones(hidden)
    head = torch.zeros(vocab, hidden)
    head[:, _O] = _LOGIT_SCALE * codes_u
    state["lm_head.weight"] = head
    return state


def build_copying_model(out_dir: str | Path, preset: str = "bench", seed: int = 0) -> Path:
    """A model folder of `preset`'s shapes and tokenizer whose greedy output copies its prompt (see above)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from bowline_runtime.tools.tiny_model import build_tiny_model

    out = build_tiny_model(out_dir, preset=preset, arch="llama", seed=seed, config_only=True)
    config = AutoConfig.from_pretrained(out)
    config.tie_word_embeddings = False
    rope = dict(getattr(config, "rope_parameters", None) or {"rope_type": "default"})
    rope["rope_theta"] = ROPE_THETA
    config.rope_parameters = rope
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(copying_state_dict(config, seed), strict=False)
    if unexpected or [name for name in missing if "rotary" not in name]:
        raise RuntimeError(f"copying weights do not fit the model: missing {missing}, unexpected {unexpected}")
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    return out
