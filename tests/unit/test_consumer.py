"""The consumer's bookkeeping that needs no Kafka (the rest is in tests/integration)."""

from __future__ import annotations

from typing import Any

from aiokafka import TopicPartition

from service.config import Settings
from service.consumer import Consumer
from service.metrics import Metrics


class RebalancedConsumer:
    """Holds partition 0 only; asks about any other partition fail like aiokafka's."""

    def __init__(self) -> None:
        self.mine = TopicPartition("notification.send", 0)

    def assignment(self) -> set[TopicPartition]:
        return {self.mine}

    def highwater(self, partition: TopicPartition) -> int:
        assert partition == self.mine, "Partition is not assigned"
        return 120


def test_lag_report_skips_partitions_revoked_since_the_fetch() -> None:
    # A batch fetched from partitions 0 and 1; a rebalance then took partition 1
    # away. Reporting lag must not kill the consumer (it did, under 2 workers).
    metrics = Metrics()
    consumer = Consumer(Settings.from_env({}), dispatcher=None, metrics=metrics)  # type: ignore[arg-type]
    fake: Any = RebalancedConsumer()
    revoked = TopicPartition("notification.send", 1)

    consumer._report_lag(fake, {fake.mine: 100, revoked: 7})

    assert metrics.consumer_lag.labels("0")._value.get() == 20
