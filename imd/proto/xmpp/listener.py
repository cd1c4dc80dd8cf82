"""The XMPP c2s listener hook and this node's table of bound XMPP resources.

:class:`XmppProtocol` is what the daemon registers for ``listen.xmpp``: its
``handle(sock, addr)`` runs in the hub for each accepted socket and creates an
:class:`XmppSession` (no greenlet). It also keeps, per user, the XMPP
resources bound on this node, for what the core's per-user routing does not
carry: bind conflicts, IQs and body-less messages to a full JID, presence
among a user's own resources; plus the XEP-0198 sessions waiting for a resume
and the per-address login throttle.

Limitation: that table is per node. In a cluster, stanzas routed through it
(IQs between clients, chat states, directed presence) reach only resources on
the same node; stored messages, notices and presence go through the core and
reach every node.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
from typing import Optional

from ... import memtrim
from ...envelope import DEVICE_RE
from ...net.wheel import Wheel
from .negotiate import AuthGuard
from .session import XmppSession
from .stanza import STREAM_CLOSE, stream_error, stream_header, tostring

log = logging.getLogger("imd.xmpp")

TRIM_AFTER_FREED = 1024      # expat parsers (~13 KB each, malloc'd) freed before a heap trim


class XmppProtocol:
    name = "xmpp"

    def __init__(self, router, cfg) -> None:
        self.router = router
        self.node_id = cfg.node.id
        x = cfg.xmpp
        self.domain = x.domain.lower()
        self.tls_context = None
        if x.tls != "disabled" and x.cert and x.key:
            from .tls import server_context
            self.tls_context = server_context(cfg.path(x.cert), cfg.path(x.key))
        self.tls_required = x.tls == "required"
        self._bound: dict[str, dict[str, XmppSession]] = {}
        self.resumable: dict[str, XmppSession] = {}     # XEP-0198 stream id → session
        self.auth_guard = AuthGuard()
        # sessions with a live expat parser, checked once a second (XmppSession.on_parser_idle)
        self.parser_wheel = Wheel("on_parser_idle", after=self._after_parser_tick)
        self.parser_freed = 0         # parsers freed since the heap was last trimmed
        self.parser_wheel.start()

    def stop(self) -> None:
        self.parser_wheel.stop()

    def _after_parser_tick(self) -> None:
        """Once many idle parsers were freed, give their heap pages back to the OS."""
        if self.parser_freed >= TRIM_AFTER_FREED:
            self.parser_freed = 0
            memtrim.trim()

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
        table = self._bound.setdefault(user, {})
        old = table.get(resource)
        table[resource] = s
        return old if old is not s else None

    def unbound(self, s: XmppSession) -> None:
        table = self._bound.get(s.user)
        if table is not None and table.get(s.resource) is s:
            del table[s.resource]
            if not table:
                del self._bound[s.user]

    def resources(self, user: str) -> list:
        table = self._bound.get(user)
        return list(table.values()) if table else []

    @staticmethod
    def device_of(resource: str) -> str:
        """The core device id of a resource: itself if it is a valid device id, else a digest."""
        if DEVICE_RE.fullmatch(resource):
            return resource
        return "xmpp." + hashlib.sha1(resource.encode("utf-8", "surrogatepass")).hexdigest()[:20]

    def route(self, user: str, resource: str, stanza, sender) -> bool:
        """Deliver a stanza (``from`` already stamped) to ``user``'s XMPP resources here:
        the one named, or every available one with priority ≥ 0 for a bare JID.
        Returns whether any resource got it."""
        table = self._bound.get(user)
        if not table:
            return False
        if resource:
            s = table.get(resource)
            targets = [s] if s is not None else []
        else:
            targets = [s for s in table.values() if s.available and s.priority >= 0 and s is not sender]
        for s in targets:
            s.write(stanza)
        return bool(targets)
