"""XEP-0198 stream management: acks and resumption (a mixin of XmppSession).

* ``<enable/>`` after bind → ``<enabled id resume='true' max=RESUME_SECONDS/>``.
  From then on every stanza received is counted (``h_in``) and every stanza
  written is kept (bytes, and the inbox seq it carries, if any) until the client
  acknowledges it with ``<a h/>``; the server asks with ``<r/>`` once per loop
  iteration in which it wrote stanzas. Counters are mod 2**32.
* Inbox entries count as received (the device's cursor moves, DESIGN.md §3)
  when the client acks them, not when they are written.
* When the connection drops without a clean ``</stream:stream>``, the session
  stays attached to the core (presence unchanged, deliveries queued) for
  RESUME_SECONDS. A new stream of the same user that sends ``<resume previd h/>``
  after SASL takes it over: ``<resumed h/>``, then everything unacked is sent
  again. Otherwise the session ends when the time is up; what it never got
  acknowledged stays unreceived in the inbox (offline for the next login).
* More than MAX_UNACKED unacknowledged stanzas end the stream (slow consumer).

The session's ``sm`` is None until ``<enable/>``, then its :class:`SmState`.

Runs in the hub; never blocks.
"""

from __future__ import annotations

import secrets
from collections import deque

import gevent

from .stanza import Element, tostring

SM_NS = "urn:xmpp:sm:3"
RESUME_SECONDS = 120
MAX_UNACKED = 1000
MOD = 1 << 32


class SmState:
    """XEP-0198 state of a stream that enabled it: the stanzas written and not yet
    acknowledged (``queue`` of (bytes, inbox seq or 0)), the counters of stanzas
    received (``h_in``) and acknowledged by the client (``h_out``), the resumption
    id (None once the stream may not be resumed), whether an ``<r/>`` is due this
    iteration, and the timer of a detached session waiting for its resume."""

    __slots__ = ("queue", "id", "h_in", "h_out", "asking", "timer")

    def __init__(self, sm_id: str) -> None:
        self.queue = deque()
        self.id = sm_id
        self.h_in = self.h_out = 0
        self.asking = False
        self.timer = None


class _Gone:
    """Handler of a connection whose session moved to a newer connection."""

    __slots__ = ()

    def on_data(self, data: bytes) -> None:
        pass

    def on_close(self, reason: str) -> None:
        pass


def sm_failed(condition: str = "unexpected-request") -> bytes:
    return (f"<failed xmlns='{SM_NS}'><{condition} xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/>"
            "</failed>").encode()


class StreamManagement:
    __slots__ = ()

    def sm_nonza(self, el: Element) -> None:
        """``<enable/>``, ``<r/>``, ``<a/>`` after bind."""
        tag, sm = el.tag, self.sm
        if tag == "r":
            if sm is not None:
                self.conn.write(f"<a xmlns='{SM_NS}' h='{sm.h_in}'/>".encode())
        elif tag == "a":
            if sm is not None:
                self.sm_acked(el.get("h", ""))
        elif tag == "enable":
            if sm is not None:
                self.conn.write(sm_failed())
                return
            sm = self.sm = SmState(secrets.token_urlsafe(18))
            self.proto.resumable[sm.id] = self
            self.conn.write(f"<enabled xmlns='{SM_NS}' id='{sm.id}' resume='true' "
                            f"max='{RESUME_SECONDS}'/>".encode())

    def sm_sent(self, data: bytes, seq: int) -> None:
        """A stanza was written: keep it until acked; ask for an ack this iteration."""
        sm = self.sm
        sm.queue.append((data, seq))
        if len(sm.queue) > MAX_UNACKED:
            self.stream_error("policy-violation", "too many unacknowledged stanzas")
            return
        if not sm.asking:
            sm.asking = True
            gevent.get_hub().loop.run_callback(self.sm_request)

    def sm_request(self) -> None:
        sm = self.sm
        sm.asking = False
        if sm.queue:
            self.conn.write(f"<r xmlns='{SM_NS}'/>".encode())

    def sm_acked(self, h: str) -> None:
        """The client holds every stanza up to ``h``: drop them, mark inbox entries received."""
        sm = self.sm
        try:
            n = (int(h) - sm.h_out) % MOD
        except ValueError:
            return
        queue = sm.queue
        if n > len(queue):
            return                                # stale or impossible count: nothing is dropped
        top = 0
        for _ in range(n):
            _, seq = queue.popleft()
            if seq > top:
                top = seq
        sm.h_out = (sm.h_out + n) % MOD
        if top:
            self.note_written(top)

    # -- detaching and resuming ------------------------------------------------------------
    def sm_detach(self) -> bool:
        """The connection is gone: keep the session for a resume, if SM is on. True if kept."""
        sm = self.sm
        if sm is None or sm.timer is not None or not sm.id:
            return False
        sm.timer = gevent.get_hub().loop.timer(RESUME_SECONDS)
        sm.timer.start(self.sm_expire)
        return True

    def sm_detached(self) -> bool:
        """Whether the connection is gone and the session waits for a resume."""
        return self.sm is not None and self.sm.timer is not None

    def sm_unresumable(self) -> None:
        """The stream may not be resumed any more (it ended, cleanly or with an error)."""
        sm = self.sm
        if sm is not None and sm.id is not None:
            self.proto.resumable.pop(sm.id, None)
            sm.id = None

    def sm_expire(self) -> None:
        self.sm_finish("resume timeout")

    def sm_finish(self, reason: str) -> None:
        """End a detached session for good."""
        sm = self.sm
        if sm.timer is not None:
            sm.timer.stop()
            sm.timer = None
        self.sm_unresumable()
        self.finish(reason)

    def sm_resume(self, el: Element) -> None:
        """``<resume previd h/>`` on a fresh, authenticated stream (``self``)."""
        old = self.proto.resumable.get(el.get("previd", ""))
        if old is None or old.user != self.login.ident[0] or old.state_closed():
            self.conn.write(sm_failed("item-not-found"))
            return
        old.take_over(self, el.get("h", "0"))

    def take_over(self, new, h: str) -> None:
        """Move to ``new``'s connection and parser; ``new`` is discarded."""
        sm = self.sm
        if sm.timer is not None:
            sm.timer.stop()
            sm.timer = None
        if not self.conn.closed:                  # the old TCP connection is still open
            self.conn.handler = _Gone()
            self.conn.close("resumed elsewhere", flush=False)
        conn, parser = new.conn, new.parser
        conn.handler = self
        parser.handler = self
        parser.negotiating = False
        self.conn, self.parser = conn, parser
        new.discard()
        self.touch()
        self.sm_acked(h)
        conn.write(f"<resumed xmlns='{SM_NS}' h='{sm.h_in}' previd='{sm.id}'/>".encode())
        for data, _ in sm.queue:
            conn.write(data)
        if sm.queue:
            self.sm_request()

    def write(self, el: Element, seq: int = 0) -> None:
        """Write a stanza (kept for XEP-0198 when enabled)."""
        self.write_bytes(tostring(el).encode(), seq)

    def write_bytes(self, data: bytes, seq: int = 0) -> None:
        """Write a serialized stanza (kept for XEP-0198 when enabled)."""
        self.conn.write(data)
        if self.sm is not None:
            self.sm_sent(data, seq)
        elif seq:
            self.note_written(seq)
