"""Images in chat on the tiny llava through the real server and the official openai client: greedy
tokens equal transformers' generate() with the model's own processor, images batched across
concurrent requests, the prefix cache keyed by image, image URLs fetched (and refused) over HTTP."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from vision_helpers import FETCH_TIMEOUT_S, IMAGE_LIMIT, MAX_IMAGE_BYTES, SLOW_S, data_url, image_bytes

TEXT = "Describe the picture."
MAX_TOKENS = 16


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def chat(client, parts: list[dict], max_tokens: int = MAX_TOKENS, **extra):
    return client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": parts}], max_tokens=max_tokens, temperature=0,
        extra_body={"return_token_ids": True, "ignore_eos": True}, **extra,
    )


def tokens_of(reply) -> list[int]:
    return reply.choices[0].message.model_extra["completion_token_ids"]


def prompt_of(reply) -> list[int]:
    return reply.choices[0].message.model_extra["prompt_token_ids"]


def post_chat(server, parts: list[dict]) -> httpx.Response:
    body = {"model": "tiny", "messages": [{"role": "user", "content": parts}], "max_tokens": 4}
    return httpx.post(server.base_url + "/chat/completions", json=body, timeout=60)


def error_message(resp: httpx.Response) -> str:
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]
    assert err["type"] == "invalid_request_error" and "Traceback" not in err["message"]
    return err["message"]


def test_one_image_greedy_equals_transformers(vision_server, reference):
    image = image_bytes(1)
    reply = chat(vision_server.client(), [image_part(data_url(image)), {"type": "text", "text": TEXT}])
    want_prompt, want = reference.greedy([image], TEXT, MAX_TOKENS)
    assert prompt_of(reply) == want_prompt  # the processor's expansion: 16 image tokens for the tiny tower
    assert tokens_of(reply) == want
    assert reply.usage.prompt_tokens == len(want_prompt)


def test_two_images_in_one_prompt_equal_transformers(vision_server, reference):
    first, second = image_bytes(2, "JPEG"), image_bytes(3, "WEBP")
    parts = [image_part(data_url(first, "image/jpeg")), image_part(data_url(second, "image/webp")),
             {"type": "text", "text": TEXT}]
    reply = chat(vision_server.client(), parts)
    want_prompt, want = reference.greedy([first, second], TEXT, MAX_TOKENS)
    assert prompt_of(reply) == want_prompt
    assert tokens_of(reply) == want


def test_concurrent_requests_with_different_images_equal_one_at_a_time(vision_server):
    images = [image_bytes(10 + i) for i in range(8)]
    parts = [[image_part(data_url(im)), {"type": "text", "text": TEXT}] for im in images]
    client = vision_server.client()
    alone = [tokens_of(chat(client, p)) for p in parts]

    async def together():
        aclient = vision_server.async_client()
        replies = await asyncio.gather(*(
            aclient.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": p}], max_tokens=MAX_TOKENS, temperature=0,
                extra_body={"return_token_ids": True, "ignore_eos": True},
            )
            for p in parts
        ))
        await aclient.close()
        return [tokens_of(r) for r in replies]

    assert asyncio.run(together()) == alone
    # Same text, different image: the image reaches the model.
    assert len({tuple(t) for t in alone}) > 1
    assert alone[0] != alone[1]


def test_the_prefix_cache_is_keyed_by_the_image(vision_server):
    client = vision_server.client()
    image, other = image_bytes(30), image_bytes(31)
    text = "What colour is the boat in this picture, and what is the rope tied to?"
    cold = chat(client, [image_part(data_url(image)), {"type": "text", "text": text}])
    warm = chat(client, [image_part(data_url(image)), {"type": "text", "text": text}])
    assert cold.usage.prompt_tokens_details.cached_tokens == 0
    assert warm.usage.prompt_tokens_details.cached_tokens >= 16  # whole blocks of the prompt, image included
    assert tokens_of(warm) == tokens_of(cold)
    # Same text, other image: its placeholder block (and every block after it) hashes differently.
    changed = chat(client, [image_part(data_url(other)), {"type": "text", "text": text}])
    assert changed.usage.prompt_tokens_details.cached_tokens == 0
    assert tokens_of(changed) != tokens_of(cold)


def test_streaming_with_an_image(vision_server):
    client = vision_server.client()
    parts = [image_part(data_url(image_bytes(40))), {"type": "text", "text": TEXT}]
    whole = chat(client, parts).choices[0].message.content
    stream = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": parts}], max_tokens=MAX_TOKENS, temperature=0,
        stream=True, extra_body={"ignore_eos": True},
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text == whole and text


def test_an_http_image_url_served_here(vision_server, image_site, reference):
    client = vision_server.client()
    fetched = chat(client, [image_part(image_site + "/cat.png"), {"type": "text", "text": TEXT}])
    _, want = reference.greedy([image_bytes(101)], TEXT, MAX_TOKENS)
    assert tokens_of(fetched) == want
    redirected = chat(client, [image_part(image_site + "/to-cat"), {"type": "text", "text": TEXT}])
    assert tokens_of(redirected) == want


def test_a_slow_image_url_times_out_with_a_400(vision_server, image_site):
    t0 = time.monotonic()
    message = error_message(post_chat(vision_server, [image_part(image_site + "/slow.png")]))
    assert "timed out" in message and "--image-fetch-timeout" in message
    assert time.monotonic() - t0 < SLOW_S  # given up at the timeout, not after the slow answer
    assert FETCH_TIMEOUT_S < SLOW_S


@pytest.mark.parametrize(
    ("parts", "words"),
    [
        ([image_part("data:image/png;base64,aGVsbG8gd29ybGQ=")], "could not be decoded"),
        ([image_part("data:image/png;base64,%%%not-base64")], "not valid base64"),
        ([image_part("file:///etc/passwd")], "data: URL or an http(s)://"),
        ([image_part(data_url(image_bytes(50)))] * (IMAGE_LIMIT + 1), f"at most {IMAGE_LIMIT} image"),
        ([image_part(data_url(b"\0" * (MAX_IMAGE_BYTES + 10)))], "too large"),
    ],
    ids=["undecodable", "bad-base64", "file-scheme", "too-many", "too-large-data-url"],
)
def test_bad_images_are_400s_that_say_which(vision_server, parts, words):
    assert words in error_message(post_chat(vision_server, parts))


def test_bad_image_urls_are_400s_and_the_server_keeps_serving(vision_server, image_site):
    assert "too large" in error_message(post_chat(vision_server, [image_part(image_site + "/big.png")]))
    assert "non-http" in error_message(post_chat(vision_server, [image_part(image_site + "/to-file")]))
    assert "HTTP 404" in error_message(post_chat(vision_server, [image_part(image_site + "/missing.png")]))
    ok = post_chat(vision_server, [image_part(data_url(image_bytes(60))), {"type": "text", "text": TEXT}])
    assert ok.status_code == 200, ok.text


def test_n_candidates_share_the_image(vision_server, reference):
    image = image_bytes(80)
    reply = chat(vision_server.client(), [image_part(data_url(image)), {"type": "text", "text": TEXT}], n=2)
    _, want = reference.greedy([image], TEXT, MAX_TOKENS)
    assert [c.message.model_extra["completion_token_ids"] for c in reply.choices] == [want, want]
