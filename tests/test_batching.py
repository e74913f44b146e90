"""Dynamic batching: requests run together answer exactly as they do alone, and a row that ends
(finished, cancelled, out of time) leaves the others running and stops costing decode work."""

from __future__ import annotations

import time

import numpy as np
import pytest
from PIL import Image

from paligemma_edge.apps.worker import Cancelled, DeadlineExceeded, Job, ModelWorker
from paligemma_edge.runtime.model import load
from paligemma_edge.runtime.generation.sampling import GenerationOptions

from .conftest import MAX_SEQ_LEN

# (prompt, options): different tasks (so different prompt lengths: left padding), budgets and sampling
REQUESTS = [
    ("caption en", GenerationOptions(max_new_tokens=12)),
    ("detect cat ; dog", GenerationOptions(max_new_tokens=5)),
    ("answer en what colour is the big square on the left", GenerationOptions(max_new_tokens=9)),
    ("describe en", GenerationOptions(max_new_tokens=7, temperature=0.8, top_p=0.9, seed=3)),
    ("ocr", GenerationOptions(max_new_tokens=3)),
    ("caption es", GenerationOptions(max_new_tokens=10, temperature=1.2, top_k=20, seed=11)),
]


def pictures(count: int) -> list[Image.Image]:
    rng = np.random.default_rng(5)
    return [Image.fromarray(rng.integers(0, 256, (20 + 3 * i, 30 - i, 3), dtype=np.uint8)) for i in range(count)]


class RowCounter:
    """The real backend, recording how many rows each decoder step ran (to see dropped rows)."""

    def __init__(self, backend):
        self.backend = backend
        self.rows_per_step: list[int] = []

    def __getattr__(self, name):
        return getattr(self.backend, name)

    def step(self, inputs_embeds, masks, position_ids, cache):
        self.rows_per_step.append(len(inputs_embeds))
        return self.backend.step(inputs_embeds, masks, position_ids, cache)


@pytest.fixture(scope="module", params=[(1, 28), (2, 28)], ids=["pg1", "pg2"])
def model(request, bundles):
    with load(bundles[request.param]) as loaded:
        yield loaded


def alone(model, image, prompt, options):
    return model.generate_batch([image], [prompt], options)[0]


def test_per_row_options_decode_as_alone(model):
    """One batch, one picture and one set of decoding options per row: every row's tokens (greedy and
    seeded sampling) equal the same request run alone, and rows that finish leave the cache."""
    images = pictures(len(REQUESTS))
    prompts = [p for p, _ in REQUESTS]
    options = [o for _, o in REQUESTS]
    expected = [alone(model, i, p, o) for i, p, o in zip(images, prompts, options)]
    counter = RowCounter(model.backend)
    model.backend = counter
    try:
        batched = model.generate_batch(images, prompts, options)
    finally:
        model.backend = counter.backend
    for want, got in zip(expected, batched):
        assert got.token_ids == want.token_ids, got.prompt
        assert got.finish_reason == want.finish_reason
    # prefill with every row, then each decode step runs only the rows still generating
    lengths = [len(g.token_ids) + (g.finish_reason == "eos") for g in expected]
    assert counter.rows_per_step[0] == len(REQUESTS)
    for step, rows in enumerate(counter.rows_per_step[1:], start=1):
        assert rows == sum(length > step for length in lengths)


def test_worker_batches_waiting_requests(model):
    """Requests that wait together run as one batch, streamed and not, each answer its own."""
    images = pictures(len(REQUESTS))
    expected = [alone(model, i, p, o) for i, (p, o) in zip(images, REQUESTS)]
    worker = ModelWorker(model, max_queue=16, max_batch=4, batch_wait_ms=2000)
    try:
        streamed: dict[int, list] = {row: [] for row in range(len(REQUESTS))}
        jobs = []
        for row, (image, (prompt, options)) in enumerate(zip(images, REQUESTS)):
            on_token = streamed[row].append if row % 2 else None
            jobs.append(Job(image, prompt, options, deadline=time.monotonic() + 120, on_token=on_token))
        futures = [worker.submit(job) for job in jobs]
        results = [future.result(timeout=120) for future in futures]
    finally:
        worker.close()
    for row, ((result, generation), want) in enumerate(zip(results, expected)):
        assert generation.token_ids == want.token_ids
        if row % 2:
            assert tuple(c.token_id for c in streamed[row]) == want.token_ids
            assert "".join(c.text for c in streamed[row]) == want.text
    assert worker.stats.requests == len(REQUESTS)
    assert worker.stats.batches == 2 and worker.stats.largest == 4  # 4, then the 2 left


