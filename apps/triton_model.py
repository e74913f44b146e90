"""The Triton Python-backend model of a ``triton-repo`` repository (its model.py imports this class).

It only runs inside Triton's Python-backend stub, which provides ``triton_python_backend_utils``.
Decided here:

- ``initialize`` loads the bundle named by config.pbtxt's ``bundle`` parameter (a relative path is
  taken from the model's version folder) on the ``backend`` parameter's runtime backend. A
  KIND_GPU instance sees only the GPU Triton placed it on (``CUDA_VISIBLE_DEVICES`` of its own
  stub process), so the runtime's device 0 is that GPU.
- ``execute`` gets Triton's dynamic batch as a list of requests, each of one or more rows (the
  batch dimension). All rows are checked, then run by ``run_items`` as one batched generation with
  per-row decoding options. A request whose row fails gets that row's error as its Triton error;
  the other requests of the batch still get their answers. Decoding options come from the
  optional inputs or from request parameters (``request.parameters()``); Triton's dynamic batcher
  puts together only requests that send the same set of inputs, and parameters are not inputs.
- Outputs per row: ``TEXT`` (the answer), ``TOKEN_IDS`` (generated ids, eos excluded; rows of one
  request padded with -1 to the longest) and ``RESULT`` (the JSON object ``run --json`` prints).
- Decoupled mode (``triton-repo --stream``): a streamed request is one row; the requests of one
  ``execute`` stream as one batch (``stream_items``), each row's chunks going to its own request's
  sender: one response per token with that token's id and the text it completes (``RESULT``
  empty), then, when the batch's generation ends, one with the whole answer in all three outputs,
  then the final flag. A request the client cancels (``is_cancelled()``, asked after each step)
  leaves the batch at once and gets only the final flag; so does one whose sender fails.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils  # type: ignore[import-not-found]  # only in Triton's stub

from ..runtime.errors import InputError, first_line
from ..runtime.generation.streams import Stream
from ..runtime.model import load
from .triton_io import IMAGE, INPUTS, ServingLimits
from .triton_requests import Item, parse_item, request_parameters, run_items, stream_items


def _parameters(config: dict) -> dict[str, str]:
    return {key: value["string_value"] for key, value in config.get("parameters", {}).items()}


def _checked(model, request, limits: ServingLimits) -> list[Item]:
    """A request's rows, parsed and checked (its InputError otherwise)."""
    parameters = request_parameters(request.parameters())
    return [parse_item(model, fields, limits, parameters) for fields in _rows(request)]


def _rows(request) -> list[dict]:
    """A request's rows: one dict of input name -> bytes or number per batch row."""
    tensors = {}
    for name in INPUTS:
        tensor = pb_utils.get_input_tensor_by_name(request, name)
        if tensor is not None:
            tensors[name] = tensor.as_numpy()
    if IMAGE not in tensors:
        raise InputError("IMAGE is missing")
    count = tensors[IMAGE].shape[0]
    for name, array in tensors.items():
        if array.shape[0] != count:
            raise InputError(f"{name} has {array.shape[0]} rows and IMAGE {count}: give one value per row")
    return [{name: _value(array, row) for name, array in tensors.items()} for row in range(count)]


def _value(array: np.ndarray, row: int):
    """A row's value of a [rows, 1] input: bytes for BYTES, a Python number otherwise."""
    value = array.reshape(array.shape[0], -1)[row, 0]
    return value if array.dtype == np.object_ else value.item()


def _strings(name: str, values: list[str]) -> "pb_utils.Tensor":
    return pb_utils.Tensor(name, np.array([[v.encode("utf-8")] for v in values], dtype=np.object_))


def _ids(rows: list[tuple[int, ...]]) -> "pb_utils.Tensor":
    width = max(1, max(len(r) for r in rows))
    out = np.full((len(rows), width), -1, dtype=np.int32)
    for index, row in enumerate(rows):
        out[index, :len(row)] = row
    return pb_utils.Tensor("TOKEN_IDS", out)


def _answer(results) -> "pb_utils.InferenceResponse":
    dicts = [r.to_dict() for r in results]
    return pb_utils.InferenceResponse(output_tensors=[
        _strings("TEXT", [d["text"] for d in dicts]),
        _ids([tuple(d["token_ids"]) for d in dicts]),
        _strings("RESULT", [json.dumps(d) for d in dicts]),
    ])


