"""Stream negotiation (RFC 6120 §4–§7): header, features, STARTTLS, SASL, bind.

A mixin of :class:`imd.proto.xmpp.session.XmppSession`; what only
negotiation needs is kept in the session's :class:`Login` until bind. Runs in the hub from the parser's callbacks; the steps that wait run
in greenlets with the parser paused (``parser.pause()``) and reading stopped,
so stanzas are still handled in order:

* STARTTLS: ``<proceed/>`` is flushed, the bytes received after
  ``<starttls/>`` are dropped, then the connection's socket is replaced by a
  :class:`imd.net.tls.TlsSocket` (handshake driven by the read watcher);
* SASL steps: checking a token is CPU only, but stored keys are a store read.

Policies: with ``xmpp.tls = "required"`` only ``<starttls>`` is offered before
TLS and ``<auth>`` gets ``encryption-required``; three failed SASL attempts
end the stream (``policy-violation``); bind conflict = the new session wins and
the old one, on this node or another, gets a ``<conflict/>`` stream error (a
phone taking over its own stale session); no resource requested → ``imd-<random>``; between SASL and
bind, ``<resume/>`` (XEP-0198) may take over a detached session instead.
Password guessing is slowed per stream (a growing delay before each
``<failure>``) and per address (:class:`AuthGuard`: after too many failures an
address gets ``temporary-auth-failure`` for a while).
"""

from __future__ import annotations

import base64
import logging
import secrets
import sys
import time

import gevent

from ... import auth
from ...store.base import StoreError
from . import jid as jidmod
from . import relay, sasl
from .parser import MAX_STANZA, StreamError
from .sm import SM_NS, sm_failed
from .stanza import (STREAM_CLOSE, STREAM_NS, XML_LANG, Element, error_reply, iq_result,
                     stream_header, tostring)
from .stanza import stream_error as stream_error_element

log = logging.getLogger("imd.xmpp")

TLS_NS = "urn:ietf:params:xml:ns:xmpp-tls"
SASL_NS = "urn:ietf:params:xml:ns:xmpp-sasl"
BIND_NS = "urn:ietf:params:xml:ns:xmpp-bind"
SESSION_NS = "urn:ietf:params:xml:ns:xmpp-session"
ROSTERVER_NS = "urn:xmpp:features:rosterver"
LIMITS_NS = "urn:xmpp:stream-limits:0"
MAX_SASL_FAILURES = 3
FAILURE_DELAY = 0.25          # seconds, times the failures so far on this stream
PLATFORM_PREFIXES = ("ios", "android", "web", "h5")
DEFAULT_PLATFORM = "android"


def platform_of(token_platform, resource: str) -> str:
    """The session's platform: the token's ``plat`` claim, else a resource prefix
    (``ios-…``, ``android.…``), else ``android``."""
    if token_platform:
        return token_platform
    head = resource.replace(".", "-").split("-", 1)[0].lower()
    return head if head in PLATFORM_PREFIXES else DEFAULT_PLATFORM


class AuthGuard:
    """Failed SASL attempts per peer address in a sliding window (one per listener).

    ``allowed(ip)`` is False once ``limit`` failures happened within ``window``
    seconds. The table is bounded: when it passes ``max_entries`` it is cleared
    of expired windows (and, under a flood of addresses, entirely)."""

    __slots__ = ("limit", "window", "max_entries", "_fails")

    def __init__(self, limit: int = 20, window: float = 60.0, max_entries: int = 100000) -> None:
        self.limit = limit
        self.window = window
        self.max_entries = max_entries
        self._fails: dict[str, tuple[float, int]] = {}

    def allowed(self, ip: str) -> bool:
        rec = self._fails.get(ip)
        return rec is None or rec[1] < self.limit or time.monotonic() - rec[0] > self.window

    def failed(self, ip: str) -> None:
        now = time.monotonic()
        rec = self._fails.get(ip)
        if rec is None or now - rec[0] > self.window:
            if len(self._fails) >= self.max_entries:
                self._fails = {k: v for k, v in self._fails.items() if now - v[0] <= self.window}
                if len(self._fails) >= self.max_entries:
                    self._fails.clear()
            self._fails[ip] = (now, 1)
        else:
            self._fails[ip] = (rec[0], rec[1] + 1)


class Login:
    """What a stream needs until it is bound (the session drops it then): whether
    our header was sent, whether the stream is encrypted, the SASL mechanism in
    progress and the failures so far, the identity once authenticated (``ident``:
    (user, role, token platform)) and the token that proved it."""

    __slots__ = ("header_sent", "secure", "mech", "failures", "ident", "token_ident")

    def __init__(self, secure: bool) -> None:
        self.header_sent = False
        self.secure = secure
        self.mech = None
        self.failures = 0
        self.ident = None
        self.token_ident = None


