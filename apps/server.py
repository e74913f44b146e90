"""``paligemma-edge serve``: the HTTP API and the kiosk page, over one loaded model.

Routes: ``POST /v1/generate`` (multipart: ``image`` + ``prompt`` or ``task`` with ``lang`` /
``question`` / ``objects``, decoding options; ``?stream=true`` for Server-Sent Events),
``GET /v1/info``, ``GET /metrics`` (Prometheus text), ``GET /healthz``, and the kiosk page at
``/`` (served from the package: no CDN, works offline). With a token, the API routes and
/metrics need ``Authorization: Bearer TOKEN``; /healthz and the page stay open (the page asks
for the token). Requests queue to one model thread, which runs the requests waiting together as one
batch (at most ``max_batch``, waiting up to ``batch_wait_ms`` for more: see worker.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import platform
import socket
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from PIL import Image

from ..runtime.errors import InputError, PaliGemmaEdgeError
from ..runtime.model import PaliGemma, load
from ..runtime.images import ImageTooLargeError, load_image
from ..runtime.generation.sampling import GenerationOptions
from ..runtime.generation.tasks import LANGUAGES, TASKS, resolve_prompt
from . import openai_api
from .metrics import ServerMetrics
from .worker import Cancelled, DeadlineExceeded, Job, ModelWorker, QueueFull, WorkerClosed

log = logging.getLogger("paligemma_edge.serve")
STATIC_FILES = {"index.html": "text/html", "kiosk.js": "text/javascript", "kiosk.css": "text/css"}
FORM_OVERHEAD_BYTES = 64 * 1024  # multipart boundaries and the text fields around the image
DEFAULT_MAX_NEW_TOKENS = 128  # generation stops at eos; room for several segmented objects


@dataclass(frozen=True)
class ServerOptions:
    bundle: str
    host: str = "127.0.0.1"
    port: int = 8080
    backend: str = "onnxruntime"
    threads: int | None = None
    token: str | None = None
    verify: bool = True
    max_upload_mb: float = 10.0
    max_image_pixels: int = 40_000_000
    max_new_tokens: int = 256
    request_timeout_s: float = 120.0
    max_queue: int = 32
    max_batch: int = 8
    batch_wait_ms: float = 0.0
    allow_remote_images: bool = False

    def __post_init__(self):
        if self.max_batch < 1:
            raise InputError(f"--max-batch must be at least 1, got {self.max_batch}")
        if not 0 <= self.batch_wait_ms <= 10_000:
            raise InputError(f"--batch-wait-ms must be 0..10000, got {self.batch_wait_ms}")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1_000_000)


class HTTPProblem(Exception):
    """A request the server refuses: an HTTP status and one line saying why."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _error(status: int, message: str, path: str = "", headers: dict | None = None) -> JSONResponse:
    """One-line JSON error; in OpenAI's error shape on the OpenAI-compatible routes."""
    if path in openai_api.ROUTES:
        status, body = openai_api.error_body(status, message)
        return JSONResponse(body, status_code=status, headers=headers)
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """Upload bytes -> the upright RGB image (the runtime's loader); size is checked from the header,
    before any pixels are decoded."""
    if not data:
        raise HTTPProblem(422, "the image file is empty")
    try:
        return load_image(data, max_pixels=max_pixels, name="the upload")
    except ImageTooLargeError as exc:
        raise HTTPProblem(413, str(exc)) from None
    except InputError as exc:
        raise HTTPProblem(415, str(exc)) from None


def bundle_info(model: PaliGemma, options: ServerOptions) -> dict:
    manifest = model.manifest
    return {
        "bundle": Path(model.bundle_dir).name,
        "model": {
            "name": manifest.model_name, "family": manifest.family, "precision": manifest.precision,
            "image_size": [manifest.image.height, manifest.image.width],
            "image_tokens": model.tokenizer.num_image_tokens, "max_seq_len": manifest.decoder.max_seq_len,
            "segmentation": manifest.mask_decoder is not None,
        },
        "backend": options.backend,
        "device": {"machine": platform.machine(), "system": platform.system(), "processor": platform.processor(),
                   "cpus": os.cpu_count()},
        "tasks": {name: {"lang": t.uses_lang, "question": t.uses_question, "objects": t.uses_objects}
                  for name, t in TASKS.items()},
        "languages": sorted(LANGUAGES),
        "limits": {"max_upload_bytes": options.max_upload_bytes, "max_image_pixels": options.max_image_pixels,
                   "max_new_tokens": options.max_new_tokens, "request_timeout_s": options.request_timeout_s,
                   "max_batch": options.max_batch, "batch_wait_ms": options.batch_wait_ms},
        "auth": options.token is not None,
    }