def _refusal(exc: Exception) -> "pb_utils.InferenceResponse":
    """The request's Triton error: INVALID_ARG (HTTP 400) with its one line for bad input, INTERNAL (500)
    without details for anything else (logged by run_items or the stream)."""
    if isinstance(exc, InputError):
        error = pb_utils.TritonError(first_line(exc), pb_utils.TritonError.INVALID_ARG)
    else:
        error = pb_utils.TritonError("internal error while generating", pb_utils.TritonError.INTERNAL)
    return pb_utils.InferenceResponse(output_tensors=[], error=error)


class TritonPythonModel:
    """One loaded bundle per model instance (Triton runs each instance in its own process)."""

    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        parameters = _parameters(config)
        if args.get("model_instance_kind") == "GPU":
            os.environ["CUDA_VISIBLE_DEVICES"] = str(args["model_instance_device_id"])
        bundle = Path(args["model_repository"]) / args["model_version"] / parameters["bundle"]
        threads = int(parameters["threads"]) if parameters.get("threads") else None
        self.model = load(bundle, backend=parameters["backend"], verify=parameters.get("verify") == "true",
                          threads=threads)
        self.limits = ServingLimits.from_parameters(parameters)
        self.decoupled = pb_utils.using_decoupled_model_transaction_policy(config)

    def execute(self, requests):
        if self.decoupled:
            self._stream(requests)
            return None
        parsed: list[tuple[int, int] | InputError] = []  # per request: (first row index, row count) or its error
        items: list[Item] = []
        for request in requests:
            try:
                rows = _checked(self.model, request, self.limits)
            except InputError as exc:
                parsed.append(exc)
                continue
            parsed.append((len(items), len(rows)))
            items += rows
        outcomes = run_items(self.model, items)
        responses = []
        for entry in parsed:
            if isinstance(entry, Exception):
                responses.append(_refusal(entry))
                continue
            start, count = entry
            mine = outcomes[start:start + count]
            failed = next((o for o in mine if isinstance(o, Exception)), None)
            responses.append(_refusal(failed) if failed is not None else _answer(mine))
        return responses

    def _stream(self, requests) -> None:
        """The decoupled batch: bad requests are refused at once, the rest stream as one batch."""
        streams: list[_Stream] = []
        items: list[Item] = []  # the row of each stream
        for request in requests:
            stream = _Stream(request)
            try:
                rows = _checked(self.model, request, self.limits)
                if len(rows) != 1:
                    raise InputError(f"a streamed request takes one row, got {len(rows)}")
            except InputError as exc:
                stream.finish(_refusal(exc))
                continue
            streams.append(stream)
            items.append(rows[0])
        if not streams:
            return

        def stop() -> list[int]:  # cancelled or unreachable requests leave the batch (and its cache)
            for stream in streams:
                if stream.open and stream.request.is_cancelled():
                    stream.finish()
            return [row for row, stream in enumerate(streams) if not stream.open]

        try:
            steps = Stream(stream_items(self.model, items, stop))
            for row, chunk in steps:
                streams[row].send(pb_utils.InferenceResponse(output_tensors=[
                    _strings("TEXT", [chunk.text]), _ids([(chunk.token_id,)]), _strings("RESULT", [""])]))
            outcomes = steps.result
        except Exception as exc:  # the batch's error for every open request; the model goes on serving
            if not isinstance(exc, InputError):
                pb_utils.Logger.log_error(f"generation failed: {exc!r}")
            for stream in streams:
                stream.finish(_refusal(exc))
            return
        for stream, outcome in zip(streams, outcomes):
            stream.finish(_refusal(outcome) if isinstance(outcome, Exception) else _answer([outcome]))

    def finalize(self) -> None:
        self.model.close()


class _Stream:
    """One streamed request: its sender, and whether it still takes responses. A send that fails
    (the client went away) closes it, so the batch's other requests go on."""

    def __init__(self, request):
        self.request = request
        self.sender = request.get_response_sender()
        self.open = True

    def send(self, response) -> None:
        if not self.open:
            return
        try:
            self.sender.send(response)
        except Exception as exc:  # pb_utils raises TritonModelException for a request that is gone
            pb_utils.Logger.log_warn(f"a streamed response could not be sent, ending that request: {exc}")
            self.finish()

    def finish(self, response=None) -> None:
        """The last response (or none) with the final flag; nothing more is sent after it."""
        if not self.open:
            return
        self.open = False
        try:
            self.sender.send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        except Exception as exc:
            pb_utils.Logger.log_warn(f"a streamed request could not be closed: {exc}")
