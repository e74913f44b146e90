"""`paligemma-edge serve` as a real process: concurrent clients, memory, and the kiosk page in Chromium."""

from __future__ import annotations

import concurrent.futures
import io
import json
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from paligemma_edge.runtime.generation.results import mask_to_rle, rle_to_mask

pytest.importorskip("fastapi", reason="serve needs the 'apps' extra")
pytest.importorskip("httpx", reason="the server tests use httpx as the client")

import httpx  # noqa: E402

CLIENTS = 16
REQUESTS_PER_CLIENT = 4


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


class Server:
    def __init__(self, bundle: Path, *extra: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "paligemma_edge", "serve", str(bundle), "--port", str(self.port), *extra],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                assert self.process.stderr is not None  # stderr=PIPE
                raise AssertionError(f"serve exited: {self.process.stderr.read()}")
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=1) as answer:
                    if answer.status == 200:
                        return
            except OSError:
                time.sleep(0.2)
        raise AssertionError("serve did not come up in 120 s")

    def stop(self) -> tuple[int, str]:
        self.process.send_signal(signal.SIGINT)
        _, stderr = self.process.communicate(timeout=30)
        return self.process.returncode, stderr


@pytest.fixture(scope="module")
def server(segment_bundle):
    running = Server(segment_bundle)
    yield running
    code, stderr = running.stop()
    assert code == 0, stderr


def picture(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32 + seed, 24 + 2 * seed), (40 * seed % 256, 90, 200 - seed)).save(buffer, "PNG")
    return buffer.getvalue()


REQUESTS = [
    {"task": "caption", "max_new_tokens": "10"},
    {"task": "detect", "objects": "cat ; dog", "max_new_tokens": "12"},
    {"task": "answer", "question": "what is this", "max_new_tokens": "8"},
    {"task": "segment", "objects": "cat", "max_new_tokens": "24"},
]


def generate(client: httpx.Client, url: str, index: int, stream: bool = False) -> dict:
    data = REQUESTS[index % len(REQUESTS)]
    files = {"image": ("p.png", picture(index % 7), "image/png")}
    if not stream:
        answer = client.post(url + "/v1/generate", data=data, files=files, timeout=120)
        assert answer.status_code == 200, answer.text
        return answer.json()
    answer = client.post(url + "/v1/generate?stream=true", data=data, files=files, timeout=120)
    assert answer.status_code == 200, answer.text
    frames = [dict(line.split(": ", 1) for line in frame.splitlines()) for frame in answer.text.strip().split("\n\n")]
    assert frames[-1]["event"] == "result", frames[-1]
    return json.loads(frames[-1]["data"])


def test_concurrent_clients_get_their_own_answers(server):
    """16 clients at once, mixed tasks, images and streaming: no errors, requests batched, and every
    answer equals the one the same request gets alone (a shared or corrupted KV cache, or a row
    disturbed by its batch, would change tokens)."""
    with httpx.Client() as client:
        alone = {i: generate(client, server.url, i)["token_ids"] for i in range(len(REQUESTS) * 7)}
        rss_before = rss_mb(server.process.pid)

        def one_client(worker: int) -> list[tuple[int, list[int]]]:
            with httpx.Client() as own:
                out = []
                for n in range(REQUESTS_PER_CLIENT):
                    index = (worker * REQUESTS_PER_CLIENT + n) % len(alone)
                    out.append((index, generate(own, server.url, index, stream=bool((worker + n) % 2))["token_ids"]))
                return out

        started = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(CLIENTS) as pool:
            results = [pair for batch in pool.map(one_client, range(CLIENTS)) for pair in batch]
        seconds = time.monotonic() - started
        rss_after = rss_mb(server.process.pid)
        metrics = client.get(server.url + "/metrics").text
    assert len(results) == CLIENTS * REQUESTS_PER_CLIENT
    assert all(tokens == alone[index] for index, tokens in results)
    assert "paligemma_edge_request_errors_total 0" in metrics
    counters = dict(line.split() for line in metrics.splitlines() if line.startswith("paligemma_edge_batch"))
    batches, batched = float(counters["paligemma_edge_batches_total"]), float(counters["paligemma_edge_batched_requests_total"])
    assert batched >= len(results) and batches < batched, "16 concurrent clients were never batched"
    growth = rss_after - rss_before
    print(f"\nload: {len(results)} requests from {CLIENTS} clients in {seconds:.1f} s, mean batch {batched / batches:.1f}; "
          f"server RSS {rss_before:.0f} -> {rss_after:.0f} MB ({growth:+.1f} MB)")
    assert growth < 64, f"server memory grew {growth:.0f} MB under load"


def test_bad_requests_do_not_stop_the_server(server):
    with httpx.Client() as client:
        assert client.post(server.url + "/v1/generate", data={"task": "caption"},
                           files={"image": ("x.png", b"garbage", "image/png")}).status_code == 415
        chunked = client.post(server.url + "/v1/generate", content=iter([b"--x\r\n"]),
                              headers={"content-type": "multipart/form-data; boundary=x"})
        assert chunked.status_code == 411
        assert generate(client, server.url, 0)["finish_reason"] in ("eos", "length")


