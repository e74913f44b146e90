"""A stream of chunks that keeps its final result: ``for chunk in stream``, then ``stream.result``.

What is decided here:
- A stream wraps a generator: its items are the chunks and its return value is the result, kept as
  ``.result`` so nobody has to catch ``StopIteration`` to get it.
- Nothing runs until the first chunk is asked for. ``close()`` (or leaving a ``with`` block) ends
  the generator where it stands: a generation then stops after the current step, with no result.
- ``drain()`` is the one way to run a stream to its end for its result alone; ``generate`` and
  ``generate_batch`` are drained streams, so there is a single generation path.
- Reading ``.result`` before the end is a mistake in the calling code: RuntimeError, which says why.
"""

from __future__ import annotations

from typing import Generator, Generic, TypeVar

ChunkT = TypeVar("ChunkT")
ResultT = TypeVar("ResultT")


class Stream(Generic[ChunkT, ResultT]):
    """Chunks as they come, and ``.result`` once they are all read.

    Also an ordinary iterator: ``next(stream)`` raises ``StopIteration(result)`` at the end."""

    def __init__(self, generator: Generator[ChunkT, None, ResultT]):
        self._generator = generator
        self._result: list[ResultT] = []  # the return value once the generator has ended; empty before
        self._closed = False

    def __iter__(self) -> Stream[ChunkT, ResultT]:
        return self

    def __next__(self) -> ChunkT:
        if self._result:
            raise StopIteration(self._result[0])
        if self._closed:
            raise StopIteration
        try:
            return next(self._generator)
        except StopIteration as done:
            self._result.append(done.value)
            raise StopIteration(done.value) from None

    @property
    def finished(self) -> bool:
        """Whether every chunk has been read (so ``result`` is there)."""
        return bool(self._result)

    @property
    def result(self) -> ResultT:
        """The final result; there once the stream has been read to its end."""
        if not self._result:
            why = "it was closed before its end" if self._closed else "read it to its end (or call drain()) first"
            raise RuntimeError(f"this stream has no result yet: {why}")
        return self._result[0]

    def drain(self) -> ResultT:
        """Read the chunks that are left, dropping them, and return the result."""
        for _ in self:
            pass
        return self.result

    def close(self) -> None:
        """Stop now (a generation stops after its current step); closing twice is harmless."""
        if not self._result:
            self._closed = True
        self._generator.close()

    def __enter__(self) -> Stream[ChunkT, ResultT]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
