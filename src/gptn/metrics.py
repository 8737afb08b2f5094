"""Counters and histograms in Prometheus' text exposition format, for `gptn serve`'s /metrics
(what operators of vLLM and TGI scrape), without a client library."""

from __future__ import annotations

import bisect
import threading


class Histogram:
    """Cumulative-bucket histogram of observed values (seconds, rows ...)."""

    def __init__(self, buckets: tuple):
        self.buckets = tuple(sorted(buckets))
        self.counts = [0] * (len(self.buckets) + 1)  # the last bucket is +Inf
        self.sum = 0.0
        self.lock = threading.Lock()

    def observe(self, value: float) -> None:
        with self.lock:
            self.counts[bisect.bisect_left(self.buckets, value)] += 1
            self.sum += value

    def lines(self, name: str) -> list[str]:
        with self.lock:
            counts, total = list(self.counts), self.sum
        out, running = [], 0
        for bound, n in zip([*map(repr, map(float, self.buckets)), "+Inf"], counts):
            running += n
            out.append(f'{name}_bucket{{le="{bound}"}} {running}')
        return out + [f"{name}_sum {total}", f"{name}_count {running}"]


def prometheus_text(prefix: str, metrics: list[tuple]) -> str:
    """(name, kind, help, value or Histogram) entries as one text page."""
    lines = []
    for name, kind, help_text, value in metrics:
        full = f"{prefix}_{name}"
        lines += [f"# HELP {full} {help_text}", f"# TYPE {full} {kind}"]
        lines += value.lines(full) if isinstance(value, Histogram) else [f"{full} {value}"]
    return "\n".join(lines) + "\n"
