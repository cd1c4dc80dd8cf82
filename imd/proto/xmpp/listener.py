"""The XMPP c2s listener hook and this node's table of bound XMPP resources.

:class:`XmppProtocol` is what the daemon registers for ``listen.xmpp`` and the
direct-TLS port ``listen.xmpps`` (XEP-0368): its ``handle(sock, addr)`` runs in
the hub for each accepted socket (a :class:`imd.net.tls.TlsSocket` on the
direct-TLS port, which makes the stream secure from the start) and creates an
:class:`XmppSession` (no greenlet). ``tls`` is the STARTTLS side (None when
not offered), reloaded by the daemon on HUP like every listener's. It also
keeps, per user, the XMPP resources bound on this node (bind conflicts are
settled here at once, and an IQ to a resource found here needs no cluster
read), the XEP-0198 sessions waiting for a resume on this node, and the
per-address login throttle.

Stanzas between resources go through the core's bus (:mod:`relay`), so they
reach resources on every node. XEP-0198 resumption is per node: a ``<resume/>``
on another node than the one holding the detached session gets
``item-not-found``; the client binds again (which ends the detached session
with a conflict, wherever it is) and gets what it missed from the inbox.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
from typing import Optional

import gevent

from ...envelope import DEVICE_RE
from ...net.tls import TlsServer, cert_pair
from . import relay
from .negotiate import AuthGuard
from .session import XmppSession
from .stanza import STREAM_CLOSE, error_reply, stream_error, stream_header, tostring

log = logging.getLogger("imd.xmpp")

ACK_DELAY = 1.0              # seconds the acks of entries written to streams are gathered (see ack_later)


class XmppProtocol:
    name = "xmpp"

    def __init__(self, router, cfg) -> None:
        self.router = router
        x = cfg.xmpp
        self.domain = x.domain.lower()
        # what a plaintext client of the direct-TLS port (XEP-0368) gets before it is closed
        self.plaintext_refusal = (
            stream_header(self.domain, "plaintext")
            + tostring(stream_error("policy-violation", "this port speaks TLS only (XEP-0368); "
                                    "use STARTTLS on the c2s port")).encode() + STREAM_CLOSE)
        self.tls = None                 # STARTTLS (imd.net.tls.TlsServer), when offered
        pair = cert_pair(cfg, "xmpp")
        if x.tls != "disabled" and pair is not None:
            self.tls = TlsServer("xmpp")
            self.tls.load(*pair)
        self.tls_required = x.tls == "required"
        # user → their one bound session here, or resource → session once they have several
        # (most users have one resource: no inner dict per connection)
        self._bound: dict = {}
        self.resumable: dict[str, XmppSession] = {}     # XEP-0198 stream id → session
        self.auth_guard = AuthGuard()
        self.ack_delay = ACK_DELAY
        self._acks: list[XmppSession] = []     # sessions with an ack to send (XmppSession.note_written)
        self._ack_timer = None

    def stop(self) -> None:
        self.send_acks()

    def ack_later(self, s: XmppSession) -> None:
        """Send ``s``'s ack (``s.send_ack()``) with the others gathered within
        ACK_DELAY. Inbox entries written to a stream count as received
        (XEP-0160); telling the core once a second per resource instead of once
        per loop iteration saves a store cursor write (and at low rates a commit
        of its own) per message. A session whose connection closes (also one
        kept for an XEP-0198 resume) or that ends sends its ack at once; a crash
        in between makes those entries arrive again (at least once)."""
        self._acks.append(s)
        if self._ack_timer is None:
            self._ack_timer = gevent.get_hub().loop.timer(self.ack_delay)
            self._ack_timer.start(self.send_acks)

    def send_acks(self) -> None:
        """Send the gathered acks now."""
        if self._ack_timer is not None:
            self._ack_timer.stop()
            self._ack_timer = None
        sessions, self._acks = self._acks, []
        for s in sessions:
            s.ack_now()

    def handle(self, sock, addr) -> None:
        s = XmppSession(self, sock)
        self.router.opened(s)

    def refuse(self, sock, code: int, reason: str) -> None:
        """A connection over a limit (imd.net.admission): our header and a stream
        error, best effort and non-blocking; the listener then closes it."""
        condition = "policy-violation" if code == 429 else "resource-constraint"
        data = (stream_header(self.domain, secrets.token_hex(8))
                + tostring(stream_error(condition, reason)).encode() + STREAM_CLOSE)
        try:
            sock.send(data)
        except OSError:
            pass

    # -- bound resources ----------------------------------------------------------
    def bound(self, user: str, resource: str, s: XmppSession) -> Optional[XmppSession]:
        """Record ``s`` as user/resource; return the session it replaces, if any."""
        entry = self._bound.get(user)
        if entry is None:
            self._bound[user] = s
            return None
        if isinstance(entry, dict):
            old = entry.get(resource)
            entry[resource] = s
        elif entry.resource == resource:
            old = entry
            self._bound[user] = s
        else:
            old = None
            self._bound[user] = {entry.resource: entry, resource: s}
        return old if old is not s else None

    def unbound(self, s: XmppSession) -> None:
        entry = self._bound.get(s.user)
        if entry is s:
            del self._bound[s.user]
        elif isinstance(entry, dict) and entry.get(s.resource) is s:
            del entry[s.resource]
            if len(entry) == 1:
                self._bound[s.user] = next(iter(entry.values()))

    def bound_here(self, user: str, resource: str) -> bool:
        """Whether ``user``'s ``resource`` is bound on this node."""
        entry = self._bound.get(user)
        if entry is None:
            return False
        return resource in entry if isinstance(entry, dict) else entry.resource == resource

    @staticmethod
    def device_of(resource: str) -> str:
        """The core device id of a resource: itself if it is a valid device id, else a digest."""
        if DEVICE_RE.fullmatch(resource):
            return resource
        return "xmpp." + hashlib.sha1(resource.encode("utf-8", "surrogatepass")).hexdigest()[:20]

    def route(self, user: str, resource: str, stanza, sender) -> None:
        """Send a stanza (``from`` already stamped) to ``user``'s XMPP resources on
        every node: the one named, or every available one with priority ≥ 0 for a
        bare JID. Nobody may get it (no such resource): it is dropped."""
        relay.stanza(self, user, resource, stanza, sender)

    def route_iq(self, user: str, resource: str, iq, sender) -> None:
        """An IQ get/set to a full JID: routed if that resource is bound on any node,
        else answered ``service-unavailable`` (RFC 6121 §8.5.3.2.2). Another node's
        resources are looked up in the cluster's presence records, in a greenlet."""
        if self.bound_here(user, resource):
            self.route(user, resource, iq, sender)
        else:
            gevent.spawn(self._route_iq_elsewhere, user, resource, iq, sender)

    def _route_iq_elsewhere(self, user: str, resource: str, iq, sender) -> None:
        try:
            found = self.router.device_elsewhere(user, self.device_of(resource))
        except Exception as e:
            log.warning("iq routing: cluster lookup failed user=%s error=%s", user, e)
            found = False
        if found:
            self.route(user, resource, iq, sender)
        elif not sender.state_closed():
            iq.attrs.pop("from", None)
            sender.write(error_reply(iq, "service-unavailable", by=self.domain))
