"""The Engine interface: the bus between nodes (DESIGN.md §1, §7).

The engine is the only path between nodes. A node subscribes to a bus channel
per locally connected user (``u:<user>``) and per locally subscribed comet
channel (``c:<cname>``), plus the node-wide channel ``all``. Publishing is at
most once: a lost publication shows up as a gap in a device's seqs, which the
session fills from the store.

The memory engine calls straight back into the node with the very same Event
objects, so a single node runs exactly the code path of a cluster. The redis
engine encodes events with :meth:`Event.encode` and decodes them on the
receiving nodes.

Concurrency: ``subscribe``, ``unsubscribe`` and ``publish`` never block (they
queue). ``presence_*`` may block the calling greenlet (a Redis round trip);
never call them from an io-watcher callback.
"""

from __future__ import annotations

from typing import Iterable, Optional

import orjson


def user_channel(user: str) -> str:
    return "u:" + user


def comet_channel(cname: str) -> str:
    return "c:" + cname


ALL = "all"

_STATES: dict = {}
_STATES_MAX = 4096


def aggregate(records: list) -> tuple[str, list]:
    """(status, platforms) of one user from the records of every node: ``online``
    if any session is, ``away`` if all are, ``offline`` without a record."""
    if not records:
        return "offline", []
    platforms = sorted({p for r in records for p in r.get("platforms", ())})
    status = "online" if any(r.get("status") == "online" for r in records) else "away"
    return status, platforms


def shared_state(status: str, platforms) -> tuple:
    """``(status, platforms as a tuple)``, one shared object per distinct value:
    presence is kept per user, and nearly every user is in one of a few states."""
    key = (status, tuple(platforms))
    shared = _STATES.get(key)
    if shared is None:
        if len(_STATES) >= _STATES_MAX:
            return key
        shared = _STATES[key] = key
    return shared


class Event:
    """One bus publication: ``kind`` plus a JSON-able ``data`` dict.

    Kinds used by the node (see imd/node.py for their handlers):
    ``entry`` (an inbox entry for the channel's user), ``transient`` (a
    non-stored payload for the user's sessions, optionally of one device and/or
    one protocol),
    ``presence`` (a user's aggregate presence changed), ``read`` (read receipt),
    ``kick`` (close the user's sessions), ``contacts`` (a contact was added or
    removed), ``comet`` (a message on a comet channel), ``broadcast``.

    Kinds an engine makes locally and hands to its own handler on channel
    ``all`` (never published): ``resync`` (the bus was down and is back: some
    publications may be lost, fetch from the store), ``nodes_lost`` (``nodes``
    died; ``users`` lost their presence records there), ``presence_restore``
    (this node's records had been removed by another node; ``users`` must be
    announced again).
    """

    __slots__ = ("kind", "data", "origin", "_wire")

    def __init__(self, kind: str, data: dict, origin: str = "") -> None:
        self.kind = kind
        self.data = data
        self.origin = origin        # node id that published it
        self._wire = None

    def encode(self) -> bytes:
        """Wire form for a remote bus; computed once per event."""
        if self._wire is None:
            self._wire = orjson.dumps({"k": self.kind, "o": self.origin, "d": self.data})
        return self._wire

    @classmethod
    def decode(cls, raw: bytes) -> "Event":
        obj = orjson.loads(raw)
        return cls(obj["k"], obj["d"], obj.get("o", ""))

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        return f"Event({self.kind!r}, {self.data!r}, origin={self.origin!r})"


class Engine:
    """Interface of a bus. ``handler(channel, event)`` is the node's callback; it
    runs in the hub (from a greenlet or a callback) and must not block."""

    name = "base"

    def start(self, node_id: str, handler) -> None:
        """Connect and start delivering events for subscribed channels to ``handler``."""
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def subscribe(self, channel: str) -> None:
        raise NotImplementedError

    def unsubscribe(self, channel: str) -> None:
        raise NotImplementedError

    def subscribe_user(self, user: str) -> None:
        """``subscribe(user_channel(user))``; an engine may keep the user string
        (which the node's sessions already hold) instead of a channel string."""
        self.subscribe(user_channel(user))

    def unsubscribe_user(self, user: str) -> None:
        self.unsubscribe(user_channel(user))

    def publish(self, channel: str, event: Event, applied=None) -> None:
        """Publish ``event`` on ``channel`` (never blocks). ``applied(ok)``, if
        given, is called from the hub once this node's handler has received the
        event (``ok`` True), at once when this node does not subscribe to the
        channel, or with False when the publication is known lost. It lets a
        caller answer only after its own node has applied what it published
        (read-your-writes on channels whose order comes from the bus)."""
        raise NotImplementedError

    # -- cluster presence: one record per (user, node) -----------------------
    def presence_set(self, user: str, state: Optional[dict]) -> None:
        """Set (or, with None, remove) this node's presence record for ``user``.

        ``state`` is ``{"status": "online"|"away", "platforms": [...], "devices": [...]}``
        (the node stores and returns it as given).
        """
        raise NotImplementedError

    def presence_get(self, users: Iterable[str]) -> dict[str, list[dict]]:
        """For each user, the live presence records of every node (possibly empty)."""
        raise NotImplementedError

    def presence_states(self, users: list) -> dict:
        """For each user, the :func:`aggregate` of its records over every node as a
        :func:`shared_state` ``(status, platforms tuple)``, or None when no node has
        one (offline). Blocks like ``presence_get``; an engine that can answer
        without building the records overrides it."""
        return {u: shared_state(*aggregate(recs)) if recs else None
                for u, recs in self.presence_get(users).items()}

    # -- cluster comet channel counts: one record per (channel, node) ----------
    def channel_count_set(self, cname: str, count: int) -> None:
        """Record how many subscribers comet channel ``cname`` has on this node
        (0 removes the record). Never blocks."""
        raise NotImplementedError

    def channel_counts(self, cnames: Iterable[str]) -> dict[str, int]:
        """Subscribers of each comet channel summed over the live nodes (blocks)."""
        raise NotImplementedError

    def state(self) -> dict:
        """For status/metrics: at least ``{"backend": name, "connected": bool}``."""
        raise NotImplementedError
