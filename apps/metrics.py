"""The server's counters in Prometheus' text exposition format (no client library needed)."""

from __future__ import annotations

import threading
from collections import defaultdict

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
PREFIX = "paligemma_edge"


class ServerMetrics:
    def __init__(self):
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = defaultdict(int)
        self.latency_counts = [0] * len(LATENCY_BUCKETS)
        self.latency_sum = 0.0
        self.latency_total = 0
        self.generated_tokens = 0
        self.last_tokens_per_s = 0.0

    def record_request(self, route: str, status: int) -> None:
        with self._lock:
            self.requests[(route, status)] += 1

    def record_generation(self, seconds: float, tokens: int, tokens_per_s: float) -> None:
        with self._lock:
            self.latency_sum += seconds
            self.latency_total += 1
            for index, bound in enumerate(LATENCY_BUCKETS):
                if seconds <= bound:
                    self.latency_counts[index] += 1
            self.generated_tokens += tokens
            self.last_tokens_per_s = tokens_per_s

    def render(self, queue_depth: int, batches: int = 0, batched_requests: int = 0) -> str:
        with self._lock:
            lines = [
                f"# HELP {PREFIX}_requests_total HTTP requests by route and status code.",
                f"# TYPE {PREFIX}_requests_total counter",
            ]
            lines += [f'{PREFIX}_requests_total{{route="{route}",status="{status}"}} {count}'
                      for (route, status), count in sorted(self.requests.items())]
            errors = sum(count for (_, status), count in self.requests.items() if status >= 400)
            lines += [
                f"# HELP {PREFIX}_request_errors_total Requests answered with a 4xx or 5xx status.",
                f"# TYPE {PREFIX}_request_errors_total counter",
                f"{PREFIX}_request_errors_total {errors}",
                f"# HELP {PREFIX}_generation_seconds Time from accepting a generate request to its answer.",
                f"# TYPE {PREFIX}_generation_seconds histogram",
            ]
            lines += [f'{PREFIX}_generation_seconds_bucket{{le="{bound:g}"}} {count}'
                      for bound, count in zip(LATENCY_BUCKETS, self.latency_counts)]
            lines += [
                f'{PREFIX}_generation_seconds_bucket{{le="+Inf"}} {self.latency_total}',
                f"{PREFIX}_generation_seconds_sum {self.latency_sum:.6f}",
                f"{PREFIX}_generation_seconds_count {self.latency_total}",
                f"# HELP {PREFIX}_generated_tokens_total Tokens generated, over all requests.",
                f"# TYPE {PREFIX}_generated_tokens_total counter",
                f"{PREFIX}_generated_tokens_total {self.generated_tokens}",
                f"# HELP {PREFIX}_decode_tokens_per_second Decode speed of the latest generation.",
                f"# TYPE {PREFIX}_decode_tokens_per_second gauge",
                f"{PREFIX}_decode_tokens_per_second {self.last_tokens_per_s:.3f}",
                f"# HELP {PREFIX}_queue_depth Generate requests waiting for or using the model.",
                f"# TYPE {PREFIX}_queue_depth gauge",
                f"{PREFIX}_queue_depth {queue_depth}",
                f"# HELP {PREFIX}_batches_total Batched generations the model ran (dynamic batching).",
                f"# TYPE {PREFIX}_batches_total counter",
                f"{PREFIX}_batches_total {batches}",
                f"# HELP {PREFIX}_batched_requests_total Requests those batches ran; over batches_total: mean batch size.",
                f"# TYPE {PREFIX}_batched_requests_total counter",
                f"{PREFIX}_batched_requests_total {batched_requests}",
            ]
        return "\n".join(lines) + "\n"
