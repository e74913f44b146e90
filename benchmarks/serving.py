"""Serving benchmark: requests/s and latency of a live ``serve`` at several concurrent clients, one
request at a time against dynamic batching, on the same bundle in the same run.

    python -m paligemma_edge.benchmarks.serving --bundles build/bench/mid-int8,build/demo/shapes-int8 \\
        --max-tokens 24,64 --clients 1,4,8,16

For each bundle and answer budget, a server is started per mode (``--max-batch 1``, then
``--max-batch N``), warmed up, and driven over HTTP (``POST /v1/chat/completions`` with a data: URL
picture, stdlib only) by each number of clients, every client sending its requests back to back.
Requests cycle through tasks (caption, a question, detect) on different pictures (shapes scenes), so
batches mix prompt lengths and, where the model stops at eos (a trained model), answer lengths.
``--model mid`` builds, exports and quantizes the benchmark model first (as ``bench --model``).
Prints a markdown table and writes it with the raw figures as JSON.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

PROMPTS = ("caption en", "answer en what colour is the circle", "detect circle ; square")
PICTURES = 8


@dataclass(frozen=True)
class Level:
    bundle: str
    max_tokens: int
    mode: str  # "one-at-a-time" or "batched"
    clients: int
    requests: int
    seconds: float
    requests_per_s: float
    p50_ms: float
    p95_ms: float
    tokens_per_request: float
    mean_batch: float | None  # from the server's /metrics


def pictures() -> list[bytes]:
    from ..shapes.scenes import render, scene

    out = []
    for index in range(PICTURES):
        buffer = io.BytesIO()
        render(scene("heldout", index)).save(buffer, "PNG")
        out.append(buffer.getvalue())
    return out


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Server:
    """``paligemma-edge serve`` in a process of its own."""

    def __init__(self, bundle: str, max_batch: int, batch_wait_ms: float, threads: int | None):
        self.url = f"http://127.0.0.1:{_free_port()}"
        command = [sys.executable, "-m", "paligemma_edge", "serve", bundle, "--port", self.url.rsplit(":", 1)[1],
                   "--max-batch", str(max_batch), "--batch-wait-ms", str(batch_wait_ms), "--no-verify"]
        if threads:
            command += ["--threads", str(threads)]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                stderr = self.process.stderr.read() if self.process.stderr is not None else ""  # PIPE: never None
                raise SystemExit(f"serve exited: {stderr.strip()}")
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=1):
                    return
            except OSError:
                time.sleep(0.3)
        raise SystemExit("serve did not come up in 300 s")

    @property
    def model(self) -> str:
        with urllib.request.urlopen(self.url + "/v1/models", timeout=10) as answer:
            return json.loads(answer.read())["data"][0]["id"]

    def metrics(self) -> dict[str, float]:
        with urllib.request.urlopen(self.url + "/metrics", timeout=10) as answer:
            lines = answer.read().decode().splitlines()
        return {line.split()[0]: float(line.split()[1]) for line in lines if line and not line.startswith("#")}

    def stop(self) -> None:
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()


def chat(url: str, model: str, picture: bytes, prompt: str, max_tokens: int) -> int:
    """One request; returns the completion's token count."""
    body = json.dumps({
        "model": model, "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": [
            {"type": "text", "text": prompt},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(picture).decode()}},
        ]}],
    }).encode()
    request = urllib.request.Request(url + "/v1/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as answer:
        return json.loads(answer.read())["usage"]["completion_tokens"]


def drive(server: Server, clients: int, requests: int, max_tokens: int, images: list[bytes]):
    """``clients`` threads share ``requests`` requests, each sending its next one when the last is answered."""
    latencies: list[float] = []
    tokens: list[int] = []
    errors: list[BaseException] = []
    counter = iter(range(requests))
    lock = threading.Lock()
    model = server.model

    def client() -> None:
        while True:
            with lock:
                index = next(counter, None)
            if index is None or errors:
                return
            start = time.perf_counter()
            try:
                count = chat(server.url, model, images[index % len(images)], PROMPTS[index % len(PROMPTS)], max_tokens)
            except Exception as exc:  # reported after the join: a benchmark of failed requests means nothing
                errors.append(exc)
                return
            with lock:
                latencies.append((time.perf_counter() - start) * 1000)
                tokens.append(count)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise SystemExit(f"a request failed: {errors[0]}")
    return time.perf_counter() - start, latencies, tokens


def measure(bundle: str, max_tokens: int, mode: str, max_batch: int, client_counts: list[int], per_client: int,
            batch_wait_ms: float, threads: int | None, images: list[bytes], say) -> list[Level]:
    server = Server(bundle, 1 if mode == "one-at-a-time" else max_batch, batch_wait_ms, threads)
    levels = []
    try:
        drive(server, 1, 2, max_tokens, images)  # warm-up
        for clients in client_counts:
            before = server.metrics()
            requests = max(8, per_client * clients)
            seconds, latencies, tokens = drive(server, clients, requests, max_tokens, images)
            after = server.metrics()
            batches = after["paligemma_edge_batches_total"] - before["paligemma_edge_batches_total"]
            batched = after["paligemma_edge_batched_requests_total"] - before["paligemma_edge_batched_requests_total"]
            level = Level(
                bundle=Path(bundle).name, max_tokens=max_tokens, mode=mode, clients=clients, requests=requests,
                seconds=round(seconds, 3), requests_per_s=round(requests / seconds, 3),
                p50_ms=round(float(np.percentile(latencies, 50)), 1), p95_ms=round(float(np.percentile(latencies, 95)), 1),
                tokens_per_request=round(statistics.mean(tokens), 1),
                mean_batch=round(batched / batches, 2) if batches else None,
            )
            say(f"{level.bundle} {max_tokens} tokens, {mode}, {clients} clients: {level.requests_per_s} req/s, "
                f"p50 {level.p50_ms} ms, p95 {level.p95_ms} ms, mean batch {level.mean_batch}")
            levels.append(level)
    finally:
        server.stop()
    return levels


def markdown(levels: list[Level]) -> str:
    rows = ["| bundle | max tokens | clients | one-at-a-time req/s | batched req/s | speed-up | "
            "p50 ms (one / batched) | p95 ms (one / batched) | mean batch |",
            "|---|---|---|---|---|---|---|---|---|"]
    keyed = {(level.bundle, level.max_tokens, level.clients, level.mode): level for level in levels}
    for (bundle, max_tokens, clients, mode), one in keyed.items():
        if mode != "one-at-a-time" or (bundle, max_tokens, clients, "batched") not in keyed:
            continue
        both = keyed[(bundle, max_tokens, clients, "batched")]
        rows.append(f"| {bundle} | {max_tokens} | {clients} | {one.requests_per_s:.2f} | {both.requests_per_s:.2f} | "
                    f"{both.requests_per_s / one.requests_per_s:.2f}x | {one.p50_ms:.0f} / {both.p50_ms:.0f} | "
                    f"{one.p95_ms:.0f} / {both.p95_ms:.0f} | {both.mean_batch} |")
    return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m paligemma_edge.benchmarks.serving", description=__doc__.split("\n")[0])
    parser.add_argument("--bundles", default="", help="comma-separated bundle directories")
    parser.add_argument("--model", help="also build, export and quantize this benchmark model (e.g. mid) to int8")
    parser.add_argument("--workdir", default="build/bench", help="where --model's bundles go (default build/bench)")
    parser.add_argument("--max-tokens", default="24,64", help="answer budgets, comma-separated (default 24,64)")
    parser.add_argument("--clients", default="1,4,8,16", help="concurrent clients, comma-separated (default 1,4,8,16)")
    parser.add_argument("--per-client", type=int, default=3, help="requests per client (at least 8 per level)")
    parser.add_argument("--max-batch", type=int, default=8, help="the batched server's --max-batch (default 8)")
    parser.add_argument("--batch-wait-ms", type=float, default=0.0, help="the servers' --batch-wait-ms (default 0)")
    parser.add_argument("--threads", type=int, help="ONNX Runtime threads (default: all cores)")
    parser.add_argument("--out", default="benchmarks/results/serving", help="writes OUT.json and OUT.md")
    args = parser.parse_args(argv)
    say = lambda message: print(message, file=sys.stderr, flush=True)
    bundles = [b.strip() for b in args.bundles.split(",") if b.strip()]
    if args.model:
        from .harness import BenchOptions, _prepare_model

        options = BenchOptions(model=args.model, precisions=("int8",), workdir=Path(args.workdir), reuse=True)
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
        bundles.insert(0, str(_prepare_model(options, Path(args.workdir), say).bundles["int8"]))
    if not bundles:
        parser.error("give --bundles or --model")
    client_counts = [int(c) for c in args.clients.split(",")]
    images = pictures()
    levels: list[Level] = []
    for bundle in bundles:
        for max_tokens in (int(t) for t in args.max_tokens.split(",")):
            for mode in ("one-at-a-time", "batched"):
                levels += measure(bundle, max_tokens, mode, args.max_batch, client_counts, args.per_client,
                                  args.batch_wait_ms, args.threads, images, say)
    table = markdown(levels)
    machine = f"{platform.machine()}, {os.cpu_count()} cores, {platform.processor() or platform.system()}"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"machine": machine, "levels": [asdict(level) for level in levels]},
                                                   indent=2) + "\n")
    out.with_suffix(".md").write_text(f"Serving benchmark on {machine}\n\n{table}")
    print(table, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
