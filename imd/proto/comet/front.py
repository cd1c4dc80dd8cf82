"""The comet port (DESIGN.md §4): iComet's front API and the users' endpoints.

iComet: ``/sub`` = ``/poll`` (long-poll, JSONP), ``/iframe``, ``/stream``,
``/sse``, ``/ping`` — each subscriber is a :class:`CometSub`, the transport
side of :class:`~imd.proto.comet.channels.Subscriber`. Users: ``/ws``,
``/im/events``, ``/im/poll``, ``/im/send`` (imd/proto/comet/users.py).

:class:`CometProtocol` is the listener hook (``handle(sock, addr)``, like
imd/proto/tcp.py's). It owns the channel :class:`Registry` and its
:class:`~imd.proto.comet.bus.CometBus` (shared with the admin port, whose
operations reach every node's registry through the bus) and the one timer
that sweeps it each second. Everything runs in
the hub; nothing here blocks.
"""

from __future__ import annotations

import logging
import os

import gevent

from imd.proto.comet import formats as fmt
from imd.proto.comet.bus import CometBus
from imd.proto.comet.channels import SEQ_MASK, Refused, Registry, Subscriber, valid_cname
from imd.proto.comet.http import HTTPError, Request, chunk
from imd.proto.comet.server import PLAINTEXT_REFUSAL, HttpConn, raw_socket
from imd.proto.comet.users import Users

log = logging.getLogger("imd.comet")

POLL, IFRAME, STREAM, SSE = "poll", "iframe", "stream", "sse"
ROUTES = {"/sub": POLL, "/poll": POLL, "/iframe": IFRAME, "/stream": STREAM, "/sse": SSE}
_ENCODE = {IFRAME: fmt.iframe_chunk, STREAM: fmt.stream_chunk, SSE: fmt.sse_event}
_CHUNKED = {kind: (kind + "/chunked", lambda m, encode=encode: chunk(encode(m)))
            for kind, encode in _ENCODE.items()}     # Message.encoded keys and makers
NO_CACHE = (("Expires", "0"), ("Cache-Control", "no-cache"))
JSON = "application/json; charset=utf-8"
JS = "text/javascript; charset=utf-8"
CONTENT = {IFRAME: "text/html; charset=utf-8", STREAM: JSON, SSE: "text/event-stream; charset=utf-8"}
SMALL_BODY = 1024
STATIC = {"/": ("index.html", "text/html; charset=utf-8"),
          "/imd.js": ("imd.js", "text/javascript; charset=utf-8")}
STATIC_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(__file__))), "static")


def load_static() -> dict:
    """path → (bytes, content type) of the demo page and the JS client, read at start."""
    out = {}
    for path, (name, ctype) in STATIC.items():
        with open(os.path.join(STATIC_DIR, name), "rb") as f:
            out[path] = (f.read(), ctype)
    return out


def registry_options(cfg) -> dict:
    """The Registry's options from ``[comet]`` (and ``presence.grace``)."""
    c = cfg.comet
    return dict(auth=c.auth, max_channels=c.max_channels,
                max_subscribers_per_channel=c.max_subscribers_per_channel,
                channel_buffer_size=c.channel_buffer_size, channel_timeout=c.channel_timeout,
                polling_timeout=c.polling_timeout, presence_grace=cfg.presence.grace)


def atoi(value: str) -> int:
    """C ``atoi`` as iComet uses it: leading integer or 0, as a 32-bit seq."""
    value = value.strip()
    n = len(value) - len(value.lstrip("+-"))
    end = n
    while end < len(value) and value[end].isdigit():
        end += 1
    try:
        return int(value[:end]) & SEQ_MASK
    except ValueError:
        return 0


