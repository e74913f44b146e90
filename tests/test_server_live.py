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

import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="serve needs the 'apps' extra")
httpx = pytest.importorskip("httpx", reason="the server tests use httpx as the client")

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
    """16 clients at once, mixed tasks, images and streaming: no errors, and every answer equals the
    one the same request gets alone (a shared or corrupted KV cache would change tokens)."""
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
    growth = rss_after - rss_before
    print(f"\nload: {len(results)} requests from {CLIENTS} clients in {seconds:.1f} s; "
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


@pytest.mark.skipif(CHROMIUM is None, reason="the kiosk test needs Debian's chromium (apt install chromium)")
def test_kiosk_page_in_headless_chromium(shapes_bundle, tmp_path):
    """Upload a scene, detect shapes, see the streamed answer and the boxes drawn over the picture."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="the kiosk test drives Chromium with playwright")
    from paligemma_edge.shapes import scenes

    scene = next(s for s in (scenes.scene("heldout", i) for i in range(50)) if s.count("circle") == 1)
    image = tmp_path / "scene.png"
    scenes.render(scene).save(image)
    kiosk = Server(shapes_bundle)
    try:
        with httpx.Client() as client:
            expected = client.post(kiosk.url + "/v1/generate", data={"task": "segment", "objects": "circle"},
                                   files={"image": ("scene.png", image.read_bytes(), "image/png")}).json()
        assert expected["segmentations"], expected["text"]
        with sync_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=[
                "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run", "--disable-quic"])
            page = browser.new_page()
            page.goto(kiosk.url + "/")
            page.wait_for_function("document.getElementById('model-info').textContent.includes('PaliGemma')")
            page.set_input_files("#file", str(image))
            page.select_option("#task", "segment")
            shown = {field: page.is_visible(field) for field in ("#objects", "#question", "#prompt", "#lang", "#token")}
            page.fill("#objects", "circle")
            page.click("#run")
            page.wait_for_function("['done', 'error'].includes(document.body.dataset.state)", timeout=60_000)
            status = page.text_content("#status")
            answer = page.text_content("#answer")
            listed = page.locator("#objects-list li").all_text_contents()
            painted = page.evaluate("""() => {
                const c = document.getElementById('overlay');
                const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                let n = 0;
                for (let i = 3; i < d.length; i += 4) if (d[i] > 0) n++;
                return [n, c.width, c.height];
            }""")
            page.screenshot(path=str(tmp_path / "kiosk.png"))
            browser.close()
    finally:
        assert kiosk.stop()[0] == 0
    assert shown == {"#objects": True, "#question": False, "#prompt": False, "#lang": False, "#token": False}
    assert status.startswith("done"), status
    assert answer == expected["text"]
    assert len(listed) == len(expected["segmentations"]) and listed[0].startswith("circle")
    pixels, width, height = painted
    assert (width, height) == Image.open(image).size
    mask_pixels = sum(expected["segmentations"][0]["mask"]["counts"][1::2])
    assert pixels >= 0.8 * mask_pixels > 0  # the mask is painted, not just the box outline
