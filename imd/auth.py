"""User tokens (DESIGN.md §2): JWT HS256 signed with ``auth.secret``.

Claims: ``sub`` (user id, required), ``exp`` (required), ``role`` (host|guest,
required), optional ``plat`` (restricts the platform). Pure CPU work, no I/O:
safe in io-watcher callbacks.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import Optional

import jwt

from .envelope import PLATFORMS, ROLES, USER_RE

# A short secret is the operator's choice (the default config says change-me);
# the check below refuses nothing, so keep PyJWT's advisory warning quiet.
warnings.filterwarnings("ignore", message=".*HMAC key.*", category=Warning)


class AuthError(Exception):
    """A token that must not be accepted; ``reason`` is safe to show the client."""

    code = 401

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Identity:
    user: str
    role: str
    platform: Optional[str]      # the token's ``plat`` claim, if any
    exp: int


def verify(token: str, secret: str, leeway: int = 0) -> Identity:
    """Return the identity a valid token carries, or raise AuthError."""
    if not isinstance(token, str) or not token:
        raise AuthError("token required")
    try:
        claims = jwt.decode(token, secret, algorithms=["HS256"], leeway=leeway,
                            options={"require": ["sub", "exp", "role"]})
    except jwt.ExpiredSignatureError:
        raise AuthError("token expired") from None
    except jwt.InvalidSignatureError:
        raise AuthError("token signature invalid") from None
    except jwt.MissingRequiredClaimError as e:
        raise AuthError(f"token lacks the '{e.claim}' claim") from None
    except jwt.InvalidTokenError as e:
        raise AuthError(f"token invalid: {str(e)[:80]}") from None
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
