"""XEP-0198 stream management: acks and resumption (a mixin of XmppSession).

* ``<enable/>`` after bind → ``<enabled id resume='true' max=RESUME_SECONDS/>``.
  From then on every stanza received is counted (``sm_in``) and every stanza
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
        tag = el.tag
        if tag == "r":
            if self.sm_queue is not None:
                self.conn.write(f"<a xmlns='{SM_NS}' h='{self.sm_in}'/>".encode())
        elif tag == "a":
            if self.sm_queue is not None:
                self.sm_acked(el.get("h", ""))
        elif tag == "enable":
            if self.sm_queue is not None:
                self.conn.write(sm_failed())
                return
            self.sm_queue = deque()
            self.sm_id = secrets.token_urlsafe(18)
            self.proto.resumable[self.sm_id] = self
            self.conn.write(f"<enabled xmlns='{SM_NS}' id='{self.sm_id}' resume='true' "
                            f"max='{RESUME_SECONDS}'/>".encode())

    def sm_sent(self, data: bytes, seq: int) -> None:
        """A stanza was written: keep it until acked; ask for an ack this iteration."""
        self.sm_queue.append((data, seq))
        if len(self.sm_queue) > MAX_UNACKED:
            self.stream_error("policy-violation", "too many unacknowledged stanzas")
            return
        if not self.sm_asking:
            self.sm_asking = True
            gevent.get_hub().loop.run_callback(self.sm_request)

    def sm_request(self) -> None:
        self.sm_asking = False
        if self.sm_queue:
            self.conn.write(f"<r xmlns='{SM_NS}'/>".encode())

    def sm_acked(self, h: str) -> None:
        """The client holds every stanza up to ``h``: drop them, mark inbox entries received."""
        try:
            n = (int(h) - self.sm_out) % MOD
        except ValueError:
            return
        queue = self.sm_queue
        if n > len(queue):
            return                                # stale or impossible count: nothing is dropped
        top = 0
        for _ in range(n):
            _, seq = queue.popleft()
            if seq > top:
                top = seq
        self.sm_out = (self.sm_out + n) % MOD
        if top:
            self.note_written(top)

    # -- detaching and resuming ------------------------------------------------------------
    def sm_detach(self) -> bool:
        """The connection is gone: keep the session for a resume, if SM is on. True if kept."""
        if self.sm_queue is None or self.sm_timer is not None or not self.sm_id:
            return False
        self.sm_timer = gevent.get_hub().loop.timer(RESUME_SECONDS)
        self.sm_timer.start(self.sm_expire)
        return True

    def sm_expire(self) -> None:
        self.sm_finish("resume timeout")

    def sm_finish(self, reason: str) -> None:
        """End a detached session for good."""
        if self.sm_timer is not None:
            self.sm_timer.stop()
            self.sm_timer = None
        self.proto.resumable.pop(self.sm_id, None)
        self.sm_id = None
        self.finish(reason)

    def sm_resume(self, el: Element) -> None:
        """``<resume previd h/>`` on a fresh, authenticated stream (``self``)."""
        old = self.proto.resumable.get(el.get("previd", ""))
        if old is None or old.user != self.ident[0] or old.state_closed():
            self.conn.write(sm_failed("item-not-found"))
            return
        old.take_over(self, el.get("h", "0"))

    def take_over(self, new, h: str) -> None:
        """Move to ``new``'s connection and parser; ``new`` is discarded."""
        if self.sm_timer is not None:
            self.sm_timer.stop()
            self.sm_timer = None
        if not self.conn.closed:                  # the old TCP connection is still open
            self.conn.handler = _Gone()
            self.conn.close("resumed elsewhere", flush=False)
        conn, parser = new.conn, new.parser
        conn.handler = self
        parser.handler = self
        parser.negotiating = False
        self.conn, self.parser, self.secure = conn, parser, new.secure
        new.discard()
        self.touch()
        self.watch_parser()
        self.sm_acked(h)
        conn.write(f"<resumed xmlns='{SM_NS}' h='{self.sm_in}' previd='{self.sm_id}'/>".encode())
        for data, _ in self.sm_queue:
            conn.write(data)
        if self.sm_queue:
            self.sm_request()

    def write(self, el: Element, seq: int = 0) -> None:
        """Write a stanza (kept for XEP-0198 when enabled)."""
        self.write_bytes(tostring(el).encode(), seq)

    def write_bytes(self, data: bytes, seq: int = 0) -> None:
        """Write a serialized stanza (kept for XEP-0198 when enabled)."""
        self.conn.write(data)
        if self.sm_queue is not None:
            self.sm_sent(data, seq)
        elif seq:
            self.note_written(seq)