def test_cancelled_and_expired_rows_leave_the_rest_running(model):
    images = pictures(3)
    long = GenerationOptions(max_new_tokens=20)
    want = [alone(model, image, "caption en", long) for image in images]
    worker = ModelWorker(model, max_batch=8, batch_wait_ms=2000)
    try:
        seen: list = []

        def leave_after_two(chunk):  # the client goes away mid-answer
            seen.append(chunk)
            if len(seen) == 2:
                quitter.cancelled.set()

        quitter = Job(images[0], "caption en", long, deadline=time.monotonic() + 120, on_token=leave_after_two)
        late = Job(images[1], "caption en", long, deadline=time.monotonic() - 1)  # out of time before it ran
        stays = Job(images[2], "caption en", long, deadline=time.monotonic() + 120)
        futures = [worker.submit(job) for job in (quitter, late, stays)]
        with pytest.raises(Cancelled):
            futures[0].result(timeout=120)
        with pytest.raises(DeadlineExceeded) as expired:
            futures[1].result(timeout=120)
        assert not expired.value.started
        assert futures[2].result(timeout=120)[1].token_ids == want[2].token_ids
    finally:
        worker.close()
    assert len(seen) <= 3  # the cancelled row stopped within a step
    if len(want[0].token_ids) > 3:
        assert len(seen) < len(want[0].token_ids)


def test_a_request_the_batch_would_cut_short_waits_for_the_next(model):
    """Left padding widens every row to the longest prompt; a row whose budget that would cut (the
    bundle's max sequence) runs in a later batch and still gets its whole answer."""
    images = pictures(2)
    long_prompt = "answer en " + " ".join(["what"] * 30)
    width = len(model.tokenizer.encode(long_prompt))
    short_len = len(model.tokenizer.encode("caption en"))
    assert width < MAX_SEQ_LEN and MAX_SEQ_LEN - width < MAX_SEQ_LEN - short_len
    generous = GenerationOptions(max_new_tokens=MAX_SEQ_LEN)  # alone: up to the bundle's max sequence
    requests = [(images[0], long_prompt, GenerationOptions(max_new_tokens=4)), (images[1], "caption en", generous)]
    want = [alone(model, *request) for request in requests]
    worker = ModelWorker(model, max_batch=8, batch_wait_ms=2000)
    try:
        futures = [worker.submit(Job(i, p, o, deadline=time.monotonic() + 120)) for i, p, o in requests]
        got = [future.result(timeout=120)[1] for future in futures]
    finally:
        worker.close()
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
    assert worker.stats.batches == 2


def test_a_client_leaving_after_its_answer_does_not_disturb_the_batch(model):
    """A streaming client closes once it has its answer (the server then marks its job cancelled) while
    its batch still runs longer rows: the finished row is not failed twice, the others finish."""
    images = pictures(2)
    short, long = GenerationOptions(max_new_tokens=2), GenerationOptions(max_new_tokens=16)
    want = alone(model, images[1], "caption en", long)
    worker = ModelWorker(model, max_batch=8, batch_wait_ms=2000)
    try:
        quick = Job(images[0], "caption en", short, deadline=time.monotonic() + 120, on_token=lambda chunk: None)
        slow = Job(images[1], "caption en", long, deadline=time.monotonic() + 120)
        futures = [worker.submit(job) for job in (quick, slow)]
        futures[0].add_done_callback(lambda _: quick.cancelled.set())
        assert len(futures[0].result(timeout=120)[1].token_ids) <= 2
        assert futures[1].result(timeout=120)[1].token_ids == want.token_ids
        assert worker.stats.batches == 1
    finally:
        worker.close()
