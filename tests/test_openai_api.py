"""The OpenAI-compatible routes: the official `openai` client against a live `serve`, and the
request translation in-process."""

from __future__ import annotations

import base64
import http.server
import io
import json
import threading

import pytest
from PIL import Image

from .conftest import run_cli
from .test_server_live import Server

pytest.importorskip("fastapi", reason="serve needs the 'apps' extra")
openai = pytest.importorskip("openai", reason="these tests use the official openai client (test extra)")
from fastapi.testclient import TestClient  # noqa: E402

from paligemma_edge.apps.openai_api import ChatRequestError, parse_chat_request  # noqa: E402
from paligemma_edge.apps.server import ServerOptions, create_app  # noqa: E402
from paligemma_edge.runtime.model import load  # noqa: E402
from paligemma_edge.runtime.generation.sampling import GenerationOptions  # noqa: E402


def data_url(raw: bytes, kind: str = "png") -> str:
    return f"data:image/{kind};base64," + base64.b64encode(raw).decode()


def scene_png(tmp_path):
    from paligemma_edge.shapes import scenes

    path = tmp_path / "scene.png"
    scenes.render(scenes.scene("heldout", 3)).save(path)
    return path


def user(text: str, url: str) -> list[dict]:
    parts = [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": url}}]
    return [{"role": "user", "content": parts}]


@pytest.fixture(scope="module")
def live(shapes_bundle):
    running = Server(shapes_bundle, "--token", "k3y", "--max-new-tokens", "64")
    yield running
    assert running.stop()[0] == 0


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=live.url + "/v1", api_key="k3y", max_retries=0, timeout=120)


def test_models_and_detect_equal_run_json(client, shapes_bundle, tmp_path):
    listed = client.models.list().data
    assert [m.id for m in listed] == [shapes_bundle.name]
    image = scene_png(tmp_path)
    cli = json.loads(run_cli("run", str(shapes_bundle), "--image", str(image), "--prompt", "detect circle ; square",
                             "--max-new-tokens", "40", "--json", check=True).stdout)
    answer = client.chat.completions.create(model=shapes_bundle.name, max_tokens=40,
                                            messages=[{"role": "system", "content": "be helpful"},
                                                      *user("detect circle ; square", data_url(image.read_bytes()))])
    message = answer.choices[0].message
    assert message.content == cli["text"] and message.role == "assistant"
    assert message.model_extra["detections"] == cli["detections"] and cli["detections"]
    assert answer.choices[0].finish_reason == {"eos": "stop", "length": "length"}[cli["finish_reason"]]
    assert answer.model == shapes_bundle.name and answer.object == "chat.completion"
    with load(shapes_bundle) as model:
        prompt_tokens = len(model.tokenizer.encode("detect circle ; square"))
    assert answer.usage.prompt_tokens == prompt_tokens > model.tokenizer.num_image_tokens
    assert answer.usage.completion_tokens == len(cli["token_ids"])


def test_stream_joins_to_the_answer_and_length(client, shapes_bundle, tmp_path):
    url = data_url(scene_png(tmp_path).read_bytes())
    prompt = "detect circle ; square ; triangle"
    whole = client.chat.completions.create(model=shapes_bundle.name, messages=user(prompt, url), max_tokens=6)
    assert whole.choices[0].finish_reason == "length" and whole.usage.completion_tokens == 6
    chunks = list(client.chat.completions.create(model=shapes_bundle.name, messages=user(prompt, url),
                                                 max_completion_tokens=6, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 6 and chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_errors_in_openai_shape(client, live, shapes_bundle, tmp_path):
    url = data_url(scene_png(tmp_path).read_bytes())
    with pytest.raises(openai.BadRequestError) as bad_image:
        client.chat.completions.create(model=shapes_bundle.name, messages=user("caption en", data_url(b"junk")))
    assert "not a supported image" in bad_image.value.message and bad_image.value.code == "invalid_image"
    with pytest.raises(openai.BadRequestError) as too_long:
        client.chat.completions.create(model=shapes_bundle.name, messages=user("word " * 200, url))
    assert "max sequence" in too_long.value.message
    with pytest.raises(openai.BadRequestError, match="--allow-remote-images"):
        client.chat.completions.create(model=shapes_bundle.name,
                                       messages=user("caption en", "http://127.0.0.1:9/x.png"))
    with pytest.raises(openai.BadRequestError, match="one choice"):
        client.chat.completions.create(model=shapes_bundle.name, messages=user("caption en", url), n=2)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=user("caption en", url))
    wrong = openai.OpenAI(base_url=live.url + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as denied:
        wrong.models.list()
    assert "bearer token" in denied.value.message


@pytest.mark.parametrize("body, fragment", [
    ({"messages": []}, "model"),
    ({"model": "m", "messages": []}, "non-empty"),
    ({"model": "m", "messages": [{"role": "user", "content": "caption en"}]}, "0 images"),
    ({"model": "m", "messages": user("a", "data:x") * 2}, "one user message"),
    ({"model": "m", "messages": [{"role": "assistant", "content": "hi"}]}, "role 'assistant'"),
    ({"model": "m", "messages": user("a", "u"), "stop": ["x"]}, "stop"),
    ({"model": "m", "messages": user("a", "u"), "max_tokens": 3, "max_completion_tokens": 4}, "differ"),
    ({"model": "m", "messages": user("a", "u"), "temperature": "hot"}, "temperature"),
    ({"model": "m", "messages": user("a", "u"), "frobnicate": 1}, "unrecognized"),
])
def test_request_translation_refuses(body, fragment):
    with pytest.raises(ChatRequestError, match=fragment):
        parse_chat_request(body, "m")


def test_loopback_remote_image_with_the_flag(shapes_bundle, tmp_path):
    raw = scene_png(tmp_path).read_bytes()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def log_message(self, *args):
            pass

    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler) as pictures, load(shapes_bundle) as model:
        threading.Thread(target=pictures.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{pictures.server_address[1]}/scene.png"
        body = {"model": shapes_bundle.name, "max_tokens": 5, "messages": user("caption en", url)}
        with TestClient(create_app(model, ServerOptions(bundle=str(shapes_bundle)))) as closed:
            refused = closed.post("/v1/chat/completions", json=body)
        with TestClient(create_app(model, ServerOptions(bundle=str(shapes_bundle), allow_remote_images=True))) as c:
            fetched = c.post("/v1/chat/completions", json=body)
            local = c.post("/v1/chat/completions", json=body | {"messages": user("caption en", data_url(raw))})
        pictures.shutdown()
        direct = model.generate(Image.open(io.BytesIO(raw)), "caption en", GenerationOptions(max_new_tokens=5))
    assert refused.status_code == 400 and refused.json()["error"]["type"] == "invalid_request_error"
    assert fetched.status_code == 200, fetched.text
    assert fetched.json()["choices"][0]["message"]["content"] == local.json()["choices"][0]["message"]["content"] \
        == direct.text
