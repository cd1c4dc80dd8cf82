"""User tokens (DESIGN.md §2): JWT HS256 signed with ``auth.secret``.

Claims: ``sub`` (user id, required), ``exp`` (required), ``role`` (host|guest,
required), optional ``plat`` (restricts the platform). Pure CPU work, no I/O:
safe in io-watcher callbacks.

PyJWT verifies every token it has not seen (its payload decoded with orjson,
through PyJWT's ``_decode_payload`` hook). A token that verified is remembered
so that the reconnects of a client that keeps its token (the normal case: one
token per session of the web tier, valid for an hour) skip PyJWT: what is
remembered is a 128-bit BLAKE2b MAC of the token string under a key drawn
at random per process, not the token (a JWT string costs ~200 bytes, a digest
~90 with its dict slot, so the cache adds little to a connection's memory).
A forged or altered token has another digest (finding one that collides would
take about 2**128 tries without the key, which never leaves the process), so
a hit means the very token that verified: its payload is decoded again (the
same split and base64 as PyJWT's; its claims were checked on the first use)
and its expiry checked as PyJWT checks it (``exp`` > now - leeway). The other
time-dependent claims PyJWT checks (``nbf``, ``iat``) only become valid with
time, so a token that passed once passes later too. Up to ``VERIFIED_MAX``
digests are kept, per secret, oldest first, each with a "used" mark that a hit
sets in place (second chance, an approximation of least-recently-used): when
the cache is full, the oldest digests that were used since they were filed go
to the young end unmarked and the oldest unused one is dropped, so a flood of
new tokens evicts idle ones, not those in use. A hit does not move its digest:
in a dict a move is a delete and an insert, whose dead slot makes the table
grow (twice the size, ~45 bytes more per token at 15,000, when every token is
verified twice, as an SSE login is, or after one reconnect storm). Not
thread-safe (the hub's greenlets only).
"""

from __future__ import annotations

import binascii
import hashlib
import os
import time
import warnings
from typing import NamedTuple, Optional

import jwt
import orjson

from .envelope import PLATFORMS, ROLES, USER_RE

VERIFIED_MAX = 20000      # verified tokens remembered (about 90 bytes each)

# A short secret is the operator's choice (the default config says change-me);
# the check below refuses nothing, so keep PyJWT's advisory warning quiet.
warnings.filterwarnings("ignore", message=".*HMAC key.*", category=Warning)


class AuthError(Exception):
    """A token that must not be accepted; ``reason`` is safe to show the client."""

    code = 401

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class Identity(NamedTuple):
    user: str
    role: str
    platform: Optional[str]      # the token's ``plat`` claim, if any
    exp: int


class _PyJWT(jwt.PyJWT):
    """PyJWT with orjson decoding the payload (its documented override point)."""

    def _decode_payload(self, decoded: dict) -> dict:
        try:
            payload = orjson.loads(decoded["payload"])
        except orjson.JSONDecodeError as e:
            raise jwt.DecodeError(f"Invalid payload string: {e}") from None
        if not isinstance(payload, dict):
            raise jwt.DecodeError("Invalid payload string: must be a json object")
        return payload


_jwt = _PyJWT()
_mac = hashlib.blake2b(digest_size=16, key=os.urandom(32))   # copied per token
_verified: dict = {}       # digest of a token that verified → used since filed (bool), oldest first, for _verified_secret
_verified_secret = None


def _digest(raw: bytes) -> int:
    """The keyed 128-bit digest of a token's bytes (an int: 48 bytes, the smallest key)."""
    h = _mac.copy()
    h.update(raw)
    return int.from_bytes(h.digest(), "little")


def verify(token: str, secret: str, leeway: int = 0) -> Identity:
    """Return the identity a valid token carries, or raise AuthError."""
    global _verified, _verified_secret
    if not isinstance(token, str) or not token:
        raise AuthError("token required")
    if secret != _verified_secret:
        _verified, _verified_secret = {}, secret
    raw = token.encode()
    key = _digest(raw)
    if key in _verified:
        claims = _payload(raw)                    # checked on the first use: the same bytes
        ident = Identity(claims["sub"], claims["role"], claims.get("plat"), int(claims["exp"]))
        if ident.exp <= time.time() - leeway:
            del _verified[key]
            raise AuthError("token expired")
        _verified[key] = True                     # used: marked in place (the table does not grow)
        return ident
    ident = _check(token, secret, leeway)
    if len(_verified) >= VERIFIED_MAX:
        _evict(_verified)
    _verified[key] = False
    return ident


def _evict(cache: dict) -> None:
    """Drop the oldest digest not used since it was filed; the used ones before
    it go to the young end, unmarked (their second chance). One pass over them:
    each was used since it last moved, so the work is bounded by the hits."""
    used = []
    victim = None
    for key, mark in cache.items():
        if not mark:
            victim = key
            break
        used.append(key)
    for key in used:
        del cache[key]
        cache[key] = False
    if victim is None:                            # all were used: now the oldest is unmarked
        victim = next(iter(cache))
    del cache[victim]


_URLSAFE = bytes.maketrans(b"-_", b"+/")


def _payload(raw: bytes) -> dict:
    """The claims of a token that verified before: PyJWT's split, and its base64
    (``urlsafe_b64decode``, lenient) without the Python layers around binascii."""
    segment = raw.rsplit(b".", 1)[0].split(b".", 1)[1]
    return orjson.loads(binascii.a2b_base64((segment + b"=" * (-len(segment) % 4)).translate(_URLSAFE)))


def _check(token: str, secret: str, leeway: int) -> Identity:
    """Verify with PyJWT."""
    try:
        claims = _jwt.decode(token, secret, algorithms=["HS256"], leeway=leeway,
                             options={"require": ["sub", "exp", "role"]})
    except jwt.ExpiredSignatureError:
        raise AuthError("token expired") from None
    except jwt.InvalidSignatureError:
        raise AuthError("token signature invalid") from None
    except jwt.MissingRequiredClaimError as e:
        raise AuthError(f"token lacks the '{e.claim}' claim") from None
    except jwt.InvalidTokenError as e:
        raise AuthError(f"token invalid: {str(e)[:80]}") from None
    return _identity(claims)


def _identity(claims: dict) -> Identity:
    """The identity verified claims carry, or AuthError."""
    sub, role, plat = claims.get("sub"), claims.get("role"), claims.get("plat")
    if not isinstance(sub, str) or not USER_RE.fullmatch(sub):
        raise AuthError("token 'sub' is not a valid user id")
    if role not in ROLES:
        raise AuthError("token 'role' must be host or guest")
    if plat is not None and plat not in PLATFORMS:
        raise AuthError("token 'plat' is not a known platform")
    return Identity(sub, role, plat, int(claims["exp"]))


def issue(secret: str, sub: str, role: str, ttl: int = 3600, platform: Optional[str] = None) -> str:
    """Mint a user token (the web tier's job; used by tests, benchmarks and dev mode)."""
    if not USER_RE.fullmatch(sub):
        raise ValueError("sub must be a user id")
    if role not in ROLES:
        raise ValueError("role must be host or guest")
    claims = {"sub": sub, "role": role, "exp": int(time.time()) + int(ttl)}
    if platform is not None:
        claims["plat"] = platform
    return jwt.encode(claims, secret, algorithm="HS256")
