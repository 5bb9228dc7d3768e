"""Fixtures the unit tests share: fresh metrics, a hub and an in-memory backlog per test."""

from __future__ import annotations

import pytest

from service.hub import Hub
from service.metrics import Metrics
from service.router import Outlet

from .fakes import FakeBacklog


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
def hub() -> Hub[Outlet]:
    return Hub(max_per_user=10, max_total=100)


@pytest.fixture
def backlog() -> FakeBacklog:
    return FakeBacklog()
