"""What a camera run did: one summary per source (frames read, processed, skipped, dropped,
latencies, why it stopped) and the run's batches, with the text ``camera`` prints at the end.

What is decided here: ``dropped`` is read - processed - skipped (frames a live source replaced
while the model was busy, or frames in flight when the run stopped); latency percentiles are
numpy's (linear); with one source the run's text is that source's summary alone, with several
each summary and then a line on the batches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class CameraSummary:
    """What one source did in a camera run. ``dropped`` = read - processed - skipped: frames
    replaced by a newer one while the model was busy (live sources), or in flight when the run stopped."""

    source: str
    live: bool
    frames_read: int
    processed: int
    skipped: int
    dropped: int
    latencies_ms: tuple[float, ...]
    seconds: float  # from the start of the run to this source's end
    out: str | None
    annotate: str | None  # None when no annotated video was written (not asked, or no frame processed)
    stopped: str  # why the source ended: "end of source", "max frames", "interrupted", or the source's error
    interrupted: bool = False

    def latency_ms(self, percentile: float) -> float:
        return float(np.percentile(self.latencies_ms, percentile)) if self.latencies_ms else math.nan

    @property
    def mean_latency_ms(self) -> float:
        return float(np.mean(self.latencies_ms)) if self.latencies_ms else math.nan

    @property
    def rate(self) -> float:
        """Processed frames per second of the run."""
        return self.processed / self.seconds if self.seconds > 0 else 0.0

    def text(self) -> str:
        kind = "live" if self.live else "file"
        lines = [f"{self.source} ({kind}): {self.frames_read} frames read, {self.processed} processed, "
                 f"{self.skipped} skipped by pacing, {self.dropped} dropped"]
        if self.latencies_ms:
            lines.append(f"latency: mean {self.mean_latency_ms:.1f} ms, p50 {self.latency_ms(50):.1f} ms, "
                         f"p95 {self.latency_ms(95):.1f} ms; {self.rate:.2f} frames/s processed over {self.seconds:.1f} s")
        outputs = [f"results {self.out}"] if self.out else []
        outputs += [f"annotated video {self.annotate}"] if self.annotate else []
        if outputs:
            lines.append("wrote " + ", ".join(outputs))
        lines.append("stopped: interrupted (Ctrl-C)" if self.interrupted else f"stopped: {self.stopped}")
        return "\n".join(lines)


@dataclass(frozen=True)
class CameraRun:
    """A camera run: one summary per source, in ``--source`` order, and the batches it ran."""

    summaries: tuple[CameraSummary, ...]
    batches: int  # model calls (generate_batch)
    seconds: float

    @property
    def interrupted(self) -> bool:
        return any(s.interrupted for s in self.summaries)

    @property
    def processed(self) -> int:
        return sum(s.processed for s in self.summaries)

    def text(self) -> str:
        """Each source's summary; with several, a last line on the batches."""
        if len(self.summaries) == 1:
            return self.summaries[0].text()
        mean = self.processed / self.batches if self.batches else 0.0
        return "\n\n".join(s.text() for s in self.summaries) + (
            f"\n\n{len(self.summaries)} sources: {self.processed} frames in {self.batches} batches "
            f"({mean:.2f} frames per batch), {self.processed / self.seconds if self.seconds > 0 else 0.0:.2f} "
            f"frames/s over {self.seconds:.1f} s")
