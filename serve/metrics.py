"""The server's Prometheus metrics, in a registry of its own (two apps in one process never share counts)."""

from __future__ import annotations

from typing import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# per-chunk model time: milliseconds for a tiny model on a GPU up to tens of seconds for Wan on a CPU
CHUNK_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    """Gauges read at scrape time, a per-chunk histogram, and counters of chunks, sessions and failures."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.active_sessions = Gauge("shotdistill_active_sessions", "Open sessions.", registry=r)
        self.queue_depth = Gauge("shotdistill_queue_depth", "Model steps queued and not yet started.", registry=r)
        self.chunk_seconds = Histogram("shotdistill_chunk_seconds", "Model time of one chunk (denoise + decode).",
                                       buckets=CHUNK_BUCKETS, registry=r)
        self.chunks = Counter("shotdistill_chunks", "Chunks generated.", registry=r)
        self.sessions = Counter("shotdistill_sessions", "Sessions opened.", registry=r)
        self.session_errors = Counter("shotdistill_session_errors", "Shots that failed inside the model.", registry=r)

    def watch(self, active_sessions: Callable[[], int], queue_depth: Callable[[], int]) -> None:
        """Read the gauges from these functions whenever the metrics are scraped."""
        self.active_sessions.set_function(active_sessions)
        self.queue_depth.set_function(queue_depth)

    def chunk(self, seconds: float) -> None:
        self.chunks.inc()
        self.chunk_seconds.observe(seconds)

    def exposition(self) -> bytes:
        """The text exposition format."""
        return generate_latest(self.registry)
