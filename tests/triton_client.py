"""tritonclient's side of tests/test_triton.py, run by the Triton venv's Python (numpy<2, tritonclient).

Reads a plan (JSON) on stdin, prints the answers (JSON) on stdout. A request is a dict of input
name -> value: ``IMAGE`` is a file path (its bytes are sent), strings go as BYTES, ints as the
config's integer types, floats as FP32; the key ``parameters`` (a dict) goes as the request's
Triton parameters. An answer is ``{"text", "token_ids", "result"}`` or ``{"error", "status"}``.
Steps:

- ``{"kind": "infer", "requests": [...]}``: one after another over HTTP;
- ``{"kind": "rows", "request": {...}}``: one request whose values are lists, one item per row;
- ``{"kind": "concurrent", "requests": [...]}``: one thread (and client) per request, started together;
- ``{"kind": "stats", "model": "stream_model", "grown_by": 16}``: the model's (default: the batched
  one's) inference and execution counts; with ``grown_by``, read again (up to 30 s) until the inference
  count is that much above the plan's previous stats step: Triton counts an execution's requests when
  it returns, which can be after the client has its answers;
- ``{"kind": "stream", "request": {...}}``: gRPC streaming of one request to the stream model; the
  answers are every response in order;
- ``{"kind": "concurrent_stream", "requests": [...], "cancel_after": {"3": 2}}``: one thread (and
  gRPC stream) per request, started together; request 3 cancels its stream after 2 responses (its
  answers end there) and the others are waited for to the final response.
"""

from __future__ import annotations

import json
import queue
import sys
import threading
import time
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

INTEGER_TYPES = {"MAX_NEW_TOKENS": ("INT32", np.int32), "TOP_K": ("INT32", np.int32), "SEED": ("INT64", np.int64)}


def inputs(module, request: dict) -> list:
    """Triton inputs of shape [rows, 1]: a value is one row, a list of values is several."""
    out = []
    for name, value in request.items():
        if name == "parameters":
            continue
        rows = value if isinstance(value, list) else [value]
        if name == "IMAGE":
            array, datatype = np.array([[Path(v).read_bytes()] for v in rows], dtype=np.object_), "BYTES"
        elif isinstance(rows[0], str):
            array, datatype = np.array([[v.encode("utf-8")] for v in rows], dtype=np.object_), "BYTES"
        elif name in INTEGER_TYPES:
            datatype, dtype = INTEGER_TYPES[name]
            array = np.array([[v] for v in rows], dtype=dtype)
        else:
            array, datatype = np.array([[v] for v in rows], dtype=np.float32), "FP32"
        tensor = module.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array)
        out.append(tensor)
    return out


def answer(result, row: int = 0) -> dict:
    raw = result.as_numpy("RESULT")[row, 0]
    return {"text": result.as_numpy("TEXT")[row, 0].decode("utf-8"),
            "token_ids": [int(t) for t in result.as_numpy("TOKEN_IDS")[row] if t >= 0],
            "result": json.loads(raw) if raw else None}


def infer_rows(url: str, model: str, request: dict) -> list[dict] | dict:
    """One request of several rows: each row's answer, or the request's error."""
    client = httpclient.InferenceServerClient(url)
    try:
        result = client.infer(model, inputs(httpclient, request), parameters=request.get("parameters"))
        return [answer(result, row) for row in range(result.as_numpy("TEXT").shape[0])]
    except InferenceServerException as exc:
        return refusal(exc)
    finally:
        client.close()


def refusal(exc: InferenceServerException) -> dict:
    return {"error": exc.message(), "status": exc.status()}


def infer(url: str, model: str, request: dict) -> dict:
    client = httpclient.InferenceServerClient(url)
    try:
        return answer(client.infer(model, inputs(httpclient, request), parameters=request.get("parameters")))
    except InferenceServerException as exc:
        return refusal(exc)
    finally:
        client.close()


def concurrent(url: str, model: str, requests: list[dict], call=None) -> list:
    """``call(url, model, index, request)`` (default: infer) for each request, all started together."""
    call = call or (lambda url, model, index, request: infer(url, model, request))
    answers: list = [None] * len(requests)
    start = threading.Barrier(len(requests))

    def one(index: int) -> None:
        start.wait()
        answers[index] = call(url, model, index, requests[index])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    return answers


def stats(url: str, model: str) -> dict:
    client = httpclient.InferenceServerClient(url)
    (entry,) = client.get_inference_statistics(model)["model_stats"]
    client.close()
    return {"inference_count": int(entry["inference_count"]), "execution_count": int(entry["execution_count"])}


def stream(url: str, model: str, request: dict, cancel_after: int | None = None) -> list[dict]:
    events: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    client.start_stream(callback=lambda result, error: events.put((result, error)))
    client.async_stream_infer(model, inputs(grpcclient, request), enable_empty_final_response=True,
                              parameters=request.get("parameters"))
    answers: list[dict] = []
    while True:
        if cancel_after is not None and len(answers) >= cancel_after:
            client.stop_stream(cancel_requests=True)
            client.close()
            return answers
        result, error = events.get(timeout=120)
        if error is not None:
            answers.append(refusal(error))
            break
        response = result.get_response()
        if response.outputs:
            answers.append(answer(result))
        if response.parameters["triton_final_response"].bool_param:
            break
    client.stop_stream()
    client.close()
    return answers


def main() -> None:
    plan = json.load(sys.stdin)
    out: list[object] = []  # one JSON value per step, of the step's own shape
    previous: dict | None = None  # the counts of the last stats step
    for step in plan["steps"]:
        kind = step["kind"]
        if kind == "infer":
            out.append([infer(plan["http"], plan["model"], r) for r in step["requests"]])
        elif kind == "rows":
            out.append(infer_rows(plan["http"], plan["model"], step["request"]))
        elif kind == "concurrent":
            out.append(concurrent(plan["http"], plan["model"], step["requests"]))
        elif kind == "stats":
            model = plan[step.get("model", "model")]
            counts = stats(plan["http"], model)
            if "grown_by" in step and previous is not None:
                deadline = time.monotonic() + 30
                while counts["inference_count"] < previous["inference_count"] + step["grown_by"] \
                        and time.monotonic() < deadline:
                    time.sleep(0.2)
                    counts = stats(plan["http"], model)
            out.append(counts)
            previous = counts
        elif kind == "concurrent_stream":
            cancel = {int(k): v for k, v in step.get("cancel_after", {}).items()}
            out.append(concurrent(plan["grpc"], plan["stream_model"], step["requests"],
                                  lambda url, model, i, r: stream(url, model, r, cancel.get(i))))
        elif kind == "stream":
            out.append(stream(plan["grpc"], plan["stream_model"], step["request"]))
        else:
            raise SystemExit(f"unknown step {kind!r}")
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
