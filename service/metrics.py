"""Prometheus metrics of one gateway process.

Labels never carry a token, a user id or message text: only fixed reasons,
outcomes and Kafka partition numbers.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    """All counters of the gateway, in a registry of their own (one per process or test)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.connections = Gauge("notify_connections", "Open WebSocket connections.", registry=r)
        self.connections_opened = Counter(
            "notify_connections_opened", "Connections accepted after the token check.", registry=r
        )
        self.connections_rejected = Counter(
            "notify_connections_rejected",
            "Connections refused, by reason.",
            ["reason"],
            registry=r,
        )
        self.consumed = Counter(
            "notify_notifications_consumed", "Kafka records read from the topic.", registry=r
        )
        self.stored = Counter(
            "notify_notifications_stored", "Notifications saved for offline users.", registry=r
        )
        self.store_duplicates = Counter(
            "notify_store_duplicates",
            "Notifications already in the backlog for their user (a redelivery): not stored twice.",
            registry=r,
        )
        self.flushed = Counter(
            "notify_notifications_flushed", "Stored notifications written on connect.", registry=r
        )
        self.expired = Counter(
            "notify_notifications_expired",
            "Notifications dropped by retention, by cause.",
            ["cause"],
            registry=r,
        )
        self.dead_lettered = Counter(
            "notify_notifications_dead_lettered",
            "Poison messages copied to the dead-letter topic (or dropped when it is disabled).",
            ["reason"],
            registry=r,
        )
        self.dead_letter_failures = Counter(
            "notify_dead_letter_failures",
            "Poison messages not written to the dead-letter topic: refused for good, or"
            " still failing after KAFKA_DLQ_TIMEOUT (logged with partition/offset, skipped).",
            registry=r,
        )
        self.dead_letter_healthy = Gauge(
            "notify_dead_letter_healthy",
            "0 while writes to the dead-letter topic fail, 1 once one succeeds.",
            registry=r,
        )
        self.dead_letter_healthy.set(1)
        self.consumer_errors = Counter(
            "notify_consumer_errors",
            "Kafka errors that made the consumer reconnect, by exception type.",
            ["error"],
            registry=r,
        )
        self.kafka_codec_missing = Gauge(
            "notify_kafka_codec_missing",
            "1 when records compressed with this codec cannot be read (library missing).",
            ["codec"],
            registry=r,
        )
        self.skipped = Counter(
            "notify_notifications_skipped",
            "Valid messages for another delivery method.",
            registry=r,
        )
        self.slow_closed = Counter(
            "notify_slow_connections_closed",
            "Connections closed with 1013, or sockets cut off, because they could not keep up:"
            " a full send queue, or no room in the socket for WRITE_TIMEOUT.",
            registry=r,
        )
        self.auth_seconds = Histogram(
            "notify_auth_seconds",
            "Time to check a token (cache hits included).",
            ["outcome"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.auth_cache_hits = Counter(
            "notify_auth_cache_hits", "Token checks answered from the cache.", registry=r
        )
        self.auth_cache_entries = Gauge(
            "notify_auth_cache_entries",
            "Answers in the token cache, by answer (valid, refused).",
            ["answer"],
            registry=r,
        )
        self.auth_checks_running = Gauge(
            "notify_auth_checks_running",
            "Token checks under way with the auth service or JWKS (at most AUTH_CONCURRENCY).",
            registry=r,
        )
        self.unauthenticated = Gauge(
            "notify_unauthenticated",
            "Open WebSockets whose token is still being checked.",
            registry=r,
        )
        self.consumer_lag = Gauge(
            "notify_consumer_lag",
            "Records behind the end of each assigned partition.",
            ["partition"],
            registry=r,
        )
        self.store_batch_seconds = Histogram(
            "notify_store_batch_seconds",
            "Time to save one batch of undelivered notifications.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.ack_timeouts = Counter(
            "notify_ack_timeouts",
            "Published notifications no receiver acknowledged in time (stored instead).",
            registry=r,
        )
        self.status_events = Counter(
            "notify_status_events",
            "Delivery status events (STATUS_TOPIC), by outcome: produced; failed (Kafka"
            " refused or did not confirm in time); dropped (the oldest, over the bound"
            " of events waiting for Kafka).",
            ["outcome"],
            registry=r,
        )
        self.status_flush_timeouts = Counter(
            "notify_status_flush_timeouts",
            "Offset commits that went ahead before the status events of their records"
            " were confirmed by Kafka (the flush timed out; the events stay queued).",
            registry=r,
        )
        self._frames = _FrameStats(_LATENCY_BUCKETS)
        r.register(self._frames)
        # Count one live frame written and its end-to-end latency (``created_ms``, the
        # Kafka timestamp). Called for every frame: the collector's own method, bound
        # once, rather than a method of this class calling it.
        self.observe_delivery: Callable[[int], None] = self._frames.observe
        self.store_failures = Counter(
            "notify_store_failures", "Failed attempts to save to PostgreSQL.", registry=r
        )

    def render(self) -> bytes:
        """The text exposition format for ``GET /metrics``."""
        return generate_latest(self.registry)


class _FrameStats(Collector):
    """Live frames written and their latency: the one metric updated per frame.

    prometheus_client's Counter and Histogram take a lock on every update; the
    gateway updates these from one event loop only, so plain integers do, and
    this collector turns them into ``notify_notifications_delivered_total`` and
    the ``notify_delivery_latency_seconds`` histogram when scraped.
    """

    def __init__(self, buckets: tuple[float, ...]) -> None:
        self._bounds = list(buckets)
        self._counts = [0] * (len(buckets) + 1)
        self._sum = 0.0
        self._frames = 0

    def observe(self, created_ms: int) -> None:
        """One live frame written now, of a notification made at ``created_ms``."""
        self._frames += 1
        if created_ms > 0:
            seconds = time.time() - created_ms / 1000
            if seconds < 0.0:
                seconds = 0.0  # a producer clock ahead of ours
            self._counts[bisect_left(self._bounds, seconds)] += 1
            self._sum += seconds

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily(
            "notify_notifications_delivered",
            "Frames written live to a socket (one per connection).",
            value=self._frames,
        )
        cumulative, buckets = 0, []
        for bound, count in zip([*self._bounds, float("inf")], self._counts, strict=True):
            cumulative += count
            buckets.append(("+Inf" if bound == float("inf") else repr(float(bound)), cumulative))
        yield HistogramMetricFamily(
            "notify_delivery_latency_seconds",
            "From the Kafka record timestamp to the socket write.",
            buckets=buckets,
            sum_value=self._sum,
        )
