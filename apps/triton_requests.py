"""What one row of a Triton request asks for, and how a batch of rows runs as one batched generation.

Kept free of Triton so it can be tested with a loaded bundle alone; ``triton_model.py`` adapts it
to Triton's Python backend. Decided here:

- A row is an image (bytes) and either a ``PROMPT`` or a ``TASK`` with ``LANG`` / ``QUESTION`` /
  ``OBJECTS`` (the same rule as ``serve``, through ``resolve_prompt``), plus decoding options, each
  from its input (that row's value) or from the request parameter of the same option (every row
  of the request), not both. Every check that can fail for one row (unreadable or too large image,
  prompt and task both or neither, unknown task, prompt too long for the bundle, a segment prompt
  on a bundle without a mask decoder, out-of-range options, unknown parameters) runs before any
  generation, so one bad row fails alone.
- All checked rows of a batch run as one batched generation with per-row options: each row keeps
  its own token budget and, when sampling, its own random stream seeded by its own ``SEED``
  (``runtime.sampling.Sampler``), so its answer is the one it gets alone, whatever Triton batched
  with it; rows that finish leave the cache, so a short answer costs no decode work afterwards.
- Streaming (``stream_items``) runs the same batch through ``PaliGemma.stream_batch``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Callable, Generator, Iterable, Mapping, Sequence, Union

from PIL import Image

from ..runtime.errors import InputError
from ..runtime.images import load_image
from ..runtime.model import PaliGemma, TaskResult
from ..runtime.generation.results import Generation, TokenChunk
from ..runtime.generation.sampling import GenerationOptions
from ..runtime.generation.tasks import resolve_prompt
from .triton_io import IMAGE, OPTION_FIELDS, PARAMETERS, TEXT_FIELDS, ServingLimits

log = logging.getLogger("paligemma_edge.triton")

INTEGER_OPTIONS = {"max_new_tokens", "top_k", "seed"}


@dataclass(frozen=True)
class Item:
    """One row, checked: the upright RGB image, the prompt text and its decoding options."""

    image: Image.Image
    prompt: str
    options: GenerationOptions


Outcome = Union[TaskResult, InputError, Exception]


def _text(value, name: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise InputError(f"{name} is not UTF-8 text") from None
    return str(value)


def request_parameters(text: str | None) -> dict[str, object]:
    """A request's parameters (the JSON object the Python backend's ``request.parameters()`` gives)
    -> the decoding options they set. Keys Triton itself adds (``triton_...``, e.g. gRPC streaming's
    ``triton_enable_empty_final_response``) are not the model's and are skipped; any other key that
    is not an option is refused, so a misspelt option is not silently ignored."""
    values = json.loads(text) if text else {}
    if not isinstance(values, dict):
        raise InputError("the request's parameters are not a JSON object")
    options = {}
    for key, value in values.items():
        if key.startswith("triton_"):
            continue
        if key not in PARAMETERS:
            raise InputError(f"unknown request parameter '{key}'; decoding options are: {', '.join(PARAMETERS)}")
        options[key] = value
    return options


def _number(value, name: str, integer: bool):
    """An option's value as int or float; numeric strings too (gRPC clients without double parameters)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise InputError(f"{name} must be a number, got {value!r}")
    if isinstance(value, int):  # kept exact: a SEED may need all 64 bits
        return value if integer else float(value)
    try:
        number = int(value) if integer and isinstance(value, str) else float(value)
    except ValueError:
        raise InputError(f"{name} must be {'an integer' if integer else 'a number'}, got {value!r}") from None
    if integer and not float(number).is_integer():
        raise InputError(f"{name} must be an integer, got {value!r}")
    return int(number) if integer else number


