"""User tokens (DESIGN.md §2): JWT HS256 signed with ``auth.secret``.

Claims: ``sub`` (user id, required), ``exp`` (required), ``role`` (host|guest,
required), optional ``plat`` (restricts the platform). Pure CPU work, no I/O:
safe in io-watcher callbacks.

PyJWT verifies every token it has not seen (its payload decoded with orjson,
through PyJWT's ``_decode_payload`` hook). A token that verified is remembered
so that the reconnects of a client that keeps its token (the normal case: one
token per session of the web tier, valid for an hour) skip PyJWT: what is
remembered is a 128-bit BLAKE2b MAC of the token string under a key drawn
at random per process, not the token. A forged or altered token has another
digest (finding one that collides would take about 2**128 tries without the
key, which never leaves the process), so a hit means the very token that
verified: its payload is decoded again (the same split and base64 as PyJWT's;
its claims were checked on the first use) and its expiry checked as PyJWT
checks it (``exp`` > now - leeway). The other time-dependent claims PyJWT
checks (``nbf``, ``iat``) only become valid with time, so a token that passed
once passes later too.

Up to ``VERIFIED_MAX`` digests are kept, per secret, in a :class:`DigestCache`:
the 16-byte digests themselves in one bytearray (~35 bytes a token at 15,000,
where a dict of int digests took ~87: the int object and its slot), in sets
of 32 slots chosen by the digest's first bytes, each set in
least-recently-used order. A hit moves its digest to the front of its set; a
new one goes to the front of its set and, when the cache holds
``VERIFIED_MAX``, the least recently used digest of that set (or of the next
set that holds any) is dropped: a flood of new tokens evicts idle ones, not
those in use (an approximation of least recently used: a digest in use
survives as many new ones in its set as the set holds). The table doubles
whenever it is half full (one pass over the digests: ~6 ms at 16,384), so a
set overflows (and drops its oldest digest early: one more PyJWT run later)
with probability below 1.4e-4 per set even just before a doubling. Not
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

VERIFIED_MAX = 20000      # verified tokens remembered (16 bytes each, in a table at most half full)

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


class DigestCache:
    """16-byte digests in ``ways``-way sets of one bytearray (see the module's doc).

    ``keys`` holds ``sets * ways`` slots of 16 bytes; set ``s`` is the slots from
    ``s * ways``, its first ``fill[s]`` in use, most recently used first. Digests
    are keyed MACs, so an attacker cannot aim tokens at one set."""

    __slots__ = ("ways", "mask", "keys", "fill", "count")

    def __init__(self, ways: int = 32, sets: int = 8) -> None:
        assert 0 < ways < 256 and sets > 0 and not sets & (sets - 1)
        self.ways = ways
        self.count = 0
        self._resize(sets)

    def _resize(self, sets: int) -> None:
        self.mask = sets - 1
        self.keys = bytearray(sets * self.ways * 16)
        self.fill = bytearray(sets)                 # digests held per set

    def __len__(self) -> int:
        return self.count

    def _find(self, d: bytes):
        """(set, its first byte, its fill, the digest's place in it or -1)."""
        s = int.from_bytes(d[:8], "little") & self.mask
        base = s * self.ways * 16
        n = self.fill[s]
        end = base + 16 * n
        keys = self.keys
        i = keys.find(d, base, end)
        while i >= 0 and (i - base) & 15:          # a match across two slots
            i = keys.find(d, i + 1, end)
        return s, base, n, (i - base) >> 4 if i >= 0 else -1

    def __contains__(self, d) -> bool:
        return type(d) is bytes and len(d) == 16 and self._find(d)[3] >= 0

    def hit(self, d: bytes) -> bool:
        """Whether ``d`` is held; if so it becomes its set's most recently used."""
        s, base, n, j = self._find(d)
        if j < 0:
            return False
        if j:
            keys = self.keys
            keys[base + 16:base + 16 * (j + 1)] = keys[base:base + 16 * j]
            keys[base:base + 16] = d
        return True

    def discard(self, d: bytes) -> None:
        s, base, n, j = self._find(d)
        if j >= 0:
            keys = self.keys
            keys[base + 16 * j:base + 16 * (n - 1)] = keys[base + 16 * (j + 1):base + 16 * n]
            self.fill[s] = n - 1
            self.count -= 1

    def add(self, d: bytes, limit: int) -> None:
        """File ``d`` (not held) as its set's most recently used; when ``limit``
        digests are held, first drop the least recently used one of its set (or
        of the next set that holds any)."""
        if self.count >= limit:
            self._evict(int.from_bytes(d[:8], "little") & self.mask)
        if 2 * self.count >= len(self.fill) * self.ways:
            self._grow()
        s = int.from_bytes(d[:8], "little") & self.mask
        ways = self.ways
        base = s * ways * 16
        n = self.fill[s]
        if n == ways:                               # the set is full: its oldest goes
            n -= 1
            self.count -= 1
        keys = self.keys
        keys[base + 16:base + 16 * (n + 1)] = keys[base:base + 16 * n]
        keys[base:base + 16] = d
        self.fill[s] = n + 1
        self.count += 1

    def _evict(self, s: int) -> None:
        fill, mask = self.fill, self.mask
        for i in range(mask + 1):
            t = (s + i) & mask
            if fill[t]:
                fill[t] -= 1                        # the last slot: the least recently used
                self.count -= 1
                return

    def _grow(self) -> None:
        """Twice the sets: set ``s`` splits into ``s`` and ``s + sets`` by one more bit
        of each digest, each keeping its order."""
        old_keys, old_fill, ways = self.keys, self.fill, self.ways
        sets = len(old_fill)
        self._resize(2 * sets)
        keys, fill, stride = self.keys, self.fill, ways * 16
        from_bytes = int.from_bytes
        for s in range(sets):
            n = old_fill[s]
            if not n:
                continue
            base = s * stride
            low, high = [], []
            for i in range(base, base + 16 * n, 16):
                d = old_keys[i:i + 16]
                (high if from_bytes(d[:8], "little") & sets else low).append(d)
            for t, part in ((s, low), (s + sets, high)):
                if part:
                    b = t * stride
                    keys[b:b + 16 * len(part)] = b"".join(part)
                    fill[t] = len(part)

    def digests(self) -> list:
        """Every digest held, set by set, most recently used first (for tests)."""
        out = []
        for s, n in enumerate(self.fill):
            base = s * self.ways * 16
            out.extend(bytes(self.keys[base + 16 * j:base + 16 * (j + 1)]) for j in range(n))
        return out


_verified = DigestCache()  # digests of the tokens that verified, for _verified_secret
_verified_secret = None


def _digest(raw: bytes) -> bytes:
    """The keyed 128-bit digest of a token's bytes."""
    h = _mac.copy()
    h.update(raw)
    return h.digest()


def verify(token: str, secret: str, leeway: int = 0) -> Identity:
    """Return the identity a valid token carries, or raise AuthError."""
    global _verified, _verified_secret
    if not isinstance(token, str) or not token:
        raise AuthError("token required")
    if secret != _verified_secret:
        _verified, _verified_secret = DigestCache(), secret
    raw = token.encode()
    key = _digest(raw)
    if _verified.hit(key):
        claims = _payload(raw)                    # checked on the first use: the same bytes
        ident = Identity(claims["sub"], claims["role"], claims.get("plat"), int(claims["exp"]))
        if ident.exp <= time.time() - leeway:
            _verified.discard(key)
            raise AuthError("token expired")
        return ident
    ident = _check(token, secret, leeway)
    _verified.add(key, VERIFIED_MAX)
    return ident


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