def _sse(event: str, data: dict) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


def _failure(exc: BaseException) -> tuple[int, str]:
    """The status and message a worker error becomes; unexpected errors say nothing of paths."""
    if isinstance(exc, InputError):
        return 422, str(exc)
    if isinstance(exc, QueueFull):
        return 503, f"server busy: {exc}"
    if isinstance(exc, WorkerClosed):
        return 503, str(exc)
    if isinstance(exc, DeadlineExceeded):
        return (504 if exc.started else 503), str(exc)
    if isinstance(exc, Cancelled):
        return 499, "client closed the request"
    log.error("generation failed", exc_info=exc)
    return 500, "internal error while generating"


def create_app(model: PaliGemma, options: ServerOptions) -> FastAPI:
    worker = ModelWorker(model, options.max_queue, options.max_batch, options.batch_wait_ms)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        worker.close()

    app = FastAPI(title="paligemma-edge", docs_url=None, redoc_url=None, lifespan=lifespan)  # docs UI needs a CDN
    metrics = ServerMetrics()
    info = bundle_info(model, options)
    app.state.worker = worker
    protected = ("/v1/", "/metrics")

    @app.middleware("http")
    async def guard(request: Request, call_next):
        path = request.url.path
        route = path if path in ("/", "/healthz", "/metrics", "/v1/info", "/v1/generate", *openai_api.ROUTES) \
            else "other"
        response = await _guarded(request, call_next, path)
        metrics.record_request(route, response.status_code)
        return response

    async def _guarded(request: Request, call_next, path: str) -> Response:
        if options.token is not None and path.startswith(protected):
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {options.token}".encode()):
                return _error(401, "missing or wrong bearer token", path, headers={"WWW-Authenticate": "Bearer"})
        if request.method == "POST":
            length = request.headers.get("content-length")
            if length is None or not length.isdigit():
                return _error(411, "send a Content-Length header", path)
            base64_size = (options.max_upload_bytes + 2) // 3 * 4 if path == openai_api.CHAT_PATH else 0
            if int(length) > max(options.max_upload_bytes, base64_size) + FORM_OVERHEAD_BYTES:
                return _error(413, f"upload is {int(length)} bytes; this server accepts at most "
                                   f"{options.max_upload_bytes} per image", path)
        try:
            return await call_next(request)
        except Exception as exc:  # never a traceback or a path in the answer
            log.error("request failed", exc_info=exc)
            return _error(500, "internal error", path)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(part) for part in first.get("loc", ())[1:]) or "request"
        return _error(422, f"{where}: {first.get('msg', 'invalid value')}", request.url.path)

    @app.exception_handler(HTTPProblem)
    async def problem(request: Request, exc: HTTPProblem):
        return _error(exc.status, str(exc), request.url.path)

    @app.exception_handler(openai_api.ChatRequestError)
    async def chat_refused(request: Request, exc: openai_api.ChatRequestError):
        status, body = openai_api.error_body(exc.status, str(exc), exc.param, exc.code)
        return JSONResponse(body, status_code=status)

    @app.exception_handler(PaliGemmaEdgeError)
    async def refused(request: Request, exc: PaliGemmaEdgeError):
        return _error(422 if isinstance(exc, InputError) else 500, str(exc) if isinstance(exc, InputError)
                      else "internal error", request.url.path)

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/v1/info")
    async def v1_info():
        return info

    @app.get("/metrics")
    async def v1_metrics():
        return PlainTextResponse(metrics.render(worker.queue_depth, worker.stats.batches,
                                                 worker.stats.requests), media_type="text/plain; version=0.0.4")

    @app.get("/", response_class=HTMLResponse)
    async def kiosk():
        return _static("index.html")

    @app.get("/static/{name}")
    async def static(name: str):
        if name not in STATIC_FILES:
            return _error(404, "no such file")
        return _static(name)

    @app.post("/v1/generate")
    async def generate(
        request: Request,
        image: UploadFile = File(...),
        prompt: str | None = Form(None), task: str | None = Form(None), lang: str | None = Form(None),
        question: str | None = Form(None), objects: str | None = Form(None),
        max_new_tokens: int | None = Form(None), temperature: float = Form(0.0),
        top_k: int = Form(0), top_p: float = Form(1.0), seed: int | None = Form(None),
        stream: bool = False,
    ):
        accepted = time.monotonic()
        data = await image.read(options.max_upload_bytes + 1)
        if len(data) > options.max_upload_bytes:
            raise HTTPProblem(413, f"image file is over {options.max_upload_bytes} bytes")
        picture = decode_image(data, options.max_image_pixels)
        if max_new_tokens is None:
            max_new_tokens = min(DEFAULT_MAX_NEW_TOKENS, options.max_new_tokens)
        if max_new_tokens > options.max_new_tokens:
            raise InputError(f"max_new_tokens is {max_new_tokens}; this server allows at most {options.max_new_tokens}")
        generation_options = GenerationOptions(max_new_tokens=max_new_tokens, temperature=temperature,
                                                top_k=top_k, top_p=top_p, seed=seed)
        text_prompt = resolve_prompt(prompt, task, lang, question, objects)
        model.tokenizer.encode(text_prompt)  # too long for the bundle: 422 now, not mid-stream
        model.check_can_parse([text_prompt])
        job = Job(picture, text_prompt, generation_options, deadline=accepted + options.request_timeout_s)

        def finished(result, generation) -> dict:
            metrics.record_generation(time.monotonic() - accepted, len(generation.token_ids),
                                      generation.timings.decode_tokens_per_s)
            return result.to_dict()

        if stream:
            return StreamingResponse(_stream(job, finished), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            future = worker.submit(job)
            result, generation = await asyncio.wait_for(asyncio.wrap_future(future), options.request_timeout_s)
        except asyncio.TimeoutError:
            job.cancelled.set()
            return _error(504, "request timed out")
        except Exception as exc:
            return _error(*_failure(exc))
        return finished(result, generation)

    async def _events(job: Job) -> AsyncIterator[tuple[str, Any]]:
        """Run a job on the worker: yields ("token", chunk) per token, then ("result", (result,
        generation)) or ("error", (status, message)). Leaving early frees the model."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        job.on_token = lambda chunk: loop.call_soon_threadsafe(events.put_nowait, ("token", chunk))
        try:
            future = worker.submit(job)
        except (QueueFull, WorkerClosed) as exc:
            yield "error", _failure(exc)
            return
        future.add_done_callback(lambda f: loop.call_soon_threadsafe(events.put_nowait, ("done", f)))
        try:
            while True:
                kind, value = await events.get()
                if kind == "token":
                    yield "token", value
                    continue
                try:
                    yield "result", value.result()
                except Exception as exc:
                    yield "error", _failure(exc)
                return
        finally:
            job.cancelled.set()  # the client went away (or we are done): free the model

    async def _stream(job: Job, finished):
        async for kind, value in _events(job):
            if kind == "token":
                yield _sse("token", {"token_id": value.token_id, "text": value.text})
            elif kind == "result":
                yield _sse("result", finished(*value))
            else:
                yield _sse("error", {"status": value[0], "error": value[1]})

    served_id = info["bundle"]
    created = int(time.time())

    @app.get(openai_api.MODELS_PATH)
    async def v1_models():
        return openai_api.models(served_id, model.manifest.model_name, created)

    @app.post(openai_api.CHAT_PATH)
    async def chat_completions(request: Request):
        accepted = time.monotonic()
        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError):
            raise openai_api.ChatRequestError(400, "the request body is not valid JSON") from None
        chat = openai_api.parse_chat_request(body, served_id)
        url = chat.image_url
        if url.startswith(("http://", "https://")) and options.allow_remote_images:
            data = await asyncio.to_thread(openai_api.image_bytes, url, options.max_upload_bytes, True)
        else:
            data = openai_api.image_bytes(url, options.max_upload_bytes, options.allow_remote_images)
        picture = decode_image(data, options.max_image_pixels)
        max_new_tokens = chat.max_new_tokens or min(DEFAULT_MAX_NEW_TOKENS, options.max_new_tokens)
        if max_new_tokens > options.max_new_tokens:
            raise openai_api.ChatRequestError(400, f"max_tokens is {max_new_tokens}; this server allows at most "
                                              f"{options.max_new_tokens}", "max_tokens")
        generation_options = GenerationOptions(max_new_tokens=max_new_tokens, temperature=chat.temperature,
                                                top_p=chat.top_p, seed=chat.seed)
        prompt_tokens = len(model.tokenizer.encode(chat.prompt))  # too long for the bundle: 400 now
        model.check_can_parse([chat.prompt])
        job = Job(picture, chat.prompt, generation_options, deadline=accepted + options.request_timeout_s)
        ident = openai_api.new_id()

        def finished(result, generation) -> dict:
            metrics.record_generation(time.monotonic() - accepted, len(generation.token_ids),
                                      generation.timings.decode_tokens_per_s)
            return result.to_dict()

        if not chat.stream:
            async for kind, value in _events(job):
                if kind == "result":
                    return openai_api.completion(ident, served_id, finished(*value), prompt_tokens)
                if kind == "error":
                    status, message = value
                    return _error(status, message, openai_api.CHAT_PATH)

        async def chunks():
            stamp = int(time.time())
            data = lambda payload: f"data: {json.dumps(payload)}\n\n"
            yield data(openai_api.chunk(ident, served_id, {"role": "assistant", "content": ""}, created=stamp))
            async for kind, value in _events(job):
                if kind == "token":
                    if value.text:
                        yield data(openai_api.chunk(ident, served_id, {"content": value.text}, created=stamp))
                elif kind == "result":
                    result = finished(*value)
                    yield data(openai_api.chunk(ident, served_id, openai_api.objects(result),
                                                openai_api.FINISH[result["finish_reason"]], created=stamp))
                    if chat.include_usage:
                        yield data({**openai_api.chunk(ident, served_id, {}, created=stamp), "choices": [],
                                    "usage": openai_api.usage(prompt_tokens, len(result["token_ids"]))})
                    yield "data: [DONE]\n\n"
                else:
                    yield data(openai_api.error_body(*value)[1])

        return StreamingResponse(chunks(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app


def _static(name: str) -> Response:
    body = resources.files("paligemma_edge.apps").joinpath("static").joinpath(name).read_bytes()
    return Response(body, media_type=STATIC_FILES[name], headers={"Cache-Control": "no-cache"})


def _check_port(host: str, port: int) -> None:
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as exc:
        raise InputError(f"cannot listen on {host}:{port} ({exc.strerror or exc})") from None


def serve(options: ServerOptions, progress=print) -> int:
    """Load the bundle once and serve until interrupted."""
    import uvicorn

    token = options.token or os.environ.get("PALIGEMMA_EDGE_TOKEN") or None
    options = ServerOptions(**{**options.__dict__, "token": token})
    if not 0 < options.port < 65536:
        raise InputError(f"--port must be 1..65535, got {options.port}")
    _check_port(options.host, options.port)
    progress(f"loading {options.bundle} ({options.backend})")
    model = load(options.bundle, backend=options.backend, verify=options.verify, threads=options.threads)
    app = create_app(model, options)
    where = f"[{options.host}]" if ":" in options.host else options.host
    progress(f"serving on http://{where}:{options.port}/ (API: /v1/generate, /v1/chat/completions, /v1/info, /metrics; "
             f"{'bearer token required' if token else 'no token'}); Ctrl-C stops")
    server = uvicorn.Server(uvicorn.Config(app, host=options.host, port=options.port, log_level="warning",
                                           timeout_graceful_shutdown=5))
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn shuts down gracefully, then re-raises the signal: a normal stop
        pass
    finally:
        model.close()
    progress("stopped")
    return 0
