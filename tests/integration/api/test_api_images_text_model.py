"""Issue 14 on a text-only model: an image content part is a 400 that says so, before any fetch,
and the server keeps serving."""

from __future__ import annotations

from api_server import MODEL, error_of

PNG_1PX = (
    "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
)


def test_an_image_for_a_text_only_model_is_a_400_and_serving_goes_on(http):
    parts = [{"type": "image_url", "image_url": {"url": PNG_1PX}}, {"type": "text", "text": "What is this?"}]
    body = {"model": MODEL, "messages": [{"role": "user", "content": parts}], "max_tokens": 2}
    err = error_of(http.post("/v1/chat/completions", json=body), 400)
    assert "text-only" in err["message"] and err["param"] == "messages"
    # An unreachable URL is not even fetched: the model is refused first, at once.
    parts[0] = {"type": "image_url", "image_url": {"url": "http://192.0.2.1/never.png"}}
    assert "text-only" in error_of(http.post("/v1/chat/completions", json=body), 400)["message"]
    text = {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}], "max_tokens": 2}
    assert http.post("/v1/chat/completions", json=text).status_code == 200
