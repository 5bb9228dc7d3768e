"""The hub: which connections are open for which user, and the connection limits."""

from __future__ import annotations

import pytest

from service.hub import Hub, Rejected


class Peer:
    def __init__(self, user_id: str) -> None:
        self.user_id = user_id


def test_registered_connections_are_found_by_user() -> None:
    """Every open connection of a user is found, and none of another user's."""
    hub: Hub[Peer] = Hub(max_per_user=10, max_total=100)
    a1, a2, b1 = Peer("alice"), Peer("alice"), Peer("bob")
    for peer in (a1, a2, b1):
        hub.register(peer)
    assert set(hub.connections("alice")) == {a1, a2}
    assert hub.connections("bob") == (b1,)
    assert hub.connections("carol") == ()
    assert len(hub) == 3
    assert hub.users == 2
    assert set(hub) == {a1, a2, b1}


def test_unregistered_connection_no_longer_receives() -> None:
    """A closed connection is no longer listed, and a user with none left is offline."""
    hub: Hub[Peer] = Hub(max_per_user=10, max_total=100)
    a1, a2 = Peer("alice"), Peer("alice")
    hub.register(a1)
    hub.register(a2)
    hub.unregister(a1)
    assert hub.connections("alice") == (a2,)
    hub.unregister(a2)
    assert hub.connections("alice") == ()
    assert len(hub) == 0
    assert hub.users == 0


def test_unregistering_an_unknown_connection_does_nothing() -> None:
    """Closing a connection twice, or one never registered, leaves the others alone."""
    hub: Hub[Peer] = Hub(max_per_user=10, max_total=100)
    a1 = Peer("alice")
    hub.register(a1)
    hub.unregister(Peer("alice"))
    hub.unregister(Peer("bob"))
    hub.unregister(a1)
    hub.unregister(a1)
    assert len(hub) == 0
    assert hub.connections("alice") == ()


def test_registering_the_same_connection_twice_counts_once() -> None:
    """A connection registered twice takes one slot of the user's limit."""
    hub: Hub[Peer] = Hub(max_per_user=2, max_total=100)
    a1 = Peer("alice")
    hub.register(a1)
    hub.register(a1)
    assert len(hub) == 1
    hub.register(Peer("alice"))
    assert len(hub) == 2


def test_per_user_limit_rejects_with_a_readable_reason() -> None:
    """A user over the per-user limit is refused with a reason fit to show, others still get in."""
    hub: Hub[Peer] = Hub(max_per_user=2, max_total=100)
    hub.register(Peer("alice"))
    hub.register(Peer("alice"))
    with pytest.raises(Rejected) as raised:
        hub.register(Peer("alice"))
    assert raised.value.reason == "too many connections for this user"
    assert len(hub.connections("alice")) == 2
    hub.register(Peer("bob"))
    assert len(hub) == 3


def test_node_limit_rejects_with_a_readable_reason() -> None:
    """Once the node is full every new connection is refused, and a slot frees on close."""
    hub: Hub[Peer] = Hub(max_per_user=10, max_total=2)
    first = Peer("alice")
    hub.register(first)
    hub.register(Peer("bob"))
    with pytest.raises(Rejected) as raised:
        hub.register(Peer("carol"))
    assert raised.value.reason == "too many connections on this node"
    assert hub.connections("carol") == ()
    assert hub.users == 2
    hub.unregister(first)
    hub.register(Peer("carol"))
    assert len(hub) == 2


def test_connections_is_a_snapshot() -> None:
    """The list a sender iterates does not change when connections come and go meanwhile."""
    hub: Hub[Peer] = Hub(max_per_user=10, max_total=100)
    a1 = Peer("alice")
    hub.register(a1)
    snapshot = hub.connections("alice")
    hub.register(Peer("alice"))
    hub.unregister(a1)
    assert snapshot == (a1,)
    assert a1 not in hub.connections("alice")
