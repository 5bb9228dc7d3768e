"""The connections open on this node, by user.

The hub is a plain in-memory index: it imports no web framework, broker or
database, and every method is synchronous, so callers on the event loop never
interleave inside it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Generic, Protocol, TypeVar


class Peer(Protocol):
    """What the hub needs to know of a connection."""

    @property
    def user_id(self) -> str: ...


class Rejected(Exception):
    """A connection was refused by a limit; ``reason`` is safe to show the client."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


P = TypeVar("P", bound=Peer)


class Hub(Generic[P]):
    """User id -> the open connections of that user on this node.

    Limits: at most ``max_per_user`` connections for one user and ``max_total``
    on the node. Not thread-safe; meant for one event loop.
    """

    def __init__(self, *, max_per_user: int, max_total: int) -> None:
        self._by_user: dict[str, set[P]] = {}
        self._count = 0
        self._max_per_user = max_per_user
        self._max_total = max_total

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[P]:
        for peers in list(self._by_user.values()):
            yield from list(peers)

    @property
    def users(self) -> int:
        """How many distinct users have at least one connection here."""
        return len(self._by_user)

    def register(self, peer: P) -> None:
        """Add a connection.

        Raises:
            Rejected: the user or the node is at its connection limit.
        """
        if self._count >= self._max_total:
            raise Rejected("too many connections on this node")
        peers = self._by_user.setdefault(peer.user_id, set())
        if peer in peers:
            return
        if len(peers) >= self._max_per_user:
            if not peers:
                del self._by_user[peer.user_id]
            raise Rejected("too many connections for this user")
        peers.add(peer)
        self._count += 1

    def unregister(self, peer: P) -> None:
        """Remove a connection; removing one that is not registered does nothing."""
        peers = self._by_user.get(peer.user_id)
        if peers is None or peer not in peers:
            return
        peers.discard(peer)
        self._count -= 1
        if not peers:
            del self._by_user[peer.user_id]

    def online(self, user_id: str) -> bool:
        """Whether ``user_id`` has at least one connection here."""
        return user_id in self._by_user

    def connections(self, user_id: str) -> tuple[P, ...]:
        """The open connections of ``user_id`` (a snapshot; empty when offline)."""
        peers = self._by_user.get(user_id)
        return tuple(peers) if peers else ()
