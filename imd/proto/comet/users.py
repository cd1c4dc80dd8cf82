"""Users on the comet port: ``/ws``, ``/im/events``, ``/im/poll``, ``/im/send`` (sessions.py: their sessions).

The envelope and guarantees are those of DESIGN.md §3, exactly as on the
raw-TCP port; only the framing differs:

- ``GET /ws?token=…[&platform&device&since]``: WebSocket, one envelope per
  text frame. With ``token`` in the URL the session authenticates at once;
  without it the first frame must be an ``auth`` envelope (as on TCP).
- ``GET /im/events?token=…``: SSE. Each envelope is ``data: {json}`` and an
  inbox entry also carries ``id: <seq>``, so the browser's ``Last-Event-ID``
  (or ``since``) resumes exactly after what it had.
- ``GET /im/poll?token=…[&since][&session][&ack][&cb]``: long-poll. The first
  poll opens a session (its id is in the ``auth`` answer); later polls name
  it with ``session`` and get everything queued since, as a JSON array (JSONP
  with ``cb``), or ``[]`` after ``limits.heartbeat`` seconds. A session that
  is not polled for ``limits.idle_timeout`` seconds ends; polling with an
  unknown session (and ``since``) simply opens a new one.
- ``POST /im/send?token=…&session=…``: one envelope as the body, handled for
  that SSE or long-poll session; its answers (``ack``, ``error``) arrive on
  the session's stream. Answer ``202 {"ok":true}``.

CORS: a browser origin must be the page's own (same ``Host``) or listed in
``comet.origins`` (``"*"``: any). Everything runs in the hub; nothing blocks.
"""

from __future__ import annotations

import logging
import secrets

import orjson

from imd import auth, envelope
from imd.envelope import EnvelopeError
from imd.proto.comet import formats as fmt
from imd.proto.comet import ws
from imd.proto.comet.http import HTTPError, Request
from imd.proto.comet.sessions import PollSession, RawSseSession, SseSession, WsSession
from imd.session import CLOSED

log = logging.getLogger("imd.comet")

JSON = "application/json; charset=utf-8"
JS = "text/javascript; charset=utf-8"
OK = b'{"ok":true}'


