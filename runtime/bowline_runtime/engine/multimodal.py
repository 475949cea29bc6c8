"""Images inside a prompt, as the engine sees them: where their placeholder tokens sit, what to encode.

A vision-language prompt carries, per image, a run of placeholder tokens (the processor expanded
each `<image>` into as many as the vision tower yields features) and the image's pixel values. The
language model runs through the same paged attention as text; only its input embeddings differ:
at the placeholder rows, the image's projected features replace the token embeddings. These
functions are pure: `plan_images` says, for one step's packed batch, which images to encode and
where their features go (a prefill chunk may hold part of an image: only the rows it holds), and
`image_salt` is what the prefix cache adds to the hash of a block holding placeholder tokens, so
two prompts with the same text and different images never share KV blocks.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from typing import Any

import torch

from bowline_runtime.engine.errors import RequestRejected


@dataclass(slots=True, frozen=True)
class ImageInput:
    """One image of a prompt: its placeholder run and the pixel values its processor made."""

    offset: int  # prompt position of its first placeholder token
    length: int  # placeholder tokens = feature rows the vision tower yields for it
    hash: int  # of the pixel values: the prefix-cache salt and the encoder cache key
    pixel_values: torch.Tensor  # [C, H, W] as the model's own processor built it


def pixel_hash(pixel_values: torch.Tensor) -> int:
    """A 63-bit digest of the pixels and their shape: equal inputs to the vision tower, equal key."""
    data = pixel_values.detach().contiguous().cpu()
    digest = hashlib.blake2b(str(tuple(data.shape)).encode(), digest_size=8)
    digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())  # raw bytes, any dtype
    return int.from_bytes(digest.digest(), "big") >> 1


@dataclass(slots=True)
class ImageBatch:
    """A step's images: each distinct image once (by hash), and where its features land."""

    hashes: list[int]
    pixel_values: list[torch.Tensor]  # [C, H, W] each, in `hashes` order
    # (first packed row, index into hashes, first feature row, rows): feature rows -> packed rows
    placements: list[tuple[int, int, int, int]]


def plan_images(seqs: Seq[Any], num_tokens: Seq[int]) -> ImageBatch | None:
    """The images overlapping this step's tokens, or None when none do (every text-only step).

    Sequences are packed in order, `num_tokens[i]` rows each from their `num_computed_tokens`, as
    model_runner.prepare_step packs them; a sequence's rows [start, end) take the features of every
    image run they overlap. Decode rows hold sampled tokens, never placeholders.
    """
    hashes: list[int] = []
    pixels: list[torch.Tensor] = []
    index: dict[int, int] = {}
    placements: list[tuple[int, int, int, int]] = []
    cursor = 0
    for seq, n in zip(seqs, num_tokens, strict=True):
        start = seq.num_computed_tokens
        end = start + n
        for image in getattr(seq, "images", ()):
            lo, hi = max(start, image.offset), min(end, image.offset + image.length)
            if lo >= hi:
                continue
            if image.hash not in index:
                index[image.hash] = len(hashes)
                hashes.append(image.hash)
                pixels.append(image.pixel_values)
            placements.append((cursor + lo - start, index[image.hash], lo - image.offset, hi - lo))
        cursor += n
    return ImageBatch(hashes, pixels, placements) if placements else None


def image_salt(images: Seq[ImageInput], start: int, end: int) -> tuple[int, ...]:
    """The hashes of the images whose placeholders fall in token positions [start, end)."""
    return tuple(im.hash for im in images if im.offset < end and im.offset + im.length > start)


def check_images(images: Seq[ImageInput], prompt_token_ids: Seq[int], image_token_id: int | None, param: str) -> None:
    """Refuse images the engine cannot place: a text-only model, or runs that are not placeholders."""
    if not images:
        return
    if image_token_id is None:
        raise RequestRejected("this model is text-only: it does not accept image inputs", param)
    for image in images:
        run = prompt_token_ids[image.offset : image.offset + image.length]
        if image.length < 1 or len(run) != image.length or any(t != image_token_id for t in run):
            raise RequestRejected("an image's placeholder tokens do not match the prompt", param)


def check_no_beam_images(params: Any, images: Seq[ImageInput] | None) -> None:
    """Beam search re-submits its prompt as text-only sub-requests: it cannot carry images."""
    if images and getattr(params, "use_beam_search", False):
        raise RequestRejected("beam search is not supported with image inputs", "use_beam_search")
