"""The admin port (DESIGN.md §4): iComet's admin API, ``/api/v1``, ``/metrics``, ``/healthz``.

Access: every request passes the ``admin.allow``/``admin.deny`` IP filter
(iComet semantics, imd/proto/comet/ipfilter.py; refused: ``403 Forbidden``
and the connection closes) and, when ``admin.secret`` is set,
``Authorization: Bearer <secret>`` (``401``; ``/healthz`` is exempt).

iComet (``/pub /push /broadcast /sign /close /clear /info /check /psub``)
works on the comet port's channel :class:`Registry` in the hub; the
operations that change channels go through the bus to every node's replica
(imd/proto/comet/bus.py). ``/api/v1``
answers JSON (errors ``{"error": reason}``); its handlers that wait for the
store run in a greenlet each (:mod:`imd.proto.admin_api`).
"""

from __future__ import annotations

import hmac
import logging

from imd.proto import admin_api
from imd.proto.comet import formats as fmt
from imd.proto.comet.channels import Refused, valid_cname
from imd.proto.comet.http import HTTPError, Request
from imd.proto.comet.ipfilter import IpFilter
from imd.proto.comet.server import PLAINTEXT_REFUSAL, HttpConn, raw_socket

log = logging.getLogger("imd.admin")

JSON = "application/json; charset=utf-8"
JS = "text/javascript; charset=utf-8"
TEXT = "text/plain; charset=utf-8"
METRICS = "text/plain; version=0.0.4; charset=utf-8"


class PresenceListener:
    """One ``/psub`` stream: ``1 cname``/``0 cname`` lines as channels come and go."""

    __slots__ = ("registry", "http")

    def __init__(self, registry, http: HttpConn) -> None:
        self.registry = registry
        self.http = http

    def presence(self, online: bool, cname: str) -> None:
        self.http.send(fmt.presence_line(online, cname))

    def gone(self) -> None:
        self.registry.remove_listener(self)


class UserPresenceListener:
    """One ``/psub?users=1`` stream: ``1 user`` (online or away) / ``0 user`` (offline)
    lines from the node's user presence (imd/presence.py)."""

    __slots__ = ("presence", "http")

    def __init__(self, presence, http: HttpConn) -> None:
        self.presence = presence
        self.http = http

    def __call__(self, user: str, status: str, platforms) -> None:
        self.http.send(fmt.presence_line(status != "offline", user))

    def gone(self) -> None:
        if self in self.presence.listeners:
            self.presence.listeners.remove(self)