def options_from(fields: Mapping[str, object], limits: ServingLimits,
                 parameters: Mapping[str, object] | None = None) -> GenerationOptions:
    """The row's decoding options from its inputs and its request's parameters (one source per
    option); absent options take GenerationOptions' defaults (greedy)."""
    parameters = parameters or {}
    values = {}
    for name, (_, option) in OPTION_FIELDS.items():
        given = fields.get(name)
        if given is not None and option in parameters:
            raise InputError(f"{name} is given both as an input and as the '{option}' parameter: give one")
        source = name if given is not None else option
        value = given if given is not None else parameters.get(option)
        if value is not None:
            values[option] = _number(value, source, option in INTEGER_OPTIONS)
    values.setdefault("max_new_tokens", limits.default_max_new_tokens)
    if values["max_new_tokens"] > limits.max_new_tokens:
        raise InputError(f"max_new_tokens is {values['max_new_tokens']}; this model allows at most "
                         f"{limits.max_new_tokens}")
    return GenerationOptions(**values)


def parse_item(model: PaliGemma, fields: Mapping[str, object], limits: ServingLimits,
               parameters: Mapping[str, object] | None = None) -> Item:
    """A row's fields (input name -> bytes or number, absent inputs missing) and its request's
    parameters (from ``request_parameters``) -> a checked Item."""
    data = fields.get(IMAGE)
    if not isinstance(data, (bytes, bytearray)) or not data:
        raise InputError("IMAGE is empty: send the picture's file bytes")
    image = load_image(bytes(data), max_pixels=limits.max_image_pixels, name="IMAGE")
    text = {name: _text(fields.get(name), name) for name in TEXT_FIELDS}
    prompt = resolve_prompt(text["PROMPT"], text["TASK"], text["LANG"], text["QUESTION"], text["OBJECTS"])
    options = options_from(fields, limits, parameters)
    model.tokenizer.encode(prompt)  # too long for the bundle: this row's error, before generating
    model.check_can_parse([prompt])
    return Item(image, prompt, options)


def _structure(model: PaliGemma, generation: Generation, item: Item) -> Outcome:
    """The row's result (parsed for detect/segment prompts), or the error that parsing it raised."""
    try:
        return model.structure(generation, *item.image.size)
    except InputError as exc:
        return exc
    except Exception as exc:  # a bug or a mask-decoder failure: this row fails, the others answer
        log.error("structuring an answer failed", exc_info=exc)
        return exc


def _batch(items: Sequence[Item]) -> tuple[list, list[str], list[GenerationOptions]]:
    return [it.image for it in items], [it.prompt for it in items], [it.options for it in items]


def run_items(model: PaliGemma, items: Sequence[Item | None]) -> list[Outcome | None]:
    """Each checked row's result, all rows generated as one batch with their own options; None where
    the row was None. If the generation itself fails, every row gets its error."""
    rows = [index for index, item in enumerate(items) if item is not None]
    outcomes: list[Outcome | None] = [None] * len(items)
    if not rows:
        return outcomes
    checked = [item for item in items if item is not None]
    try:
        generations = model.generate_batch(*_batch(checked))
        results = [_structure(model, g, it) for g, it in zip(generations, checked)]
    except InputError as exc:
        results = [exc] * len(rows)
    except Exception as exc:  # a bug or a backend failure: the batch's rows fail, the model goes on
        log.error("generation failed", exc_info=exc)
        results = [exc] * len(rows)
    for index, result in zip(rows, results):
        outcomes[index] = result
    return outcomes


def stream_items(model: PaliGemma, items: Sequence[Item], stop: Callable[[], Iterable[int]] | None = None
                 ) -> Generator[tuple[int, TokenChunk], None, list[Outcome]]:
    """Stream checked rows as one batch with their own options: yields ``(row, chunk)`` as tokens
    come and returns each row's result (a row ended by ``stop`` gets what it had). A failure of the
    generation itself propagates (the caller answers every unfinished row with it)."""
    with model.stream_batch(*_batch(items), stop=stop) as rows:
        for row, item in rows:
            if isinstance(item, TokenChunk):
                yield row, item
        generations = rows.result
    return [_structure(model, g, it) for g, it in zip(generations, items)]
