"""Build small Hugging Face causal-LM folders with seeded random weights and a locally trained tokenizer.

No model hub is reachable where Bowline is developed and tested, so every test and benchmark model is
made here: a Llama- or Qwen2-architecture model with random weights and a byte-level BPE tokenizer
trained with `tokenizers` on text this module generates. Same preset and seed, same files.

A preset with a real model's shapes (`qwen2.5-0.5b`) is written config-only by default: config.json,
generation_config.json and the tokenizer, no weights. Half a billion random float32 weights would be
2 GB of disk for nothing, since such a folder is served with `--load-format dummy` (random weights
drawn from config.json at load time), which is how the GPU benchmarks run at real shapes.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<think>",
    "</think>",
    "<tool_call>",
    "</tool_call>",
]

# ChatML, as Qwen2.5/Qwen3 use it: tools are listed in the system turn and calls come back as
# <tool_call>{json}</tool_call>; `enable_thinking=false` pre-fills an empty reasoning block.
CHAT_TEMPLATE = """\
{%- if tools %}
{{- '<|im_start|>system\\n' }}
{%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}
{{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n<tools>' }}
{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}
{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\\n</tool_call><|im_end|>\\n' }}
{%- elif messages[0].role == 'system' %}
{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
{%- if message.role == 'user' or (message.role == 'assistant' and not message.tool_calls) %}
{{- '<|im_start|>' + message.role + '\\n' + (message.content or '') + '<|im_end|>\\n' }}
{%- elif message.role == 'assistant' %}
{{- '<|im_start|>assistant' }}
{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}
{%- for tool_call in message.tool_calls %}
{%- set fn = tool_call.function if tool_call.function is defined else tool_call %}
{{- '\\n<tool_call>\\n{\"name\": \"' + fn.name + '\", \"arguments\": ' }}
{%- if fn.arguments is string %}{{- fn.arguments }}{%- else %}{{- fn.arguments | tojson }}{%- endif %}
{{- '}\\n</tool_call>' }}
{%- endfor %}
{{- '<|im_end|>\\n' }}
{%- elif message.role == 'tool' %}
{{- '<|im_start|>user\\n<tool_response>\\n' + (message.content or '') + '\\n</tool_response><|im_end|>\\n' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
{{- '<|im_start|>assistant\\n' }}
{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}
{%- endif %}
"""


@dataclass(frozen=True, slots=True)
class Preset:
    """A model shape. `bench` is the shape the CPU performance anchors were measured on.

    `tokenizer_vocab_size` lets the config's vocabulary be wider than the tokenizer: BPE merges learnt
    from the generated corpus run out long before a real 152k vocabulary, and the shapes (the embedding
    and the LM head) are what a benchmark needs. The engine samples only over real tokenizer ids.
    """

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int
    corpus_words: int
    tokenizer_vocab_size: int | None = None  # None: the same as vocab_size
    arch: str = "llama"  # the architecture when the caller does not choose one
    rope_theta: float | None = None  # None: the architecture's default
    tie_word_embeddings: bool = False
    config_only: bool = False  # write no weights unless asked (for `--load-format dummy`)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def tokenizer_vocab(self) -> int:
        return self.tokenizer_vocab_size or self.vocab_size


PRESETS: dict[str, Preset] = {
    "tiny": Preset(64, 2, 4, 2, 128, 2048, 2048, 20_000),
    "bench": Preset(512, 8, 8, 4, 1536, 16000, 4096, 400_000),
    # The smallest shape with head size 64 (what tools.copying_model needs): tests of a copying model.
    "small": Preset(256, 2, 4, 2, 512, 2048, 2048, 20_000),
    # Qwen2.5-0.5B's shapes (its config.json): the GPU benchmark's model, served with dummy weights.
    "qwen2.5-0.5b": Preset(
        896, 24, 14, 2, 4864, 151936, 32768, 400_000,
        tokenizer_vocab_size=16000, arch="qwen2", rope_theta=1000000.0, tie_word_embeddings=True, config_only=True,
    ),
}

# What save_pretrained would record; a config-only folder has no model object to take it from.
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}

_EN_WORDS = (
    "the model serves tokens on a cluster of nodes and every request streams text back to the client "
    "kubernetes operator deployment service pod replica scale ready health metrics latency throughput "
    "hello world how are you today please write a short story about a boat a rope and a knot "
    "json schema object array string number true false null name value key list function call tool "
    "one two three four five six seven eight nine ten first second third answer question think"
).split()
_ZH_TEXT = (
    "你好世界今天天气很好我们在集群上部署大语言模型服务每个请求都会流式返回文本"
    "请写一个关于船绳子和结的小故事模型推理服务需要高吞吐低延迟和稳定的可用性"
    "中文和英文都可以被正确地切分为词元不会出现未知字符北京上海广州深圳杭州"
    "人工智能机器学习深度学习自然语言处理张量并行连续批处理键值缓存注意力机制"
)
_SYLLABLES = [c + v for c in "bcdfghjklmnprstvwz" for v in ("a", "e", "i", "o", "u", "ai", "ou", "an")]
_PUNCT = [" ", " ", " ", " ", ", ", ". ", "? ", "! ", "\n", ": ", "; ", " (", ") ", " \"", "\" ", " {", "} "]


def generate_corpus(num_words: int, seed: int) -> list[str]:
    """Deterministic mixed English/Chinese/pseudo-word text, rich enough to learn `vocab_size` merges."""
    rng = random.Random(seed)
    lines: list[str] = []
    line: list[str] = []
    for i in range(num_words):
        kind = rng.random()
        if kind < 0.45:
            word = rng.choice(_EN_WORDS)
        elif kind < 0.7:
            start = rng.randrange(len(_ZH_TEXT) - 4)
            word = _ZH_TEXT[start : start + rng.randint(1, 4)]
        elif kind < 0.95:
            word = "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 4)))
        else:
            word = str(rng.randint(0, 10_000))
        if rng.random() < 0.1:
            word = word.capitalize()
        line.append(word + rng.choice(_PUNCT))
        if len(line) >= 16 or i == num_words - 1:
            lines.append("".join(line))
            line = []
    return lines


def train_tokenizer(preset: Preset, seed: int, extra_special_tokens: tuple[str, ...] = ()):
    """Train a byte-level BPE tokenizer: every byte is in the alphabet, so no text is ever unknown.
    `extra_special_tokens` (a vision model's `<image>`) get ids inside the vocabulary, after the others."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=preset.tokenizer_vocab,
        special_tokens=SPECIAL_TOKENS + list(extra_special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(generate_corpus(preset.corpus_words, seed), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=preset.max_position_embeddings,
    )


def build_config(preset: Preset, arch: str, vocab_size: int, eos_ids: list[int], pad_id: int):
    from transformers import LlamaConfig, Qwen2Config

    common = dict(
        vocab_size=vocab_size,
        hidden_size=preset.hidden_size,
        intermediate_size=preset.intermediate_size,
        num_hidden_layers=preset.num_layers,
        num_attention_heads=preset.num_heads,
        num_key_value_heads=preset.num_kv_heads,
        max_position_embeddings=preset.max_position_embeddings,
        rms_norm_eps=1e-6,
        tie_word_embeddings=preset.tie_word_embeddings,
        bos_token_id=pad_id,
        eos_token_id=eos_ids,
        pad_token_id=pad_id,
        # Wider than the usual 0.02 so random logits are well separated: greedy comparisons between
        # implementations then rarely meet near-ties.
        initializer_range=0.1,
    )
    if preset.rope_theta is not None:
        common["rope_theta"] = preset.rope_theta
    if arch == "llama":
        return LlamaConfig(**common, attention_bias=False)
    if arch == "qwen2":
        return Qwen2Config(**common, use_sliding_window=False)
    raise ValueError(f"unknown architecture {arch!r}: choose llama or qwen2")


def build_tiny_model(
    out_dir: str | Path, preset: str = "tiny", arch: str | None = None, seed: int = 0, config_only: bool | None = None,
    quantization: str | None = None, group_size: int | None = None,
) -> Path:
    """Write a Hugging Face model folder to `out_dir` and return its path.

    `arch` None takes the preset's architecture; `config_only` None takes the preset's choice (True
    for real-size presets): then no weights are written, only config, generation config and tokenizer.
    `quantization` "awq" or "w8a8" writes the same random model quantized, in the AutoAWQ or the
    compressed-tensors int8 layout (tools.quantized_checkpoint); `group_size` is AWQ's (default: 128
    where every layer's input splits into 2 x 128, else 32).
    """
    import torch
    from transformers import GenerationConfig

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}: choose one of {sorted(PRESETS)}")
    shape = PRESETS[preset]
    arch = arch or shape.arch
    config_only = shape.config_only if config_only is None else config_only
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = train_tokenizer(shape, seed)
    eos_ids = [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")]
    pad_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config = build_config(shape, arch, shape.vocab_size, eos_ids, pad_id)
    config.dtype = torch.float32

    if config_only:
        config.architectures = [_ARCHITECTURES[arch]]
        config.save_pretrained(out)
    else:
        _save_random_weights(config, out, seed)
        if quantization:
            from bowline_runtime.tools.quantized_checkpoint import quantize_checkpoint

            quantize_checkpoint(out, quantization, group_size)
    GenerationConfig(bos_token_id=pad_id, eos_token_id=eos_ids, pad_token_id=pad_id).save_pretrained(out)

    tokenizer.save_pretrained(out)
    _embed_chat_template(out)
    return out


def _save_random_weights(config, out: Path, seed: int) -> None:
    """The model with seeded random float32 weights, saved with its config (safetensors)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.eval()
    model.save_pretrained(out, safe_serialization=True)


def _embed_chat_template(out: Path, template: str = CHAT_TEMPLATE, keep_file: bool = False) -> None:
    """Keep the chat template inside tokenizer_config.json, where every loader looks for it
    (`keep_file`: also in chat_template.jinja, where a processor reads it)."""
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = template
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    if keep_file:
        (out / "chat_template.jinja").write_text(template)
    else:
        (out / "chat_template.jinja").unlink(missing_ok=True)


def build_draft_model(target_dir: str | Path, out_dir: str | Path, num_layers: int | None = 1) -> Path:
    """A draft model for speculative decoding that shares `target_dir`'s tokenizer: the target's first
    `num_layers` decoder layers with its embedding, final norm and LM head (a truncated target agrees
    with it far more often than unrelated random weights would), or, with `num_layers` None, a full copy
    of the target (which accepts every proposal: the ceiling of the speed-up). A config-only target gives
    a config-only draft (serve both with --load-format dummy)."""
    import shutil

    from transformers import AutoConfig

    target, out = Path(target_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = AutoConfig.from_pretrained(target)
    if num_layers is not None:
        if not 1 <= num_layers <= config.num_hidden_layers:
            raise ValueError(f"a draft of {num_layers} layers: choose 1..{config.num_hidden_layers}")
    if not any(target.glob("*.safetensors")):
        if num_layers is not None:
            config.num_hidden_layers = num_layers
        config.save_pretrained(out)
    else:
        import torch
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32)
        if num_layers is not None:
            model.model.layers = model.model.layers[:num_layers]
            model.config.num_hidden_layers = num_layers
            if getattr(model.config, "layer_types", None):
                model.config.layer_types = model.config.layer_types[:num_layers]
        model.save_pretrained(out, safe_serialization=True)
    for path in target.iterdir():
        if path.is_file() and (path.name.startswith(("tokenizer", "special_tokens", "vocab", "merges"))
                               or path.name in ("generation_config.json", "chat_template.jinja")):
            shutil.copy2(path, out / path.name)
    return out
