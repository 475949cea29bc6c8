"""Build a small llava folder (LlavaForConditionalGeneration) with seeded random weights, for tests and benchmarks.

A random CLIP vision tower and projector in front of the same tiny language model `tiny_model`
builds, with what a real llava-1.5-hf checkpoint carries besides: a processor config
(LlavaProcessor: a CLIP image processor, patch size, feature-select strategy) and a chat template
that writes the `<image>` token where a message has an image part. Same preset and seed, same files.

The placeholder count per image follows the processor: (image_size / patch_size)^2 patches, plus
the CLS token, minus the CLS token again for the "default" feature-select strategy; 16 for
`tiny` (32-pixel images, 8-pixel patches), 576 for `bench` (336 and 14, as llava-1.5).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bowline_runtime.tools.tiny_model import PRESETS, _embed_chat_template, build_config, train_tokenizer

IMAGE_TOKEN = "<image>"

# ChatML (the tiny model's template) with content parts: `{"type": "image"}` writes the image token.
LLAVA_CHAT_TEMPLATE = """\
{%- for message in messages %}
{{- '<|im_start|>' + message.role + '\\n' }}
{%- if message.content is string %}{{- message.content }}
{%- else %}
{%- for part in message.content %}
{%- if part.type == 'image' %}{{- '<image>' }}{%- elif part.type == 'text' %}{{- part.text }}{%- endif %}
{%- endfor %}
{%- endif %}
{{- '<|im_end|>\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}
"""


@dataclass(frozen=True, slots=True)
class VisionShape:
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    image_size: int
    patch_size: int

    @property
    def num_image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2


VISION_SHAPES = {
    "tiny": VisionShape(32, 2, 4, 64, 32, 8),
    "bench": VisionShape(256, 4, 4, 1024, 336, 14),
}


def _image_processor(size: int):
    """A CLIP image processor at `size`: Pillow's backend where transformers has one (no torchvision needed)."""
    import transformers

    processor_class = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor  # >= 5: Pil
    return processor_class(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


def build_tiny_llava(out_dir: str | Path, preset: str = "tiny", arch: str | None = None, seed: int = 0) -> Path:
    """Write a llava model folder (weights, config, processor, tokenizer, chat template) to `out_dir`."""
    import torch
    from transformers import (
        CLIPVisionConfig,
        GenerationConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}: choose one of {sorted(PRESETS)}")
    shape = PRESETS[preset]
    vision = VISION_SHAPES.get(preset, VISION_SHAPES["bench"])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = train_tokenizer(shape, seed, extra_special_tokens=(IMAGE_TOKEN,))
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    eos_ids = [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")]
    pad_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    text_config = build_config(shape, arch or shape.arch, shape.vocab_size, eos_ids, pad_id)
    vision_config = CLIPVisionConfig(
        hidden_size=vision.hidden_size, intermediate_size=vision.intermediate_size,
        num_hidden_layers=vision.num_layers, num_attention_heads=vision.num_heads,
        image_size=vision.image_size, patch_size=vision.patch_size, projection_dim=vision.hidden_size,
    )
    config = LlavaConfig(
        vision_config=vision_config, text_config=text_config, image_token_index=image_token_id,
        vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu",
        image_seq_length=vision.num_image_tokens, tie_word_embeddings=shape.tie_word_embeddings,
    )
    config.dtype = torch.float32
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    model.save_pretrained(out, safe_serialization=True)
    GenerationConfig(bos_token_id=pad_id, eos_token_id=eos_ids, pad_token_id=pad_id).save_pretrained(out)

    processor = LlavaProcessor(
        image_processor=_image_processor(vision.image_size), tokenizer=tokenizer, patch_size=vision.patch_size,
        vision_feature_select_strategy="default", num_additional_image_tokens=1, chat_template=LLAVA_CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
    )
    processor.save_pretrained(out)
    tokenizer.save_pretrained(out)
    _embed_chat_template(out, LLAVA_CHAT_TEMPLATE, keep_file=True)
    return out