class Users:
    """The users' endpoints of the comet port."""

    def __init__(self, front, router) -> None:
        self.front = front
        self.router = router
        self.no_cache = (("Cache-Control", "no-cache"),)

    def dispatch(self, http, req: Request) -> None:
        path = req.path
        if req.method == "OPTIONS":
            self.preflight(http, req)
        elif path == "/ws":
            self.websocket(http, req)
        elif path == "/im/events":
            self.events(http, req)
        elif path == "/im/poll":
            self.poll(http, req)
        elif path == "/im/send":
            self.send(http, req)
        elif path.startswith("/im/dev/"):
            self.dev(http, req)
        else:
            http.reply(404, b"not found\n")

    # -- helpers ---------------------------------------------------------------------
    def cors(self, req: Request) -> tuple:
        origin = req.header("origin")
        if not origin:
            return ()
        if not ws.origin_allowed(origin, self.router.cfg.comet.origins, req.header("host")):
            raise HTTPError(403, "origin not allowed")
        return (("Access-Control-Allow-Origin", origin), ("Vary", "Origin"))

    def preflight(self, http, req: Request) -> None:
        headers = self.cors(req) + (
            ("Access-Control-Allow-Methods", "GET, POST"),
            ("Access-Control-Allow-Headers", "Content-Type, Authorization, Last-Event-ID"),
            ("Access-Control-Max-Age", "600"))
        http.reply(204, b"", headers=headers)

    def error(self, http, status: int, reason: str, headers=()) -> None:
        http.reply(status, fmt.admin_error(reason), JSON, headers)

    def auth_env(self, req: Request, p: dict, since) -> dict:
        """The ``auth`` envelope these query parameters stand for (validated)."""
        token = p.get("token") or _bearer(req)
        env = {"type": "auth", "token": token, "platform": p.get("platform", "web"),
               "device": p.get("device") or "web-" + secrets.token_hex(4)}
        if since is not None:
            env["since"] = since
        envelope.validate(env, self.router.limits.max_body)
        return env

    def session(self, sid: str, user: str):
        """The user's SSE or long-poll session on this node whose ``id`` is ``sid``
        (``<node id>.<hex serial>``), or None. Found among the node's sessions of
        that user (no table of comet sessions is kept): a session is there from
        before its ``auth`` answer, which is where its client learns the id."""
        node, _, serial = sid.rpartition(".")
        if node != self.router.node.id or not 0 < len(serial) <= 16:
            return None
        try:
            serial = int(serial, 16)
        except ValueError:
            return None
        for s in self.router.node.sessions_of(user):
            if s.serial == serial and isinstance(s, (SseSession, PollSession)):
                return s
        return None

    def verify(self, token: str):
        cfg = self.router.cfg.auth
        return auth.verify(token, cfg.secret, cfg.leeway)

    # -- endpoints ---------------------------------------------------------------------
    def websocket(self, http, req: Request) -> None:
        answer = ws.accept(req, self.router.cfg.comet.origins)
        p = req.params()
        env = None
        if p.get("token") or _bearer(req):
            try:
                env = self.auth_env(req, p, _since(p.get("since")))
            except EnvelopeError as e:
                raise HTTPError(400, e.reason) from None
        s = WsSession(self.router, http.conn)
        rest = http.take_over(s)
        http.conn.write(answer)
        self.router.opened(s)
        self.router.metrics.inc("imd_connections_total", (("protocol", "ws"),))
        if env is not None:
            self.router.receive(s, env)
        if rest:
            s.on_data(rest)

    def events(self, http, req: Request) -> None:
        if req.method != "GET":
            http.reply(405, b"Method Not Allowed\n", headers=(("Allow", "GET"),))
            return
        headers = self.cors(req)
        p = req.params()
        since = _since(req.header("last-event-id") or p.get("since"))
        try:
            env = self.auth_env(req, p, since)
            self.verify(env["token"])
        except (EnvelopeError, auth.AuthError) as e:
            self.error(http, 401 if isinstance(e, auth.AuthError) else 400, e.reason, headers)
            return
        session = SseSession if http.stream_chunked(req) else RawSseSession    # HTTP/1.0: not chunked
        s = session(self.router, http.conn)
        http.hand_over_stream(req, s, "text/event-stream; charset=utf-8",
                              self.no_cache + headers + (("X-Accel-Buffering", "no"),))
        s.write(b"retry: 3000\n\n")
        self.router.opened(s)
        self.router.receive(s, env)

    def poll(self, http, req: Request) -> None:
        if req.method != "GET":
            http.reply(405, b"Method Not Allowed\n", headers=(("Allow", "GET"),))
            return
        headers = self.cors(req)
        p = req.params()
        cb = p.get("cb", "")
        if cb and not fmt.valid_callback(cb):
            raise HTTPError(400, "bad callback")
        token = p.get("token") or _bearer(req)
        try:
            ident = self.verify(token)
        except auth.AuthError as e:
            self.error(http, 401, e.reason, headers)
            return
        s = self.session(p.get("session", ""), ident.user)
        if isinstance(s, PollSession) and s.state is not CLOSED:
            ack = _since(p.get("ack"))
            if ack is not None and s.state is not CLOSED and 0 < ack <= s.last_seq:
                self.router.receive(s, {"type": "ack", "seq": ack})
            s.touch()
            s.attach(http, cb)
            return
        try:
            env = self.auth_env(req, p, _since(p.get("since")))
        except EnvelopeError as e:
            self.error(http, 400, e.reason, headers)
            return
        s = PollSession(self.router, self)
        self.router.opened(s)
        s.attach(http, cb)
        self.router.receive(s, env)

    def send(self, http, req: Request) -> None:
        if req.method != "POST":
            http.reply(405, b"Method Not Allowed\n", headers=(("Allow", "POST"),))
            return
        headers = self.cors(req)
        p = req.params(max_fields=8) if req.query else {}
        try:
            ident = self.verify(p.get("token") or _bearer(req))
        except auth.AuthError as e:
            self.error(http, 401, e.reason, headers)
            return
        s = self.session(p.get("session", ""), ident.user)
        if s is None or s.state is CLOSED:
            self.error(http, 404, "no such session (open /im/events or /im/poll first)", headers)
            return
        try:
            env = envelope.parse(req.body, self.router.limits.max_body)
        except EnvelopeError as e:
            self.error(http, e.code, e.reason, headers)
            return
        if env["type"] == "auth":
            self.error(http, 400, "already authenticated", headers)
            return
        s.touch()
        self.router.receive(s, env)
        http.reply(202, OK, JSON, headers)


    def dev(self, http, req: Request) -> None:
        """Development sign-in for the demo page, only with ``admin.dev_tokens = true``:
        ``POST /im/dev/token {"sub","role"[,"contact"]}`` → ``{"token"}`` (and makes
        ``contact`` a contact), ``POST /im/dev/contact {"token","contact"}``."""
        cfg = self.router.cfg
        if not cfg.admin.dev_tokens or req.method != "POST":
            http.reply(404, b"not found\n")
            return
        try:
            body = orjson.loads(req.body or b"{}")
            if not isinstance(body, dict):
                raise ValueError
        except ValueError:
            self.error(http, 400, "body must be a JSON object")
            return
        contact = body.get("contact")
        if contact is not None and (not isinstance(contact, str) or not envelope.USER_RE.fullmatch(contact)):
            self.error(http, 400, "'contact' must be a user id")
            return
        if req.path == "/im/dev/token":
            try:
                token = auth.issue(cfg.auth.secret, body.get("sub") or "", body.get("role"), 86400)
            except (ValueError, TypeError) as e:
                self.error(http, 400, str(e))
                return
            user, answer = body["sub"], {"token": token}
        elif req.path == "/im/dev/contact":
            try:
                user, answer = self.verify(body.get("token") or "").user, {"ok": True}
            except auth.AuthError as e:
                self.error(http, 401, e.reason)
                return
            if contact is None:
                self.error(http, 400, "'contact' required")
                return
        else:
            http.reply(404, b"not found\n")
            return
        if contact and contact != user:
            self.router.add_contact(user, contact)
        http.reply(200, orjson.dumps(answer), JSON)


def _bearer(req: Request) -> str:
    value = req.header("authorization")
    return value[7:].strip() if value[:7].lower() == "bearer " else ""


def _since(value):
    """A non-negative seq parameter, or None when absent or not a number."""
    if value is None or value == "":
        return None
    value = value.strip()
    return int(value) if value.isdigit() and len(value) <= 16 else None
