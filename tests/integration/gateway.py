"""A real gateway process for integration tests: now :mod:`tests.support.gateway`."""

from tests.support.gateway import ROOT, Gateway, Gateways, free_port

__all__ = ["ROOT", "Gateway", "Gateways", "free_port"]