class AdminProtocol:
    """The admin port's listener hook and request router."""

    name = "admin"
    plaintext_refusal = PLAINTEXT_REFUSAL    # on an HTTPS port (tls.admin)

    def __init__(self, router, node, comet) -> None:
        """``comet``: the comet port's CometProtocol (its registry and bus)."""
        self.router = router
        self.node = node
        self.registry = comet.registry
        self.bus = comet.bus
        self.limits = router.limits
        self.wheel = router.wheel
        self.api = admin_api.Api(router, node)
        self._filter_key = None
        self._filter = None
        admin_api.register_gauges(router.metrics, self.registry)

    # -- listener hook ---------------------------------------------------------------
    def handle(self, sock, addr) -> None:
        HttpConn(raw_socket(sock), self, self.limits.send_buffer)

    def body_limit(self, req: Request) -> int:
        return self.limits.max_frame

    def ip_filter(self) -> IpFilter:
        cfg = self.router.cfg.admin
        key = (tuple(cfg.allow), tuple(cfg.deny))
        if key != self._filter_key:
            self._filter_key, self._filter = key, IpFilter(*key)
        return self._filter

    def dispatch(self, http: HttpConn, req: Request) -> None:
        if not self.ip_filter().check(http.ip):
            log.info("admin deny peer=%s", http.conn.peer)
            http.keep = False
            http.reply(403, b"Forbidden\n")
            return
        path = req.path
        if path == "/healthz":
            http.reply(200, fmt.admin_json(self.api.health()), JSON)
            return
        secret = self.router.cfg.admin.secret
        if secret and not hmac.compare_digest(req.header("authorization").encode(),
                                              b"Bearer " + secret.encode()):
            http.reply(401, fmt.admin_error("admin secret required"), JSON,
                       (("WWW-Authenticate", "Bearer"),))
            return
        if path.startswith("/api/v1/"):
            self.api.dispatch(http, req)
            return
        handler = ICOMET.get(path)
        if handler is not None:
            handler(self, http, req)
        elif path == "/metrics":
            http.reply(200, self.router.metrics.render().encode(), METRICS)
        else:
            http.reply(404, b"not found\n")

    # -- iComet ---------------------------------------------------------------------
    def _params(self, req: Request, methods=("GET", "POST")) -> dict:
        if req.method not in methods:
            raise _Answer(405, b"Invalid Method\n")
        return req.params()

    @staticmethod
    def _cname(p: dict) -> str:
        cname = p.get("cname", "")
        if not valid_cname(cname):
            raise HTTPError(400, "bad cname")
        return cname

    @staticmethod
    def _cb(p: dict):
        cb = p.get("cb")
        if cb is not None and not fmt.valid_callback(cb):
            raise HTTPError(400, "bad callback")
        return cb or None

    def pub(self, http, req, encoded: bool = True) -> None:
        p = self._params(req)
        cname, cb = self._cname(p), self._cb(p)
        content = p.get("content", "")
        reg = self.registry
        if cname not in reg.channels and len(reg.channels) >= reg.max_channels:
            http.reply(429, b"Too Many Channels\n")
            return
        self.bus.publish("pub", cname=cname, content=fmt.pub_content(content) if encoded else content)
        self.router.metrics.inc("imd_comet_published_total", (("endpoint", req.path),))
        http.reply(200, fmt.pub_ok(cb), JS)

    def push(self, http, req) -> None:
        self.pub(http, req, encoded=False)

    def broadcast(self, http, req) -> None:
        p = self._params(req)
        self.bus.publish("broadcast", content=p.get("content", ""))
        http.reply(200, fmt.BROADCAST_OK)

    def sign(self, http, req) -> None:
        p = self._params(req)
        cname, cb = self._cname(p), self._cb(p)
        try:
            expires = int(p.get("expires", "0") or 0)
        except ValueError:
            expires = 0
        expires = self.registry.sign_expiry(expires)
        try:
            ch, token = self.registry.sign(cname, expires)
        except Refused:
            http.reply(429, b"Too Many Channels\n")
            return
        self.bus.publish("sign", cname=cname, expires=expires, token=token)
        http.reply(200, fmt.sign(ch, token, expires, int(self.registry.polling_timeout), cb),
                   JS if cb else JSON)

    def close(self, http, req) -> None:
        self._seq_answer(http, req, "close")

    def clear(self, http, req) -> None:
        self._seq_answer(http, req, "clear")

    def _seq_answer(self, http, req, op: str) -> None:
        cname = self._cname(self._params(req))
        ch = self.registry.get(cname)
        if ch is None:
            http.reply(404, fmt.not_connected(cname))
            return
        self.bus.publish(op, cname=cname)
        http.reply(200, fmt.ok_seq(ch.seq_next))

    def info(self, http, req) -> None:
        p = self._params(req)
        cname = p.get("cname", "")
        http.reply(200, fmt.info(self.registry.info(cname)), JSON)

    def check(self, http, req) -> None:
        p = self._params(req)
        cname = p.get("cname", "")
        http.reply(200, fmt.check(cname, self.registry.check(cname)), JSON)

    def psub(self, http, req) -> None:
        p = self._params(req)
        if p.get("users") in ("1", "true"):
            listener = UserPresenceListener(self.node.presence, http)
            http.start_stream(req, listener, TEXT, (("Cache-Control", "no-cache"),))
            for user in list(self.node.sessions):
                http.send(fmt.presence_line(True, user))
            self.node.presence.listeners.append(listener)
            return
        listener = PresenceListener(self.registry, http)
        http.start_stream(req, listener, TEXT, (("Cache-Control", "no-cache"),))
        for cname in self.registry.add_listener(listener):
            listener.presence(True, cname)


class _Answer(HTTPError):
    """A plain answer that keeps the connection (iComet's 405)."""

    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(status)
        self.body = body


def _guard(fn):
    def run(self, http, req):
        try:
            fn(self, http, req)
        except _Answer as a:
            http.reply(a.status, a.body)
    return run


ICOMET = {path: _guard(getattr(AdminProtocol, name)) for path, name in (
    ("/pub", "pub"), ("/push", "push"), ("/broadcast", "broadcast"), ("/sign", "sign"),
    ("/close", "close"), ("/clear", "clear"), ("/info", "info"), ("/check", "check"),
    ("/psub", "psub"))}
