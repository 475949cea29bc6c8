"""Image content parts on the API side (api/images.py, api/vision_prompts.py): limits, data URLs,
template content formats and placeholder runs."""

from __future__ import annotations

import asyncio
import base64
import io

import pytest
from bowline_runtime.api import images
from bowline_runtime.api.protocol import ChatMessage
from bowline_runtime.api.vision_prompts import content_format, placeholder_runs, template_messages
from bowline_runtime.config import parse_mm_limit
from bowline_runtime.engine.errors import RequestRejected


def test_limit_mm_per_prompt_reads_vllms_forms():
    assert parse_mm_limit('{"image": 2}') == 2
    assert parse_mm_limit("image=3") == 3
    assert parse_mm_limit(None) is None and parse_mm_limit("{}") is None
    for bad in ('{"image": -1}', '{"video": 1}', "image", '{"image": "two"}'):
        with pytest.raises(ValueError, match="--limit-mm-per-prompt"):
            parse_mm_limit(bad)


def test_the_image_fetch_timeout_reads_vllms_variable():
    from bowline_runtime.config import build_parser, config_from_args

    args = build_parser().parse_args(["--model", "m"])
    assert config_from_args(args, {"VLLM_IMAGE_FETCH_TIMEOUT": "7.5"}).image_fetch_timeout == 7.5
    both = {"VLLM_IMAGE_FETCH_TIMEOUT": "7.5", "BOWLINE_IMAGE_FETCH_TIMEOUT": "2"}
    assert config_from_args(args, both).image_fetch_timeout == 2.0
    flag = build_parser().parse_args(["--model", "m", "--image-fetch-timeout", "3"])
    assert config_from_args(flag, both).image_fetch_timeout == 3.0


def test_count_limit():
    images.check_count(2, 2)
    images.check_count(5, None)
    with pytest.raises(RequestRejected, match="at most 2 image"):
        images.check_count(3, 2)


def test_data_urls_decode_and_refuse_clearly():
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (5, 4), (1, 2, 3)).save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    [data] = asyncio.run(images.load_image_bytes([url], timeout=1, max_bytes=10_000))
    assert images.decode_image(data, 0).size == (5, 4)
    with pytest.raises(RequestRejected, match="base64"):
        asyncio.run(images.load_image_bytes(["data:image/png,rawtext"], timeout=1, max_bytes=10_000))
    with pytest.raises(RequestRejected, match="too large"):
        asyncio.run(images.load_image_bytes([url], timeout=1, max_bytes=10))
    with pytest.raises(RequestRejected, match="image 1 could not be decoded"):
        images.decode_image(b"GIF89a-but-not-really", 1)


def test_template_content_format_is_detected_from_the_source():
    from bowline_runtime.tools.tiny_llava import LLAVA_CHAT_TEMPLATE
    from bowline_runtime.tools.tiny_model import CHAT_TEMPLATE

    assert content_format(LLAVA_CHAT_TEMPLATE) == "openai"
    assert content_format("{% for item in message['content'] %}{{ item.text }}{% endfor %}") == "openai"
    assert content_format(CHAT_TEMPLATE) == "string"


def test_string_templates_get_one_placeholder_line_per_image():
    msg = ChatMessage(role="user", content=[
        {"type": "text", "text": "Compare"}, {"type": "image_url", "image_url": {"url": "data:a"}},
        {"type": "image_url", "image_url": {"url": "data:b"}},
    ])
    assert template_messages([msg], "string", "<image>")[0]["content"] == "<image>\n<image>\nCompare"
    parts = template_messages([msg], "openai", "<image>")[0]["content"]
    assert parts == [{"type": "text", "text": "Compare"}, {"type": "image"}, {"type": "image"}]
    assert msg.text() == "Compare"  # image parts add no text


def test_adjacent_images_split_into_equal_runs():
    ids = [1, 9, 9, 9, 9, 2, 9, 9, 3]
    assert placeholder_runs(ids[:6], 9, 2) == [(1, 2), (3, 2)]
    assert placeholder_runs(ids, 9, 3) == [(1, 2), (3, 2), (6, 2)]
    with pytest.raises(RequestRejected, match="image tokens"):
        placeholder_runs(ids, 9, 4)


def test_a_string_template_prompt_is_what_the_processor_builds(tiny_llava_dir):
    """vLLM's template_llava.jinja style: content as one string, the placeholder before the text."""
    from bowline_runtime.api.protocol import ChatCompletionRequest
    from bowline_runtime.api.vision_prompts import build_prompt, load_processor
    from PIL import Image

    processor = load_processor(str(tiny_llava_dir), False)
    template = "{% for m in messages %}USER: {{ m['content'] }}\n{% endfor %}ASSISTANT:"
    picture = Image.new("RGB", (30, 20), (9, 99, 199))
    parts = [{"type": "text", "text": "Hi"}, {"type": "image_url", "image_url": {"url": "data:,"}}]
    req = ChatCompletionRequest(messages=[{"role": "user", "content": parts}])
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    ids, [image] = build_prompt(req, processor.tokenizer, processor, template, [picture], image_id)
    want = processor(text=["USER: <image>\nHi\nASSISTANT:"], images=[picture], return_tensors="pt")
    assert ids == want["input_ids"][0].tolist()
    assert (image.offset, image.length) == (ids.index(image_id), 16)
