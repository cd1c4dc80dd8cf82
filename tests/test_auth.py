"""User tokens: JWT HS256 with sub, exp, role (DESIGN.md §2)."""

import time

import jwt
import pytest

from imd import auth

SECRET = "a-secret-of-at-least-thirty-two-bytes"


def test_round_trip():
    ident = auth.verify(auth.issue(SECRET, "host_1", "host", 60, platform="ios"), SECRET)
    assert (ident.user, ident.role, ident.platform) == ("host_1", "host", "ios")
    assert ident.exp > time.time()


@pytest.mark.parametrize("claims,reason", [
    ({"sub": "u", "role": "guest", "exp": int(time.time()) - 100}, "expired"),
    ({"role": "guest", "exp": 9999999999}, "sub"),
    ({"sub": "u", "exp": 9999999999}, "role"),
    ({"sub": "u", "role": "guest"}, "exp"),
    ({"sub": "u", "role": "admin", "exp": 9999999999}, "role"),
    ({"sub": "u/../x", "role": "guest", "exp": 9999999999}, "sub"),
    ({"sub": 12, "role": "guest", "exp": 9999999999}, "invalid"),
    ({"sub": "u", "role": "guest", "exp": 9999999999, "plat": "palm"}, "plat"),
])
def test_bad_claims(claims, reason):
    with pytest.raises(auth.AuthError) as e:
        auth.verify(jwt.encode(claims, SECRET, algorithm="HS256"), SECRET)
    assert reason in e.value.reason


def test_wrong_secret_and_algorithms():
    good = {"sub": "u", "role": "guest", "exp": 9999999999}
    with pytest.raises(auth.AuthError, match="signature"):
        auth.verify(jwt.encode(good, "another-secret-of-thirty-two-bytes!", algorithm="HS256"), SECRET)
    with pytest.raises(auth.AuthError):
        auth.verify(jwt.encode(good, SECRET, algorithm="HS512"), SECRET)
    with pytest.raises(auth.AuthError):
        auth.verify(jwt.encode(good, None, algorithm="none"), SECRET)


@pytest.mark.parametrize("tok", ["", "a.b", "a.b.c", "x" * 5000, "ey" + "." * 3])
def test_garbage(tok):
    with pytest.raises(auth.AuthError):
        auth.verify(tok, SECRET)


def test_leeway_allows_clock_skew():
    tok = jwt.encode({"sub": "u", "role": "host", "exp": int(time.time()) - 5}, SECRET, algorithm="HS256")
    assert auth.verify(tok, SECRET, leeway=30).user == "u"
