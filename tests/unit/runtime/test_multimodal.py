"""Images in the engine (engine/multimodal.py, models/vision.py): which rows take which features in a
step, prefix-cache salts, and the vision encoder batching a step's images into one tower call."""

from __future__ import annotations

import pytest
import torch
from bowline_runtime.engine.block_manager import BlockManager
from bowline_runtime.engine.errors import RequestRejected
from bowline_runtime.engine.multimodal import ImageInput, check_images, image_salt, pixel_hash, plan_images
from bowline_runtime.engine.sampling_params import SamplingParams
from bowline_runtime.engine.sequence import Sequence

IMG = 7  # the placeholder token id


def image(offset: int, length: int, seed: int) -> ImageInput:
    pixels = torch.randn(3, 4, 4, generator=torch.Generator().manual_seed(seed))
    return ImageInput(offset, length, pixel_hash(pixels), pixels)


def seq_with(images: list[ImageInput], num_tokens: int, seq_id: int = 0, computed: int = 0) -> Sequence:
    ids = [1] * num_tokens
    for im in images:
        ids[im.offset : im.offset + im.length] = [IMG] * im.length
    seq = Sequence(seq_id, f"r{seq_id}", 0, ids, num_tokens, SamplingParams())
    seq.images = tuple(images)
    seq.num_computed_tokens = computed
    return seq


def test_pixel_hash_tells_images_apart_and_equal_pixels_alike():
    a = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(0))
    assert pixel_hash(a) == pixel_hash(a.clone())
    b = a.clone()
    b[0, 0, 0] += 1e-3
    assert pixel_hash(a) != pixel_hash(b)
    assert pixel_hash(a) != pixel_hash(a.reshape(3, 4, 16))  # same values, another shape


def test_plan_places_each_images_rows_in_the_packed_batch():
    a, b = image(2, 4, 0), image(1, 3, 1)
    text = seq_with([], 5, seq_id=0)
    s1, s2 = seq_with([a], 10, seq_id=1), seq_with([b], 6, seq_id=2)
    plan = plan_images([text, s1, s2], [5, 10, 6])
    assert plan is not None and plan.hashes == [a.hash, b.hash]
    # s1's rows start at 5, its image at prompt position 2; s2's rows start at 15, its image at 1.
    assert plan.placements == [(7, 0, 0, 4), (16, 1, 0, 3)]


def test_a_chunk_holding_part_of_an_image_takes_only_those_feature_rows():
    a = image(4, 8, 0)
    first = seq_with([a], 20, computed=0)
    assert plan_images([first], [6]).placements == [(4, 0, 0, 2)]  # rows 4, 5: features 0, 1
    rest = seq_with([a], 20, computed=6)
    assert plan_images([rest], [14]).placements == [(0, 0, 2, 6)]  # features 2..7 at the chunk's start
    after = seq_with([a], 20, computed=12)
    assert plan_images([after], [8]) is None  # the image is behind this chunk


def test_the_same_image_in_two_sequences_is_encoded_once():
    a = image(0, 3, 0)
    plan = plan_images([seq_with([a], 5, 0), seq_with([a], 5, 1)], [5, 5])
    assert plan.hashes == [a.hash] and [p[1] for p in plan.placements] == [0, 0]


def test_text_only_steps_carry_no_images():
    assert plan_images([seq_with([], 8)], [8]) is None


def test_image_salt_names_the_images_a_block_holds():
    a, b = image(2, 4, 0), image(9, 2, 1)
    images = [a, b]
    assert image_salt(images, 0, 4) == (a.hash,)
    assert image_salt(images, 4, 8) == (a.hash,)
    assert image_salt(images, 8, 12) == (b.hash,)
    assert image_salt(images, 12, 16) == ()


def test_prefix_blocks_are_shared_for_the_same_image_only():
    bm = BlockManager(num_blocks=32, block_size=4, enable_prefix_caching=True)
    first = seq_with([image(2, 4, 0)], 13, seq_id=0)
    bm.allocate(first)
    first.num_computed_tokens = first.num_tokens
    bm.register_full_blocks(first)
    same = seq_with([image(2, 4, 0)], 13, seq_id=1)
    other = seq_with([image(2, 4, 5)], 13, seq_id=2)  # same token ids, other pixels
    bm.allocate(same)
    bm.allocate(other)
    assert same.num_cached_tokens == 12
    assert other.num_cached_tokens == 0  # block 0 holds the image: it and every later block differ


def test_text_blocks_hash_as_before():
    from bowline_runtime.engine.block_manager import block_hash

    assert block_hash(None, [1, 2, 3]) == hash((None, (1, 2, 3)))


def test_check_images_refuses_a_text_model_and_misplaced_runs():
    a = image(1, 2, 0)
    with pytest.raises(RequestRejected, match="text-only"):
        check_images([a], [1, IMG, IMG, 1], None, "messages")
    with pytest.raises(RequestRejected, match="placeholder"):
        check_images([a], [1, IMG, 1, 1], IMG, "messages")
    check_images([a], [1, IMG, IMG, 1], IMG, "messages")
    check_images([], [1, 2], None, "messages")


def test_the_vision_encoder_runs_once_per_step_and_reuses_features(tiny_llava_dir):
    from bowline_runtime.engine.multimodal import ImageBatch
    from bowline_runtime.models.vision import VisionEncoder
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(tiny_llava_dir).eval()
    encoder = VisionEncoder.of(model)
    assert encoder is not None
    size = model.config.vision_config.image_size
    pixels = [torch.randn(3, size, size, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    hashes = [pixel_hash(p) for p in pixels]
    ids = torch.full((40,), model.config.image_token_id)
    batch = ImageBatch(hashes, pixels, [(0, 0, 0, 16), (16, 1, 0, 16), (32, 2, 8, 8)])
    with torch.inference_mode():
        embeds = encoder.embed(ids, batch)
        want = model.model.get_image_features(pixel_values=torch.stack(pixels)).pooler_output
    assert encoder.num_tower_calls == 1 and encoder.num_encoded == 3
    torch.testing.assert_close(embeds[:16], want[0])
    torch.testing.assert_close(embeds[16:32], want[1])
    torch.testing.assert_close(embeds[32:40], want[2][8:16])
    with torch.inference_mode():
        encoder.embed(ids[:16], ImageBatch(hashes[:1], pixels[:1], [(0, 0, 0, 16)]))
    assert encoder.num_tower_calls == 1  # the same image again: from the feature cache
