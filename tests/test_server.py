"""The HTTP API in-process (FastAPI's TestClient drives the real app over the real model)."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image

from .conftest import run_cli

pytest.importorskip("fastapi", reason="serve needs the 'apps' extra")
from fastapi.testclient import TestClient  # noqa: E402

from paligemma_edge.apps.server import ServerOptions, create_app, _failure  # noqa: E402
from paligemma_edge.runtime.model import load  # noqa: E402


def png(size=(40, 30), color=(200, 30, 30), mode="RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, color).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def model(segment_bundle):
    with load(segment_bundle) as loaded:
        yield loaded


def client_for(model, **limits) -> TestClient:
    return TestClient(create_app(model, ServerOptions(bundle=str(model.bundle_dir), **limits)))


@pytest.fixture(scope="module")
def client(model):
    with client_for(model, max_upload_mb=0.2, max_image_pixels=1_000_000, max_new_tokens=48) as c:
        yield c


def post(client, data: dict, image: bytes | None = None, stream: bool = False, **kwargs):
    files = {"image": ("picture.png", png() if image is None else image, "image/png")}
    return client.post("/v1/generate" + ("?stream=true" if stream else ""), files=files, data=data, **kwargs)


def sse_events(text: str) -> list[tuple[str, dict]]:
    events = []
    for frame in text.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in frame.splitlines())
        events.append((fields["event"], json.loads(fields["data"])))
    return events


def test_generate_answers_as_run_json_does(client, segment_bundle, tmp_path):
    image = tmp_path / "picture.png"
    image.write_bytes(png())
    cli = run_cli("run", str(segment_bundle), "--image", str(image), "--task", "detect", "--objects", "cat ; dog",
                  "--max-new-tokens", "12", "--json", check=True)
    expected = json.loads(cli.stdout)
    answer = post(client, {"task": "detect", "objects": "cat ; dog", "max_new_tokens": "12"}, image.read_bytes())
    assert answer.status_code == 200
    body = answer.json()
    assert {k: body[k] for k in ("prompt", "text", "token_ids", "finish_reason", "detections")} == \
        {k: expected[k] for k in ("prompt", "text", "token_ids", "finish_reason", "detections")}
    assert set(body["timings"]) == set(expected["timings"])


def test_stream_events_join_to_the_answer(client):
    data = {"task": "segment", "objects": "cat", "max_new_tokens": "24"}
    whole = post(client, data).json()
    streamed = post(client, data, stream=True)
    assert streamed.status_code == 200 and streamed.headers["content-type"].startswith("text/event-stream")
    events = sse_events(streamed.text)
    tokens = [d for kind, d in events if kind == "token"]
    assert [kind for kind, _ in events] == ["token"] * len(tokens) + ["result"]
    assert "".join(t["text"] for t in tokens) == whole["text"] == events[-1][1]["text"]
    assert [t["token_id"] for t in tokens] == whole["token_ids"]
    assert events[-1][1]["segmentations"] == whole["segmentations"]


def test_free_prompt_and_sampling_options(client):
    a = post(client, {"prompt": "caption en", "temperature": "0.9", "top_k": "5", "seed": "3", "max_new_tokens": "8"})
    b = post(client, {"prompt": "caption en", "temperature": "0.9", "top_k": "5", "seed": "3", "max_new_tokens": "8"})
    assert a.status_code == 200 and a.json()["token_ids"] == b.json()["token_ids"]


@pytest.mark.parametrize("data, image, status, fragment", [
    ({"task": "caption"}, b"not an image at all", 415, "not a supported image"),
    ({"task": "caption"}, b"", 422, "empty"),
    ({"task": "caption"}, png((2000, 1000), color=0, mode="1"), 413, "2000x1000 pixels"),
    ({"task": "caption"}, b"x" * 300_000, 413, "at most 200000"),
    ({"task": "caption"}, b"x" * 250_000, 413, "over 200000 bytes"),
    ({"task": "caption", "max_new_tokens": "49"}, None, 422, "at most 48"),
    ({"task": "caption", "max_new_tokens": "0"}, None, 422, "max_new_tokens"),
    ({"task": "caption", "max_new_tokens": "many"}, None, 422, "max_new_tokens"),
    ({"task": "caption", "temperature": "-1"}, None, 422, "temperature"),
    ({"task": "fly"}, None, 422, "unknown task 'fly'"),
    ({"task": "caption", "lang": "xx"}, None, 422, "xx"),
    ({"task": "caption", "prompt": "caption en"}, None, 422, "not both"),
    ({"question": "what"}, None, 422, "go with 'task'"),
    ({}, None, 422, "give a 'prompt' or a 'task'"),
    ({"task": "answer"}, None, 422, "needs a question"),
    ({"prompt": "word " * 80}, None, 422, "max sequence"),
    ({"prompt": "a <image> b"}, None, 422, "image token"),
], ids=lambda value: value if isinstance(value, (int, str)) and len(str(value)) < 40 else None)
def test_bad_requests_get_a_4xx_with_one_line(client, data, image, status, fragment):
    answer = post(client, data, image)
    assert answer.status_code == status, answer.text
    message = answer.json()["error"]
    assert fragment in message and "\n" not in message and "Traceback" not in message


def test_missing_image_and_keeps_serving(client):
    assert client.post("/v1/generate", data={"task": "caption"}).status_code == 422
    assert post(client, {"task": "caption", "max_new_tokens": "2"}).status_code == 200


def test_segment_needs_a_mask_decoder(bundles):
    with load(bundles[(2, 28)]) as plain, client_for(plain) as c:
        answer = post(c, {"task": "segment", "objects": "cat"})
        assert answer.status_code == 422 and "--mask-decoder" in answer.json()["error"]
        assert c.get("/v1/info").json()["model"]["segmentation"] is False


def test_info_health_metrics_and_page(client):
    info = client.get("/v1/info").json()
    assert info["model"]["family"] == 1 and info["model"]["segmentation"] is True
    assert info["limits"]["max_new_tokens"] == 48 and info["auth"] is False and "detect" in info["tasks"]
    assert client.get("/healthz").json() == {"status": "ok"}
    metrics = client.get("/metrics").text
    assert 'paligemma_edge_requests_total{route="/v1/generate",status="200"}' in metrics
    assert "paligemma_edge_generation_seconds_count" in metrics and "paligemma_edge_queue_depth 0" in metrics
    page = client.get("/")
    assert page.status_code == 200 and "/static/kiosk.js" in page.text and "http" not in page.text.split("<body>")[1]
    assert client.get("/static/kiosk.js").status_code == 200
    assert client.get("/static/secret.py").status_code == 404


def test_token_guards_the_api(model):
    with client_for(model, token="s3cret") as c:
        for path in ("/v1/info", "/metrics"):
            assert c.get(path).status_code == 401
            assert c.get(path, headers={"Authorization": "Bearer wrong"}).status_code == 401
            assert c.get(path, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert post(c, {"task": "caption"}).status_code == 401
        assert post(c, {"task": "caption", "max_new_tokens": "2"},
                    headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert c.get("/healthz").status_code == 200 and c.get("/").status_code == 200


def test_request_timeout_frees_the_model(model):
    with client_for(model, request_timeout_s=0.0) as c:
        answer = post(c, {"task": "caption"})
        assert answer.status_code in (503, 504) and "timed out" in answer.json()["error"]
        events = sse_events(post(c, {"task": "caption"}, stream=True).text)
        assert events[-1][0] == "error" and events[-1][1]["status"] in (503, 504)


def test_internal_errors_say_nothing_of_paths():
    status, message = _failure(RuntimeError("/home/user/secret/path.onnx exploded"))
    assert status == 500 and "/" not in message


def test_serve_cli_errors(segment_bundle, tmp_path):
    import socket

    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    missing = run_cli("serve", str(tmp_path / "nope"), "--port", str(port))
    last = missing.stderr.strip().splitlines()[-1]
    assert missing.returncode == 2 and last.startswith("paligemma-edge: error:") and "no such bundle" in last
    assert "Traceback" not in missing.stderr
    assert run_cli("serve", str(segment_bundle), "--port", "70000").returncode == 2
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = run_cli("serve", str(segment_bundle), "--port", str(port))
    assert busy.returncode == 2 and "cannot listen" in busy.stderr and busy.stderr.count("\n") == 1
