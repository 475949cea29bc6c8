"""Vision-language models (llava): the language model as the engine runs it, and the vision encoder.

A llava checkpoint is a CLIP vision tower, a projector and a Llama/Qwen2 language model. The
language model is served exactly as a text model is (paged attention, continuous batching, the
packed decoder when its layers are plain Llama blocks): `language_model` hands the decoder a view
of the inner language model and the LM head. The vision tower and projector run through the
model's own `get_image_features` (feature layer, CLS handling and projector as its config says),
once per image and batched over a step's images; `VisionEncoder.embed` then writes the features
over the placeholder rows of the step's token embeddings, which the language model takes as its
input embeddings. Features are kept in a small LRU by image hash, so an image split across prefill
chunks, or sent again, is encoded once.

Only architectures whose prompt positions are plain 1-D positions and whose processor gives one
fixed-size placeholder run per image are accepted (`SUPPORTED_MODEL_TYPES`); Qwen2-VL's M-RoPE,
for one, would need positions of its own, so it is refused at load with a message instead of
serving wrong tokens.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
from torch import nn

from bowline_runtime.engine.multimodal import ImageBatch

SUPPORTED_MODEL_TYPES = frozenset({"llava"})
# Images whose features are kept: a 336-pixel llava-1.5 image is 576 x 4096 values (4.5 MiB in fp16).
FEATURE_CACHE_SIZE = 32


def is_vision_language(hf_config: Any) -> bool:
    """Whether the config is a vision-language composite (a vision section beside a text one)."""
    return getattr(hf_config, "vision_config", None) is not None and getattr(hf_config, "text_config", None) is not None


def image_token_id(hf_config: Any) -> int | None:
    """The placeholder token the processor repeats per image feature; None for a text-only model."""
    if not is_vision_language(hf_config):
        return None
    value = getattr(hf_config, "image_token_id", None)
    if value is None:
        value = getattr(hf_config, "image_token_index", None)
    return value if isinstance(value, int) else None


def check_supported(hf_config: Any) -> None:
    if is_vision_language(hf_config) and hf_config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"vision-language architecture {hf_config.model_type!r} is not supported yet "
            f"(supported: {', '.join(sorted(SUPPORTED_MODEL_TYPES))})"
        )


def model_class_and_attention(hf_config: Any, text_attention: str) -> tuple[Any, str | dict[str, str]]:
    """The transformers auto class to load with, and the attention implementation(s).

    Paged attention serves the language model only: the vision tower attends over an image's
    patches with no KV cache, so it keeps transformers' SDPA.
    """
    if not is_vision_language(hf_config):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM, text_attention
    check_supported(hf_config)
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText, {"": text_attention, "text_config": text_attention, "vision_config": "sdpa"}


class LanguageModelView(nn.Module):
    """A vision-language model's language part shaped like a causal LM (`config`, `model`, `lm_head`),
    for the packed decoder; its modules are the loaded model's own, not copies."""

    def __init__(self, vlm: Any) -> None:
        super().__init__()
        self.config = vlm.config.get_text_config()
        self.model = vlm.model.language_model
        self.lm_head = vlm.lm_head


def language_model(model: nn.Module) -> nn.Module:
    """What the packed decoder should run: the model itself, or a vision-language model's LM view."""
    return LanguageModelView(model) if is_vision_language(model.config) else model


class VisionEncoder:
    """Runs the vision tower + projector per image and merges the features into token embeddings."""

    def __init__(self, model: Any, cache_size: int = FEATURE_CACHE_SIZE) -> None:
        self.model = model  # a transformers vision-language model (typed Any: its sub-modules are dynamic)
        self.embed_tokens = model.get_input_embeddings()
        self.cache_size = cache_size
        self._features: OrderedDict[int, torch.Tensor] = OrderedDict()
        self.num_encoded = 0  # images run through the tower (not taken from the cache)
        self.num_tower_calls = 0  # batched tower calls

    @classmethod
    def of(cls, model: nn.Module) -> VisionEncoder | None:
        return cls(model) if is_vision_language(model.config) else None

    def _encode(self, pixel_values: list[torch.Tensor], device: torch.device, dtype: torch.dtype) -> list[torch.Tensor]:
        """Features [tokens, hidden] per image; one tower call per distinct image shape."""
        out: list[torch.Tensor | None] = [None] * len(pixel_values)
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, pv in enumerate(pixel_values):
            by_shape.setdefault(tuple(pv.shape), []).append(i)
        for indices in by_shape.values():
            batch = torch.stack([pixel_values[i] for i in indices]).to(device=device, dtype=dtype)
            result = self.model.model.get_image_features(pixel_values=batch)
            features = getattr(result, "pooler_output", result)  # transformers 5 wraps the list
            self.num_tower_calls += 1
            for i, feats in zip(indices, features, strict=True):
                out[i] = feats
        self.num_encoded += len(pixel_values)
        return [f for f in out if f is not None]

    def features(self, images: ImageBatch, device: torch.device, dtype: torch.dtype) -> list[torch.Tensor]:
        """Each of the batch's images' features, from the cache or from one batched encode."""
        missing = [i for i, h in enumerate(images.hashes) if h not in self._features]
        if missing:
            encoded = self._encode([images.pixel_values[i] for i in missing], device, dtype)
            for i, feats in zip(missing, encoded, strict=True):
                self._features[images.hashes[i]] = feats
        found = []
        for h in images.hashes:
            self._features.move_to_end(h)
            found.append(self._features[h])
        while len(self._features) > max(self.cache_size, len(images.hashes)):
            self._features.popitem(last=False)
        return found

    def embed(self, input_ids: torch.Tensor, images: ImageBatch) -> torch.Tensor:
        """Token embeddings [T, hidden] with the images' features over their placeholder rows."""
        embeds = self.embed_tokens(input_ids)
        features = self.features(images, embeds.device, embeds.dtype)
        for row, index, first, count in images.placements:
            feats = features[index]
            if first + count > feats.shape[0]:
                raise ValueError(f"an image yields {feats.shape[0]} features but its placeholder run is longer")
            embeds[row : row + count] = feats[first : first + count].to(embeds.dtype)
        return embeds
