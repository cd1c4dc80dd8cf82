"""Session: what the upper layers see of a connection, whatever the protocol.

A session carries the identity (user, role, platform, device) and offers
``send(out)`` and ``close(code, reason, reconnect)``; a protocol subclass turns
:class:`imd.envelope.Out` objects into its own bytes (``write_out``) and ends
its transport (``end``).

The base class also keeps the device's place in the user's inbox
(``last_seq``) so that every device sees its inbox in seq order, each entry at
least once: entries that arrive while the session is still replaying from the
store are held in ``held`` and released in order afterwards; an entry that
arrives with a gap before it makes the session fetch the gap from the store
(the bus is at most once, DESIGN.md §7). Live entries the session itself
caused (its own sent message) only advance ``last_seq``: the ack told it.

All methods run in the hub and never block; store reads happen in greenlets
the router spawns.
"""

from __future__ import annotations

import itertools
import logging
from typing import Optional

from . import envelope
from .clock import mono_now, wall_now
from .envelope import Out, close as close_env

log = logging.getLogger("imd.session")

_ids = itertools.count(1)

# states
AUTH, AUTHING, SYNC, LIVE, CLOSED = "auth", "authing", "sync", "live", "closed"


class Session:
    __slots__ = ("serial", "user", "role", "platform", "device", "status", "state", "last_seq",
                 "held", "backlog", "router", "opened", "last_rx", "pinged", "bucket")

    protocol = "base"

    def __init__(self, router) -> None:
        self.serial = next(_ids)      # unique in this process; ``id`` is made from it on demand
        self.router = router
        self.user = self.role = self.platform = self.device = None
        self.status = "online"
        self.state = AUTH
        self.last_seq = 0
        self.held = None
        self.backlog = None
        self.opened = wall_now()
        self.last_rx = mono_now()
        self.pinged = False
        self.bucket = None            # [tokens, time] once the session sends (limits.msg_rate)

    # -- identity --------------------------------------------------------------
    @property
    def node_id(self) -> str:
        """The id of the node the session is on (its router's: not kept per session)."""
        return self.router.node.id

    @property
    def id(self) -> str:
        """``<node id>.<serial in hex>``: unique in the cluster (not stored: made on demand)."""
        return f"{self.node_id}.{self.serial:x}"

    @property
    def source(self) -> str:
        """The client source: platform and role, e.g. ``ios-host`` (six kinds in all)."""
        return f"{self.platform}-{self.role}" if self.user else "unauthenticated"

    def describe(self) -> dict:
        return {"session": self.id, "user": self.user, "role": self.role, "platform": self.platform,
                "device": self.device, "protocol": self.protocol, "status": self.status,
                "state": self.state, "seq": self.last_seq, "since": int(self.opened)}

    # -- the protocol's part -----------------------------------------------------
    def write_out(self, out: Out) -> None:
        """Write one envelope in the protocol's wire format (non-blocking)."""
        raise NotImplementedError

    def write_env(self, env: dict) -> None:
        """Write one envelope given as a dict, made for this session alone (an ack,
        an answer): as an :class:`Out` unless the protocol encodes it more directly."""
        self.write_out(Out(env))

    def end(self, reason: str) -> None:
        """Close the transport (after flushing what was written); the protocol
        then calls :meth:`closed`."""
        raise NotImplementedError

    def message_flags(self, env: dict) -> int:
        """The flags (:data:`imd.envelope.RECEIPT_REQUESTED`…) to store with the ``msg``
        envelope ``env`` this session sent. A client's JSON envelope has no such field
        (0); a protocol that builds ``env`` from its own wire format may say more."""
        return 0

    # -- what protocols call -------------------------------------------------------
    def receive_json(self, data: bytes) -> bool:
        """Parse one client envelope and hand it to the router (non-blocking).

        A malformed one is answered with ``error`` (and, when fatal, ends the
        session). Returns False once the session has ended."""
        try:
            env = envelope.parse(data, self.router.limits.max_body)
        except envelope.EnvelopeError as e:
            self.send(e.envelope())
            if e.fatal:
                self.end(e.reason)
                return False
            return True
        self.router.receive(self, env)
        return self.state is not CLOSED

    # -- what upper layers call ---------------------------------------------------
    def send(self, out) -> None:
        """Send an envelope (dict or Out) now, outside the inbox ordering."""
        if self.state is CLOSED:
            return
        if isinstance(out, Out):
            self.write_out(out)
            self.router.metrics.out(out.env["type"])
            return
        self.write_env(out)
        self.router.metrics.out(out["type"])

    def close(self, code: int = 1000, reason: str = "bye", reconnect: bool = False) -> None:
        """Send ``close`` and end the connection; the router forgets the session."""
        if self.state is CLOSED:
            return
        self.send(close_env(code, reason, reconnect))
        self.end(reason)

    def closed(self, reason: str) -> None:
        """The protocol calls this once when its transport is gone."""
        if self.state is CLOSED:
            return
        was_open = self.state is not AUTH
        self.state = CLOSED
        self.held = None
        if was_open:
            self.router.detach(self, reason)
        else:
            self.router.unopened(self)

    # -- inbox ordering ------------------------------------------------------------
    def deliver(self, out: Out) -> int:
        """An inbox entry of this user (``out.seq`` > 0) reached this node.

        Returns 1 when it was written now, else 0 (held, a duplicate, or the
        session's own message). The caller counts written envelopes in the
        metrics (:meth:`imd.metrics.Metrics.out`): one update per fan-out."""
        st = self.state
        if st is LIVE:
            seq = out.seq
            if seq <= self.last_seq:
                return 0
            if seq == self.last_seq + 1:
                self.last_seq = seq
                if not out.origin or out.origin != self.id:
                    self.write_out(out)
                    return 1
                return 0
            self.state = SYNC
            self.held = [out]
            self.router.fill_gap(self)
        elif st is SYNC or st is AUTHING:
            self.held.append(out)
        return 0

    @classmethod
    def fanout(cls, sessions, out: Out) -> int:
        """:meth:`deliver` ``out`` to each of ``sessions`` (an iterable of sessions
        of this class, all of one user); returns how many were written. A protocol
        whose sessions share one wire form of ``out`` overrides this with a loop
        that writes the payload framed once (imd/proto/tcp.py)."""
        n = 0
        for s in sessions:
            n += s.deliver(out)
        return n

    def drain(self) -> None:
        """Block the calling greenlet while much output is unsent (replay backpressure)."""

    def end_sync(self) -> Optional[int]:
        """Release held entries in order; return the seq to fetch from if a gap remains."""
        if self.state is CLOSED:
            return None
        held, self.held = self.held or [], None
        if held:
            held.sort(key=lambda o: o.seq)
        self.state = LIVE
        for i, out in enumerate(held):
            seq = out.seq
            if seq <= self.last_seq:
                continue
            if seq != self.last_seq + 1:
                self.state = SYNC
                self.held = held[i:]
                return self.last_seq
            self.last_seq = seq
            if not out.origin or out.origin != self.id:
                self.send(out)
        return None

    # -- heartbeats (driven by the router's wheel) -----------------------------------
    def on_auth_deadline(self, now: float) -> None:
        """Filed at accept time for ``limits.auth_timeout``."""
        if self.state is AUTH:
            self.close(408, "authentication timeout")

    def on_deadline(self, now: float) -> Optional[float]:
        """Filed once authenticated: ping a silent client, then give up on it."""
        if self.state is CLOSED:
            return None
        limits = self.router.limits
        idle = now - self.last_rx
        if idle >= limits.idle_timeout:
            self.close(408, "heartbeat timeout", reconnect=True)
            return None
        if idle >= limits.heartbeat:
            if not self.pinged:
                self.pinged = True
                self.send_ping()
            return self.last_rx + limits.idle_timeout
        return self.last_rx + limits.heartbeat

    def send_ping(self) -> None:
        self.send({"type": "ping"})

    def touch(self) -> None:
        """Traffic arrived from the client."""
        self.last_rx = mono_now()
        self.pinged = False
