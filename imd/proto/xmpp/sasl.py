"""Server side SASL: PLAIN (RFC 4616) and SCRAM-SHA-1 / SCRAM-SHA-256 (RFC 5802, 7677).

Passwords are never stored, only SCRAM keys (:mod:`imd.passwords`): SCRAM
checks the client proof against those; PLAIN's check recomputes them.

How a password is checked is not this module's business: :class:`Plain` takes
a ``check(user, password) -> bool`` callable (the listener tries the password as
a user token first, then the stored keys), :class:`Scram` a
``lookup(user) -> credentials | None`` callable (the router's ``credentials``).
Both callables may block (a store read), so run ``step`` in a greenlet.

A mechanism is driven with ``step(data)`` once per ``<auth>``/``<response>``
payload (already base64-decoded): it returns ``(done, payload)``; when
``done`` is false ``payload`` is the next challenge, when true it is the
``<success>`` additional data (SCRAM: ``v=…``; slixmpp requires it) and
``user`` holds the authenticated user. Failures raise :class:`SaslFailure`
with an RFC 6120 §6.5 condition. Unknown users fail exactly like wrong
passwords (same condition, fake salt, same key derivation work).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
from typing import Callable, Optional

from ...passwords import DEFAULT_ITERATIONS, b64

HASHES = {"SCRAM-SHA-256": "sha256", "SCRAM-SHA-1": "sha1"}
MECHANISMS = ("SCRAM-SHA-256", "SCRAM-SHA-1", "PLAIN")    # the order we advertise
_FAKE_SALT_KEY = os.urandom(32)      # per process: fake salts for unknown users


class SaslFailure(Exception):
    """Authentication failed: ``condition`` is the ``<failure>`` child element name."""

    def __init__(self, condition: str, text: str = "") -> None:
        super().__init__(f"{condition}: {text}" if text else condition)
        self.condition = condition
        self.text = text


def _authzid_ok(authzid: str, user: str, domain: str) -> bool:
    return authzid in ("", user, f"{user}@{domain}")


class Plain:
    """PLAIN: one message ``authzid NUL authcid NUL password``."""

    name = "PLAIN"
    __slots__ = ("check", "domain", "user")

    def __init__(self, check: Callable[[str, str], bool], domain: str) -> None:
        self.check = check
        self.domain = domain
        self.user: Optional[str] = None

    def step(self, data: bytes) -> tuple[bool, bytes]:
        if not data:
            return False, b""                    # empty initial response: ask for it
        try:
            authzid, authcid, password = data.decode("utf-8").split("\0")
        except ValueError:
            raise SaslFailure("malformed-request", "expected authzid NUL authcid NUL password") from None
        if not authcid or not password:
            raise SaslFailure("malformed-request", "empty user or password")
        if not _authzid_ok(authzid, authcid, self.domain):
            raise SaslFailure("invalid-authzid")
        if not self.check(authcid, password):
            raise SaslFailure("not-authorized")
        self.user = authcid
        return True, b""


def _attributes(msg: str) -> list[tuple[str, str]]:
    out = []
    for part in msg.split(","):
        if len(part) < 2 or part[1] != "=":
            raise SaslFailure("malformed-request", "bad SCRAM attribute")
        out.append((part[0], part[2:]))
    return out


def _unescape_saslname(name: str) -> str:
    if "=" in name.replace("=2C", "").replace("=3D", ""):
        raise SaslFailure("malformed-request", "bad saslname escape")
    return name.replace("=2C", ",").replace("=3D", "=")


class Scram:
    """SCRAM-SHA-1 / SCRAM-SHA-256 without channel binding (we offer no -PLUS)."""

    __slots__ = ("name", "hash_name", "lookup", "domain", "user", "_claimed", "_state", "_gs2", "_first_bare",
                 "_server_first", "_nonce", "_server_nonce", "_stored_key", "_server_key", "_known")

    def __init__(self, name: str, lookup: Callable[[str], Optional[dict]], domain: str,
                 server_nonce: Optional[str] = None) -> None:
        """``server_nonce`` fixes the server's nonce part (test vectors only)."""
        self.name = name
        self._server_nonce = server_nonce or secrets.token_urlsafe(18)
        self.hash_name = HASHES[name]
        self.lookup = lookup
        self.domain = domain
        self.user: Optional[str] = None
        self._state = 0

    def step(self, data: bytes) -> tuple[bool, bytes]:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise SaslFailure("malformed-request", "not UTF-8") from None
        if self._state == 0:
            return self._client_first(text)
        if self._state == 1:
            return self._client_final(text)
        raise SaslFailure("malformed-request", "unexpected response")

    def _client_first(self, text: str) -> tuple[bool, bytes]:
        if not text:
            return False, b""                    # empty initial response: ask for it
        parts = text.split(",", 2)
        if len(parts) != 3:
            raise SaslFailure("malformed-request", "bad gs2 header")
        flag, authz, bare = parts
        if flag not in ("n", "y"):
            raise SaslFailure("malformed-request", "channel binding not supported")
        if authz and not authz.startswith("a="):
            raise SaslFailure("malformed-request", "bad authzid")
        attrs = _attributes(bare)
        if len(attrs) < 2 or attrs[0][0] != "n" or attrs[1][0] != "r" or not attrs[1][1]:
            raise SaslFailure("malformed-request", "expected n=,r=")
        if any(k == "m" for k, _ in attrs):
            raise SaslFailure("malformed-request", "mandatory extension not supported")
        user = _unescape_saslname(attrs[0][1])
        if not user:
            raise SaslFailure("malformed-request", "empty user")
        if authz and not _authzid_ok(_unescape_saslname(authz[2:]), user, self.domain):
            raise SaslFailure("invalid-authzid")
        creds = self.lookup(user)
        self._known = bool(creds) and self.hash_name in creds
        if self._known:
            salt = base64.b64decode(creds["salt"])
            iterations = int(creds["iterations"])
            self._stored_key = base64.b64decode(creds[self.hash_name]["stored_key"])
            self._server_key = base64.b64decode(creds[self.hash_name]["server_key"])
        else:                                    # same answer shape as a real user
            salt = hmac.digest(_FAKE_SALT_KEY, user.encode(), "sha256")[:16]
            iterations = DEFAULT_ITERATIONS
            self._stored_key = self._server_key = b""
        self._claimed = user
        self._gs2 = flag + "," + authz + ","
        self._first_bare = bare
        self._nonce = attrs[1][1] + self._server_nonce
        self._server_first = f"r={self._nonce},s={b64(salt)},i={iterations}"
        self._state = 1
        return False, self._server_first.encode()

    def _client_final(self, text: str) -> tuple[bool, bytes]:
        self._state = 2
        attrs = _attributes(text)
        if len(attrs) < 3 or attrs[0][0] != "c" or attrs[1][0] != "r" or attrs[-1][0] != "p":
            raise SaslFailure("malformed-request", "expected c=,r=,…,p=")
        if attrs[0][1] != b64(self._gs2.encode()):
            raise SaslFailure("malformed-request", "channel binding data mismatch")
        if attrs[1][1] != self._nonce:
            raise SaslFailure("malformed-request", "nonce mismatch")
        try:
            proof = base64.b64decode(attrs[-1][1], validate=True)
        except ValueError:
            raise SaslFailure("malformed-request", "bad proof encoding") from None
        without_proof = text[: text.rindex(",p=")]
        auth_message = f"{self._first_bare},{self._server_first},{without_proof}".encode()
        h = self.hash_name
        signature = hmac.digest(self._stored_key or b"\0", auth_message, h)
        if len(proof) != len(signature):
            raise SaslFailure("not-authorized")
        client_key = bytes(a ^ b for a, b in zip(proof, signature))
        ok = hmac.compare_digest(hashlib.new(h, client_key).digest(), self._stored_key)
        if not (ok and self._known):
            raise SaslFailure("not-authorized")
        self.user = self._claimed
        server_signature = hmac.digest(self._server_key, auth_message, h)
        return True, b"v=" + base64.b64encode(server_signature)


def mechanism(name: str, check_plain: Callable[[str, str], bool],
              lookup: Callable[[str], Optional[dict]], domain: str):
    """A fresh server mechanism for the ``<auth mechanism=…>`` value, or None if unknown."""
    if name == "PLAIN":
        return Plain(check_plain, domain)
    if name in HASHES:
        return Scram(name, lookup, domain)
    return None
