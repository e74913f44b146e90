"""OpenAI's Chat Completions schema <-> serve's generation: request parsing, answers, chunks, errors.

PaliGemma has no chat template: a request is ONE user message with ONE picture, and the user's
text is the PaliGemma prompt as it is (``detect cat ; dog`` works). System / developer messages
are ignored; earlier turns (assistant or more user messages) are refused. No I/O here except the
bounded fetch of a remote picture, which the server only does with ``--allow-remote-images``.
"""

from __future__ import annotations

import base64
import binascii
import secrets
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

CHAT_PATH = "/v1/chat/completions"
MODELS_PATH = "/v1/models"
ROUTES = (CHAT_PATH, MODELS_PATH)
REMOTE_IMAGE_TIMEOUT_S = 20.0
IGNORED = {"user", "metadata", "store", "service_tier", "parallel_tool_calls", "safety_identifier",
           "prompt_cache_key", "stream_options"}
NEUTRAL = {"frequency_penalty": (0, 0.0, None), "presence_penalty": (0, 0.0, None), "logprobs": (False, None),
           "stop": (None, [], ""), "tools": (None, []), "tool_choice": (None, "none", "auto"), "functions": (None, []),
           "logit_bias": (None, {}), "top_logprobs": (None, 0), "modalities": (None, ["text"]),
           "response_format": (None, {"type": "text"}), "n": (None, 1)}
KNOWN = {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "stream"}
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
          411: "invalid_request_error", 413: "invalid_request_error", 499: "invalid_request_error",
          503: "server_error", 504: "server_error"}