class CometSub(Subscriber):
    """One iComet subscriber connection (long-poll, iframe, stream or SSE)."""

    __slots__ = ("registry", "http", "kind", "cb", "answered")

    def __init__(self, registry: Registry, http: HttpConn, kind: str, cb: str, seq: int,
                 noop: int) -> None:
        super().__init__(seq, noop)
        self.registry = registry
        self.http = http
        self.kind = kind
        self.cb = cb
        self.answered = False

    @property
    def oneshot(self) -> bool:          # long-poll: done after the first batch
        return self.kind is POLL

    def push(self, msgs, array=False) -> None:
        http, kind = self.http, self.kind
        if kind is POLL:
            if not self.answered:
                self.answered = True
                http.reply(200, fmt.poll_body(msgs, array, self.cb), JS if self.cb else JSON,
                           NO_CACHE)
            return
        if http.chunked:              # the HTTP chunk too is made once per message
            key, make = _CHUNKED[kind]
            for m in msgs:
                if not http.conn.write(m.encoded(key, make)):
                    return
            return
        encode = _ENCODE[kind]
        for m in msgs:
            if not http.send(encode(m)):
                return

    def end(self) -> None:
        if self.kind is POLL:
            if not self.answered:
                self.answered = True
                self.http.conn.close("comet shutdown")
            return
        self.http.end_stream()

    def gone(self) -> None:
        """The client left before the model ended it."""
        self.registry.unsubscribe(self)


class CometProtocol:
    """The comet port's listener hook and request router."""

    name = "comet"
    plaintext_refusal = PLAINTEXT_REFUSAL    # on an HTTPS port (tls.comet)

    def __init__(self, router, registry: Registry = None) -> None:
        cfg = router.cfg
        self.router = router
        self.cfg = cfg
        self.limits = router.limits
        self.wheel = router.wheel
        self._options = registry_options(cfg)
        self.registry = registry or Registry(**self._options)
        self.bus = CometBus(router.node, self.registry, cfg.engine.backend != "memory")
        self.users = Users(self, router)
        self.static = load_static()
        self.connections = 0
        self._timer = gevent.get_hub().loop.timer(1.0, 1.0)
        self._timer.start(self._sweep)

    def stop(self) -> None:
        self._timer.stop()
        self.registry.shutdown()

    def _sweep(self) -> None:
        """Once a second: pick up reloaded ``[comet]`` options, then sweep."""
        try:
            options = registry_options(self.router.cfg)
            if options != self._options:
                self.registry.configure(**options)
                self._options = options
            self.registry.sweep()
            self.bus.tick(self.registry.clock())
        except Exception:
            log.exception("comet sweep failed")

    # -- listener hook -------------------------------------------------------------
    def handle(self, sock, addr) -> None:
        HttpConn(raw_socket(sock), self, self.limits.send_buffer)

    def body_limit(self, req: Request) -> int:
        return self.limits.max_frame if req.path == "/im/send" else SMALL_BODY

    def dispatch(self, http: HttpConn, req: Request) -> None:
        path = req.path
        kind = ROUTES.get(path)
        if kind is not None:
            self.subscribe(http, req, kind)
        elif path == "/ping":
            self.ping(http, req)
        elif path.startswith("/im/") or path == "/ws":
            self.users.dispatch(http, req)
        elif path in self.static and req.method == "GET":
            body, ctype = self.static[path]
            http.reply(200, body, ctype, (("Cache-Control", "no-cache"),))
        else:
            http.reply(404, b"not found\n")

    # -- iComet endpoints -------------------------------------------------------------
    def subscribe(self, http: HttpConn, req: Request, kind: str) -> None:
        if req.method != "GET":
            http.reply(405, b"Method Not Allowed\n", headers=(("Allow", "GET"),))
            return
        p = req.params()
        cname, cb = p.get("cname", ""), p.get("cb", "")
        if not valid_cname(cname):
            raise HTTPError(400, "bad cname")
        if cb and not fmt.valid_callback(cb):
            raise HTTPError(400, "bad callback")
        sub = CometSub(self.registry, http, kind, cb if kind is POLL else "",
                       atoi(p.get("seq", "0")), atoi(p.get("noop", "0")))
        if kind is POLL:
            http.hold(sub)
        else:
            headers = NO_CACHE + (("Access-Control-Allow-Origin", "*"),) if kind is SSE else NO_CACHE
            http.start_stream(req, sub, CONTENT[kind], headers)
            if kind is IFRAME:
                http.send(fmt.IFRAME_HEADER)
        try:
            self.registry.subscribe(cname, sub, p.get("token", ""))
        except Refused as r:
            sub.push([fmt.error_message(cname, r.kind, r.reason)], False)
            sub.end()

    def ping(self, http: HttpConn, req: Request) -> None:
        cb = req.params().get("cb", "") or fmt.DEFAULT_CALLBACK
        if not fmt.valid_callback(cb):
            raise HTTPError(400, "bad callback")
        http.reply(200, fmt.ping(int(self.registry.polling_timeout), cb), JS, NO_CACHE)