class Negotiation:
    __slots__ = ()

    # -- stream level -------------------------------------------------------------
    def on_stream_start(self, attrs: dict) -> None:
        proto = self.proto
        lang = (attrs.get(XML_LANG) or "en")[:35]      # echoed once, not kept
        self.login.header_sent = True
        self.conn.write(stream_header(proto.domain, secrets.token_hex(16), lang))
        if (attrs.get("to") or "").lower() != proto.domain:
            raise StreamError("host-unknown", f"this server is {proto.domain}")
        version = attrs.get("version", "1.0")
        if not version.startswith("1."):
            raise StreamError("unsupported-version", "XMPP 1.0 only")
        self.write(self.features())

    def features(self) -> Element:
        proto = self.proto
        feats = Element("features", STREAM_NS)
        login = self.login
        if login.ident is None:
            if proto.tls is not None and not login.secure:
                tls = feats.add("starttls", TLS_NS)
                if proto.tls_required:
                    tls.add("required")
                    return feats
            mechs = feats.add("mechanisms", SASL_NS)
            for name in sasl.MECHANISMS:
                mechs.add("mechanism", text=name)
        else:
            feats.add("bind", BIND_NS)
            feats.add("session", SESSION_NS).add("optional")
            feats.add("ver", ROSTERVER_NS)             # RFC 6121 §2.6: iq.roster_version
            feats.add("sm", SM_NS)
            limits = feats.add("limits", LIMITS_NS)
            limits.add("max-bytes", text=str(MAX_STANZA))
            limits.add("idle-seconds", text=str(int(self.router.limits.idle_timeout)))
        return feats

    def negotiate(self, el: Element) -> None:
        """A stanza before the session is bound."""
        if self.login.ident is None:
            if el.ns == TLS_NS and el.tag == "starttls":
                self.starttls()
            elif el.ns == SASL_NS and el.tag in ("auth", "response"):
                self.sasl_step(el)
            elif el.ns == SASL_NS and el.tag == "abort":
                self.login.mech = None
                self.sasl_failure("aborted")
            else:
                raise StreamError("not-authorized", "authenticate first")
        elif el.tag == "iq" and el.get("type") == "set" and el.find("bind", BIND_NS) is not None:
            self.bind(el)
        elif el.ns == SM_NS and el.tag == "resume":
            self.sm_resume(el)
        elif el.ns == SM_NS:
            self.conn.write(sm_failed())
        elif el.tag == "iq" and el.find("session", SESSION_NS) is not None:
            self.write(iq_result(el))
        else:
            raise StreamError("not-authorized", "bind a resource first")

    # -- STARTTLS --------------------------------------------------------------------
    def starttls(self) -> None:
        tls = self.proto.tls
        if tls is None or self.login.secure:
            self.conn.write(b"<failure xmlns='" + TLS_NS.encode() + b"'/></stream:stream>")
            self.conn.close("starttls refused")
            return
        self.write(Element("proceed", TLS_NS))
        self.parser.restart(drop=True)          # plaintext after <starttls/> is never used
        self.parser.pause()
        self.conn.pause_reading()
        gevent.spawn(self._wrap_tls, tls)

    def _wrap_tls(self, tls) -> None:
        conn = self.conn
        if not conn.wait_drained(1, timeout=10) or conn.closed:
            conn.close("starttls: proceed not sent", flush=False)
            return
        conn.sock = tls.wrap(conn.sock)
        self.login.secure = True
        self.parser.resume()
        conn.resume_reading()

    # -- SASL ----------------------------------------------------------------------------
    def sasl_step(self, el: Element) -> None:
        proto, login = self.proto, self.login
        if proto.tls_required and not login.secure:
            self.sasl_failure("encryption-required")
            return
        if el.tag == "auth":
            if not proto.auth_guard.allowed(self.peer_ip()):
                self.sasl_failure("temporary-auth-failure", "too many failed logins, try again later")
                return
            login.mech = sasl.mechanism(el.get("mechanism", ""), self.check_plain, self.lookup_scram,
                                        proto.domain)
            if login.mech is None:
                self.sasl_failure("invalid-mechanism")
                return
        elif login.mech is None:
            self.sasl_failure("malformed-request", "no authentication in progress")
            return
        text = el.text.strip()
        try:
            data = b"" if text in ("", "=") else base64.b64decode(text, validate=True)
        except ValueError:
            login.mech = None
            self.sasl_failure("incorrect-encoding")
            return
        self.parser.pause()
        self.conn.pause_reading()
        gevent.spawn(self._sasl_run, login.mech, data)

    def _sasl_run(self, mech, data: bytes) -> None:
        login = self.login
        try:
            done, payload = mech.step(data)
        except sasl.SaslFailure as e:
            login.mech = None
            login.failures += 1
            self.proto.auth_guard.failed(self.peer_ip())
            gevent.sleep(FAILURE_DELAY * login.failures)     # slows guessing on this stream
            if self.conn.closed:
                return
            self.sasl_failure(e.condition, e.text)
            if login.failures >= MAX_SASL_FAILURES:
                self.stream_error("policy-violation", "too many authentication failures")
                return
        except StoreError as e:
            log.warning("sasl: store unavailable: %s", e)
            login.mech = None
            self.sasl_failure("temporary-auth-failure")
        except Exception:
            log.exception("sasl step failed")
            login.mech = None
            self.sasl_failure("temporary-auth-failure")
        else:
            b64 = base64.b64encode(payload).decode() if payload else ""
            if not done:
                self.write(Element("challenge", SASL_NS, text=b64 or "="))
            else:
                login.mech = None
                login.ident = self.identity_of(mech.user)
                if login.ident is None:
                    self.sasl_failure("temporary-auth-failure")
                else:
                    self.write(Element("success", SASL_NS, text=b64))
                    self.parser.restart()
                    self.parser.max_stanza = MAX_STANZA
        self.resume_input()

    def resume_input(self) -> None:
        if self.conn.closed:
            return
        try:
            self.parser.resume()
        except StreamError as e:
            self.stream_error(e.condition, e.text)
            return
        self.conn.resume_reading()

    def peer_ip(self) -> str:
        try:
            return self.conn.sock.getpeername()[0]
        except OSError:
            return "-"

    def sasl_failure(self, condition: str, text: str = "") -> None:
        fail = Element("failure", SASL_NS)
        fail.add(condition)
        if text:
            fail.add("text", attrs={XML_LANG: "en"}, text=text)
        self.write(fail)

    # -- credential checks (called by the SASL mechanisms, in a greenlet) -----------------
    def check_plain(self, user: str, password: str) -> bool:
        """PLAIN: the password is a user token for ``user``, or the password set for them."""
        if not jidmod.valid_localpart(user):
            return False
        cfg = self.router.cfg
        try:
            ident = auth.verify(password, cfg.auth.secret, cfg.auth.leeway)
        except auth.AuthError:
            ident = None
        if ident is not None:
            if ident.user != user:
                return False
            self.login.token_ident = ident
            return True
        return self.router.check_password(user, password)

    def lookup_scram(self, user: str):
        return self.router.credentials(user) if jidmod.valid_localpart(user) else None

    def identity_of(self, user: str):
        """(user, role, token platform) once SASL succeeded; blocks (a store read)."""
        tok = self.login.token_ident
        if tok is not None and tok.user == user:
            return (tok.user, tok.role, tok.platform)     # the token's strings: no second copy kept
        try:
            role = self.router.role_of(user)
        except StoreError:
            return None
        return (user, role or "guest", None)

    # -- bind ------------------------------------------------------------------------------
    def bind(self, iq: Element) -> None:
        requested = iq.find("bind", BIND_NS).findtext("resource", BIND_NS) or ""
        requested = requested.strip()
        if requested and not jidmod.valid_resource(requested):
            self.write(error_reply(iq, "bad-request", "invalid resource"))
            return
        resource = requested or "imd-" + secrets.token_hex(6)
        user, role, token_platform = self.login.ident
        self.login = None                         # login leaves nothing behind once bound
        role = sys.intern(role)                   # "host"/"guest": one shared string, not one per token
        old = self.proto.bound(user, resource, self)
        if old is not None:
            old.stream_error("conflict", "replaced by a new connection")
        self.resource = resource
        self.parser.negotiating = False
        result = Element("bind", BIND_NS)
        result.add("jid", text=jidmod.make(user, self.proto.domain, resource))    # self.user is set below
        self.write(iq_result(iq, result))
        self.router.start_session(self, user, role, platform_of(token_platform, resource),
                                  self.proto.device_of(resource), None)
        relay.bound(self)                         # a session of this resource on another node ends

    # -- errors --------------------------------------------------------------------------------
    def stream_error(self, condition: str, text: str = "") -> None:
        """Send a stream error (after our header, if none was sent yet) and close."""
        self.ack_now()             # before a new session of this resource (a conflict) reads the inbox
        self.sm_unresumable()                     # a stream ended by an error is not resumable
        if self.sm_detached():                    # nothing to write to
            self.sm_finish("stream error: " + condition)
            return
        conn = self.conn
        if conn.closed:
            return
        login = self.login
        if login is not None and not login.header_sent:     # (a bound stream sent its header)
            login.header_sent = True
            conn.write(stream_header(self.proto.domain, secrets.token_hex(16)))
        conn.write(tostring(stream_error_element(condition, text)).encode() + STREAM_CLOSE)
        log.debug("stream error %s (%s) peer=%s", condition, text, conn.peer)
        conn.close("stream error: " + condition)