def test_token_required_on_a_real_server(segment_bundle):
    protected = Server(segment_bundle, "--token", "t0k3n")
    try:
        with httpx.Client() as client:
            assert client.get(protected.url + "/v1/info").status_code == 401
            assert client.get(protected.url + "/v1/info", headers={"Authorization": "Bearer t0k3n"}).status_code == 200
            assert client.get(protected.url + "/healthz").status_code == 200
    finally:
        assert protected.stop()[0] == 0


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="the kiosk tests need Debian's chromium (apt install chromium)")


@pytest.fixture(scope="module")
def kiosk(shapes_bundle):
    running = Server(shapes_bundle)
    yield running
    assert running.stop()[0] == 0


@pytest.fixture
def page(kiosk):
    """A fresh headless Chromium page on the kiosk, model info loaded."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="the kiosk tests drive Chromium with playwright")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run", "--disable-quic"])
        opened = browser.new_page()
        opened.goto(kiosk.url + "/")
        opened.wait_for_function("document.getElementById('model-info').textContent.includes('PaliGemma')")
        yield opened
        browser.close()


def ask(page, image: Path, task: str, objects: str) -> None:
    page.set_input_files("#file", str(image))
    page.wait_for_function("document.getElementById('preview').naturalWidth > 0")
    page.select_option("#task", task)
    page.fill("#objects", objects)
    page.click("#run")
    page.wait_for_function("['done', 'error'].includes(document.body.dataset.state)", timeout=60_000)


OVERLAY_ALPHA = """() => {
    const c = document.getElementById('overlay');
    const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
    const alpha = new Array(c.width * c.height);
    for (let i = 0; i < alpha.length; i++) alpha[i] = d[4 * i + 3];
    return [c.width, c.height, alpha];
}"""

# The order the answer box's parts come in on the page, and what of it a user sees without clicking.
ANSWER_LAYOUT = """() => {
    const box = document.getElementById('answer-box');
    const order = [...box.querySelectorAll('#answer, #objects-list, #raw')].map((e) => e.id);
    const visible = (e) => e.checkVisibility({contentVisibilityAuto: true, visibilityProperty: true});
    return {order, raw_shown: visible(document.getElementById('raw')),
            raw_text_shown: visible(document.getElementById('raw-text')),
            raw_open: document.getElementById('raw').open};
}"""


def overlay_alpha(page) -> np.ndarray:
    width, height, alpha = page.evaluate(OVERLAY_ALPHA)
    return np.asarray(alpha, dtype=np.uint8).reshape(height, width)


@needs_chromium
def test_kiosk_page_in_headless_chromium(kiosk, page, tmp_path):
    """Upload a scene, segment a shape: the objects listed first, the raw answer a click away, the mask painted."""
    from paligemma_edge.shapes import scenes

    scene = next(s for s in (scenes.scene("heldout", i) for i in range(50)) if s.count("circle") == 1)
    image = tmp_path / "scene.png"
    scenes.render(scene).save(image)
    with httpx.Client() as client:
        expected = client.post(kiosk.url + "/v1/generate", data={"task": "segment", "objects": "circle"},
                               files={"image": ("scene.png", image.read_bytes(), "image/png")}).json()
    assert expected["segmentations"], expected["text"]
    page.select_option("#task", "segment")
    shown = {field: page.is_visible(field) for field in ("#objects", "#question", "#prompt", "#lang", "#token")}
    ask(page, image, "segment", "circle")
    status = page.text_content("#status")
    answer = page.text_content("#answer")
    listed = page.locator("#objects-list li").all_text_contents()
    layout = page.evaluate(ANSWER_LAYOUT)
    raw_hidden = page.text_content("#raw-text")
    page.click("#raw summary")
    raw_after_click = page.evaluate(ANSWER_LAYOUT)["raw_text_shown"]
    painted = overlay_alpha(page)
    page.screenshot(path=str(tmp_path / "kiosk.png"))
    assert shown == {"#objects": True, "#question": False, "#prompt": False, "#lang": False, "#token": False}
    assert status.startswith("done"), status
    assert "<loc" not in answer and "<seg" not in answer and "found" in answer, answer
    assert layout == {"order": ["answer", "objects-list", "raw"], "raw_shown": True, "raw_text_shown": False,
                      "raw_open": False}
    assert raw_hidden == expected["text"] and raw_after_click  # one click shows the raw answer
    assert len(listed) == len(expected["segmentations"]) and listed[0].startswith("circle")
    x0, y0, x1, y1 = (round(v) for v in expected["segmentations"][0]["box"])
    assert f"({x0}, {y0}) to ({x1}, {y1})" in listed[0], listed[0]
    assert painted.shape[::-1] == Image.open(image).size
    mask = rle_to_mask(expected["segmentations"][0]["mask"])
    assert mask.any() and (painted[mask] > 0).mean() > 0.99  # the mask is painted, not just the box outline


def phone_photo(path: Path, width: int = 240, height: int = 320) -> tuple[np.ndarray, np.ndarray]:
    """A JPEG as a phone held upright writes it: the sensor's sideways pixels and EXIF orientation 6
    (rotate 90 degrees clockwise to view). Upright, a red circle top left and a blue square bottom
    right; returns their upright masks."""
    from PIL import ImageDraw

    upright = Image.new("RGB", (width, height), (246, 244, 238))
    draw = ImageDraw.Draw(upright)
    draw.ellipse((30, 40, 110, 120), fill=(215, 40, 40))
    draw.rectangle((width - 110, height - 120, width - 30, height - 40), fill=(40, 80, 215))
    exif = Image.Exif()
    exif[0x0110] = "Pixel 8"  # Model
    exif[0x0112] = 6  # Orientation: the stored rows are the picture's columns
    upright.transpose(Image.Transpose.ROTATE_90).save(path, "JPEG", quality=95, exif=exif)
    pixels = np.asarray(upright).astype(int)
    red = (pixels[..., 0] > 150) & (pixels[..., 2] < 100)
    blue = (pixels[..., 2] > 150) & (pixels[..., 0] < 100)
    return red, blue


def grown(mask: np.ndarray, margin: int) -> np.ndarray:
    """The mask's bounding box, grown by margin pixels on each side."""
    ys, xs = np.nonzero(mask)
    box = np.zeros_like(mask)
    box[max(0, ys.min() - margin):ys.max() + margin + 1, max(0, xs.min() - margin):xs.max() + margin + 1] = True
    return box


