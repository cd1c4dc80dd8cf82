"""``/api/v1`` of the admin port: JSON for the web tier (DESIGN.md §4's table).

Each request runs in its own greenlet (the handlers wait for the store) and
answers through the connection, which stays ``busy`` meanwhile. Bodies are
JSON objects; errors are ``{"error": reason}`` with a 4xx/5xx status: 400 bad
input, 404 unknown path, 405 wrong method, 413 body too large (the parser's
limit: ``limits.max_frame``), 503 the store is unavailable or full.
"""

from __future__ import annotations

import logging
import re
from typing import Any, Optional

import gevent
import orjson

from imd import auth, envelope
from imd.envelope import USER_RE, EnvelopeError
from imd.proto.comet import formats as fmt
from imd.store.base import StoreError, StoreFull

log = logging.getLogger("imd.admin")

JSON = "application/json; charset=utf-8"
KIND_RE = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
MAX_USERS = 10000
INBOX_LIMIT = 500
MAX_TTL = 30 * 86400
USER_PATH = re.compile(r"/api/v1/users/([^/]+)/(inbox|kick|password)\Z")


class ApiError(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def _user(value: Any, what: str = "user") -> str:
    if not isinstance(value, str) or not USER_RE.fullmatch(value):
        raise ApiError(400, f"'{what}' must be a user id (1-64 characters of [A-Za-z0-9_.-])")
    return value


def _int(value: Optional[str], default: int, lo: int, hi: int, what: str) -> int:
    if value is None or value == "":
        return default
    if not value.isdigit() or not lo <= int(value) <= hi:
        raise ApiError(400, f"'{what}' must be an integer in {lo}..{hi}")
    return int(value)


class Api:
    def __init__(self, router, node) -> None:
        self.router = router
        self.node = node

    def health(self) -> dict:
        return {"ok": True, "node": self.node.id, "sessions": self.node.count()}

    # -- routing ---------------------------------------------------------------------
    def dispatch(self, http, req) -> None:
        path, method = req.path, req.method
        route = ROUTES.get(path)
        args: tuple = ()
        if route is None:
            m = USER_PATH.match(path)
            if m is None:
                http.reply(404, fmt.admin_error("no such endpoint"), JSON)
                return
            route = USER_ROUTES[m.group(2)]
            args = (m.group(1),)
        name = route.get(method)
        if name is None:
            http.reply(405, fmt.admin_error(f"{method} not allowed here"), JSON,
                       (("Allow", ", ".join(route)),))
            return
        gevent.spawn(self._run, http, req, getattr(self, name), args)

    def _run(self, http, req, handler, args) -> None:
        try:
            status, result = 200, handler(req, *args)
        except ApiError as e:
            status, result = e.status, {"error": e.reason}
        except EnvelopeError as e:
            status, result = e.code, {"error": e.reason}
        except StoreFull:
            status, result = 503, {"error": "store busy, retry later"}
        except StoreError as e:
            status, result = 503, {"error": f"store unavailable: {e}"}
        except gevent.Timeout:
            status, result = 503, {"error": "store did not answer in time"}
        except Exception:
            log.exception("api failed path=%s", req.path)
            status, result = 500, {"error": "internal error"}
        http.reply(status, orjson.dumps(result), JSON)

    @staticmethod
    def _body(req) -> dict:
        try:
            body = orjson.loads(req.body or b"{}")
        except orjson.JSONDecodeError:
            raise ApiError(400, "body must be JSON") from None
        if not isinstance(body, dict):
            raise ApiError(400, "body must be a JSON object")
        return body

    # -- contacts and presence -----------------------------------------------------------
    def _pair(self, req) -> tuple:
        body = self._body(req)
        user, contact = _user(body.get("user")), _user(body.get("contact"), "contact")
        if user == contact:
            raise ApiError(400, "a user cannot be their own contact")
        return user, contact

    def add_contact(self, req) -> dict:
        self.router.add_contact(*self._pair(req))
        return {"ok": True}

    def remove_contact(self, req) -> dict:
        self.router.remove_contact(*self._pair(req))
        return {"ok": True}

    def contacts(self, req) -> dict:
        user = _user(req.params().get("user"))
        return {"user": user, "contacts": sorted(self.router.contacts_of(user))}

    def presence(self, req) -> dict:
        raw = req.params().get("users", "")
        users = [u for u in raw.split(",") if u]
        if not users or len(users) > 1000:
            raise ApiError(400, "'users' must list 1-1000 user ids, comma-separated")
        return self.node.presence.lookup([_user(u, "users") for u in dict.fromkeys(users)])

    # -- messages and notices ---------------------------------------------------------------
    def notices(self, req) -> dict:
        body = self._body(req)
        kind = body.get("kind")
        if not isinstance(kind, str) or not KIND_RE.fullmatch(kind):
            raise ApiError(400, "'kind' must be 1-64 characters of [A-Za-z0-9_.-]")
        content = envelope.check_body(body.get("body"), self.router.limits.max_body, "notice")
        users = role = None
        if "to" in body:
            to = body["to"]
            if not isinstance(to, list) or not 1 <= len(to) <= MAX_USERS:
                raise ApiError(400, f"'to' must be a list of 1-{MAX_USERS} user ids")
            users = list(dict.fromkeys(_user(u, "to") for u in to))
        elif "role" in body:
            role = body["role"]
            if role not in envelope.ROLES:
                raise ApiError(400, "'role' must be host or guest")
        elif body.get("all") is not True:
            raise ApiError(400, "give 'to', 'role' or 'all': true")
        entries = self.router.post_notices(users, role, kind, content)
        return {"count": len(entries), "mids": list(dict.fromkeys(e.mid for e in entries))}

    def messages(self, req) -> dict:
        body = self._body(req)
        sender = _user(body.get("from"), "from")
        cid = body.get("id")
        env = {"type": "msg", "id": cid if cid is not None else "api", "to": body.get("to"),
               "body": body.get("body")}
        if body.get("ctx") is not None:
            env["ctx"] = body["ctx"]
        envelope.validate(env, self.router.limits.max_body)
        return self.router.post_message(sender, env["to"], env["body"], env.get("ctx"), cid)

    # -- users -----------------------------------------------------------------------------------
    def inbox(self, req, user: str) -> dict:
        _user(user)
        p = req.params()
        since = _int(p.get("since"), 0, 0, envelope.MAX_SEQ, "since")
        limit = _int(p.get("limit"), 100, 1, INBOX_LIMIT, "limit")
        entries = self.router.history(user, since, limit)
        return {"user": user, "seq": self.router.last_seq(user),
                "entries": [e.envelope() for e in entries]}

    def kick(self, req, user: str) -> dict:
        return {"closed": self.router.kick(_user(user), "kicked by the web tier")}

    def password(self, req, user: str) -> dict:
        _user(user)
        password = self._body(req).get("password")
        if not isinstance(password, str) or not 1 <= len(password) <= 1024:
            raise ApiError(400, "'password' must be a string of 1-1024 characters")
        self.router.set_password(user, password)
        return {"ok": True}

    def tokens(self, req) -> dict:
        cfg = self.router.cfg
        if not cfg.admin.dev_tokens:
            raise ApiError(404, "token minting is off (admin.dev_tokens = false)")
        body = self._body(req)
        sub = _user(body.get("sub"), "sub")
        role = body.get("role")
        if role not in envelope.ROLES:
            raise ApiError(400, "'role' must be host or guest")
        ttl = body.get("ttl", 3600)
        if type(ttl) is not int or not 1 <= ttl <= MAX_TTL:
            raise ApiError(400, f"'ttl' must be an integer in 1..{MAX_TTL}")
        plat = body.get("plat")
        if plat is not None and plat not in envelope.PLATFORMS:
            raise ApiError(400, "'plat' must be one of " + ", ".join(envelope.PLATFORMS))
        return {"token": auth.issue(cfg.auth.secret, sub, role, ttl, plat)}


ROUTES = {
    "/api/v1/contacts": {"POST": "add_contact", "DELETE": "remove_contact", "GET": "contacts"},
    "/api/v1/presence": {"GET": "presence"},
    "/api/v1/notices": {"POST": "notices"},
    "/api/v1/messages": {"POST": "messages"},
    "/api/v1/tokens": {"POST": "tokens"},
}
USER_ROUTES = {"inbox": {"GET": "inbox"}, "kick": {"POST": "kick"}, "password": {"PUT": "password"}}


def register_gauges(metrics, registry) -> None:
    """The comet port's channels and iComet subscribers (the daemon counts sessions)."""
    metrics.gauge("imd_comet_channels", "live iComet channels",
                  lambda: {(): len(registry.channels)})
    metrics.gauge("imd_comet_subscribers", "iComet subscriber connections",
                  lambda: {(): registry.subscribers})