class ChatRequestError(Exception):
    """A request refused in OpenAI's terms: status, message, and the parameter it is about."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> tuple[int, dict]:
    """Our status and message -> OpenAI's (status, error object). Our 415 (not an image) and 422 (bad
    field) are 400 there: that is what OpenAI answers for any invalid request (BadRequestError)."""
    if status in (415, 422):
        code = code or ("invalid_image" if status == 415 else None)
        status = 400
    kind = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return status, {"error": {"message": message, "type": kind, "param": param, "code": code}}


@dataclass(frozen=True)
class ChatRequest:
    prompt: str
    image_url: str
    max_new_tokens: int | None
    temperature: float
    top_p: float
    seed: int | None
    stream: bool
    include_usage: bool


def _number(body: dict, name: str, default, kind=(int, float)):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, kind):
        raise ChatRequestError(400, f"{name} must be a {'integer' if kind is int else 'number'}, got {value!r}", name)
    return value


def _user_parts(content, where: str) -> tuple[list[str], list[str]]:
    if isinstance(content, str):
        return [content], []
    if not isinstance(content, list):
        raise ChatRequestError(400, f"{where}.content must be a string or a list of content parts", where)
    texts, images = [], []
    for index, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url" and isinstance(part.get("image_url"), dict) \
                and isinstance(part["image_url"].get("url"), str):
            images.append(part["image_url"]["url"])
        else:
            raise ChatRequestError(400, f"{where}.content[{index}]: only 'text' and 'image_url' parts are supported",
                                   f"{where}.content")
    return texts, images


def parse_chat_request(body, served_id: str) -> ChatRequest:
    """A decoded JSON body -> what to generate; refuses what PaliGemma cannot honour."""
    if not isinstance(body, dict):
        raise ChatRequestError(400, "the request body must be a JSON object")
    for name in body:
        if name in KNOWN or name in IGNORED:
            continue
        if name in NEUTRAL:
            if body[name] not in NEUTRAL[name]:
                raise ChatRequestError(400, f"{name}={body[name]!r} is not supported by this server"
                                       + (" (one choice per request)" if name == "n" else ""), name)
            continue
        raise ChatRequestError(400, f"unrecognized request argument: {name}", name)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ChatRequestError(400, "give 'model' (GET /v1/models lists it)", "model")
    if model != served_id:
        raise ChatRequestError(404, f"model '{model}' is not served here; this server serves '{served_id}'",
                               "model", "model_not_found")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ChatRequestError(400, "messages must be a non-empty list", "messages")
    texts, images, users = [], [], 0
    for index, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if role in ("system", "developer"):
            continue  # PaliGemma has no system prompt: ignored (documented)
        if role != "user":
            raise ChatRequestError(400, f"messages[{index}]: role {role!r} is not supported; PaliGemma answers one "
                                   "user message (its prompt and one picture), not a conversation", "messages")
        users += 1
        if users > 1:
            raise ChatRequestError(400, "send one user message: PaliGemma has no chat template, so earlier turns "
                                   "cannot be given to it", "messages")
        part_texts, part_images = _user_parts(message.get("content"), f"messages[{index}]")
        texts += part_texts
        images += part_images
    if users == 0:
        raise ChatRequestError(400, "no user message: its text is the PaliGemma prompt", "messages")
    if len(images) != 1:
        raise ChatRequestError(400, f"the user message has {len(images)} images; PaliGemma needs exactly one "
                               "(an image_url part)", "messages")
    prompt = " ".join(t.strip() for t in texts if t.strip())
    if not prompt:
        raise ChatRequestError(400, "the user message has no text: it is the PaliGemma prompt (e.g. 'caption en')",
                               "messages")
    given = {name: _number(body, name, None, int) for name in ("max_completion_tokens", "max_tokens")}
    present = {v for v in given.values() if v is not None}
    if len(present) > 1:
        raise ChatRequestError(400, "max_tokens and max_completion_tokens differ; give one", "max_completion_tokens")
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise ChatRequestError(400, "stream must be true or false", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ChatRequestError(400, "stream_options must be an object", "stream_options")
    return ChatRequest(
        prompt=prompt, image_url=images[0], max_new_tokens=present.pop() if present else None,
        temperature=float(_number(body, "temperature", 0.0)), top_p=float(_number(body, "top_p", 1.0)),
        seed=_number(body, "seed", None, int), stream=stream, include_usage=bool(options.get("include_usage")),
    )


def image_bytes(url: str, max_bytes: int, allow_remote: bool) -> bytes:
    """An image_url -> the picture's bytes: ``data:image/...;base64,`` URLs, or (only when allowed) a
    bounded http(s) fetch. Raises ChatRequestError (400 bad URL, 413 too big)."""
    if url.startswith("data:"):
        header, comma, payload = url[5:].partition(",")
        if not comma or not header.endswith(";base64") or not header.startswith("image/"):
            raise ChatRequestError(400, "image_url data URLs must be data:image/...;base64,...", "messages")
        if len(payload) > (max_bytes + 2) // 3 * 4 + 4:
            raise ChatRequestError(413, f"the image is over {max_bytes} bytes")
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise ChatRequestError(400, "the image_url data URL is not valid base64", "messages") from None
    elif url.startswith(("http://", "https://")):
        if not allow_remote:
            raise ChatRequestError(400, "remote image URLs are refused (this server is offline): send the picture as "
                                   "a data:image/...;base64 URL, or start serve with --allow-remote-images", "messages")
        data = _fetch(url, max_bytes)
    else:
        raise ChatRequestError(400, "image_url must be a data: URL (or http(s) with --allow-remote-images)", "messages")
    if len(data) > max_bytes:
        raise ChatRequestError(413, f"the image is over {max_bytes} bytes")
    return data


def _fetch(url: str, max_bytes: int) -> bytes:
    deadline = time.monotonic() + REMOTE_IMAGE_TIMEOUT_S
    try:
        with urllib.request.urlopen(url, timeout=REMOTE_IMAGE_TIMEOUT_S) as answer:
            chunks, size = [], 0
            while chunk := answer.read(65536):
                size += len(chunk)
                if size > max_bytes:
                    raise ChatRequestError(413, f"the remote image is over {max_bytes} bytes")
                if time.monotonic() > deadline:
                    raise ChatRequestError(400, f"fetching the remote image took over {REMOTE_IMAGE_TIMEOUT_S:.0f} s")
                chunks.append(chunk)
            return b"".join(chunks)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise ChatRequestError(400, f"cannot fetch the image_url ({getattr(exc, 'reason', exc)})", "messages") from None


FINISH = {"eos": "stop", "length": "length", "max_seq_len": "length"}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def objects(result: dict) -> dict:
    """The detections / segmentations of a result (same JSON as /v1/generate), for the message."""
    return {key: result[key] for key in ("detections", "segmentations") if key in result}


def new_id() -> str:
    return "chatcmpl-" + secrets.token_hex(12)


def completion(ident: str, model: str, result: dict, prompt_tokens: int) -> dict:
    message = {"role": "assistant", "content": result["text"], "refusal": None} | objects(result)
    return {"id": ident, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": message, "finish_reason": FINISH[result["finish_reason"]],
                         "logprobs": None}],
            "usage": usage(prompt_tokens, len(result["token_ids"]))}


def chunk(ident: str, model: str, delta: dict, finish_reason: str | None = None, created: int | None = None) -> dict:
    return {"id": ident, "object": "chat.completion.chunk", "created": created or int(time.time()), "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]}


def models(served_id: str, checkpoint: str, created: int) -> dict:
    return {"object": "list", "data": [{"id": served_id, "object": "model", "created": created,
                                        "owned_by": "paligemma-edge", "checkpoint": checkpoint}]}