@needs_chromium
def test_kiosk_overlay_lies_on_the_objects_of_an_exif_rotated_photo(kiosk, page, tmp_path):
    """A phone JPEG (EXIF orientation 6) shows upright, and the masks and boxes drawn over it lie on
    the red circle and the blue square, not on the empty background."""
    image = tmp_path / "phone.jpg"
    red, blue = phone_photo(image)
    assert Image.open(image).size == (320, 240)  # stored sideways
    ask(page, image, "segment", "circle ; square")
    shown = page.evaluate("""() => {
        const img = document.getElementById('preview');
        const c = document.createElement('canvas');
        c.width = img.naturalWidth; c.height = img.naturalHeight;
        const ctx = c.getContext('2d');
        ctx.drawImage(img, 0, 0);
        const at = (x, y) => [...ctx.getImageData(x, y, 1, 1).data.slice(0, 3)];
        const box = img.getBoundingClientRect();
        return {natural: [img.naturalWidth, img.naturalHeight], shown: [box.width, box.height],
                circle: at(70, 80), square: at(170, 240), corner: at(200, 60)};
    }""")
    status = page.text_content("#status")
    listed = page.locator("#objects-list li").all_text_contents()
    painted = overlay_alpha(page) > 0
    page.screenshot(path=str(tmp_path / "kiosk-exif.png"))
    # the browser shows the picture upright (image-orientation: from-image) and draws it upright
    assert shown["natural"] == [240, 320] and shown["shown"][0] < shown["shown"][1], shown
    assert shown["circle"][0] > 150 > shown["circle"][2] and shown["square"][2] > 150 > shown["square"][0], shown
    assert min(shown["corner"]) > 200, shown
    assert status.startswith("done"), status
    assert [entry.split(" ")[0] for entry in listed] == ["circle", "square"], listed
    assert painted.shape == red.shape
    for name, target in (("circle", red), ("square", blue)):
        assert painted[target].mean() > 0.5, f"the {name}'s mask covers {painted[target].mean():.0%} of it"
    near_objects = grown(red, 24) | grown(blue, 24)
    assert painted[~near_objects].mean() < 0.005, "paint on the empty background"
    assert painted.sum() > 0 and painted[near_objects].sum() / painted.sum() > 0.98


@needs_chromium
def test_kiosk_decodes_coco_rle_as_pycocotools_does(page):
    """The page's JavaScript decoder against our encoder (itself checked against pycocotools)."""
    rng = np.random.default_rng(5)
    masks = [np.zeros((3, 4), bool), np.ones((5, 2), bool), rng.random((17, 23)) > 0.5, rng.random((1, 40)) > 0.2]
    long_runs = np.zeros((3000, 11), bool)
    long_runs[:, 3:6] = True
    long_runs[1:2999, 9] = True
    ys, xs = np.mgrid[:90, :140]
    masks += [long_runs, (ys - 40) ** 2 + (xs - 90) ** 2 < 900]
    for mask in masks:
        decoded = page.evaluate("(rle) => Array.from(decodeMask(rle).mask)", mask_to_rle(mask))
        np.testing.assert_array_equal(np.asarray(decoded, bool).reshape(mask.shape), mask)
