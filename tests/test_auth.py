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


def test_a_verified_token_is_remembered_but_expiry_is_still_enforced(monkeypatch):
    tok = auth.issue(SECRET, "host_2", "host", 60)
    first = auth.verify(tok, SECRET)
    calls = []
    monkeypatch.setattr(auth, "_check", lambda *a: calls.append(a))
    assert auth.verify(tok, SECRET) == first and calls == []       # no second PyJWT run
    later = time.time() + 61
    monkeypatch.setattr(auth.time, "time", lambda: later)
    with pytest.raises(auth.AuthError, match="expired"):
        auth.verify(tok, SECRET)
    assert auth._digest(tok.encode()) not in auth._verified                # the next use runs PyJWT again


def test_remembered_tokens_are_per_secret_and_bounded(monkeypatch):
    tok = auth.issue(SECRET, "host_3", "host", 60)
    auth.verify(tok, SECRET)
    with pytest.raises(auth.AuthError, match="signature"):
        auth.verify(tok, "another-secret-of-thirty-two-bytes!")   # a new secret forgets the old tokens
    monkeypatch.setattr(auth, "VERIFIED_MAX", 3)
    toks = [auth.issue(SECRET, f"u{i}", "guest", 60) for i in range(5)]
    for t in toks:
        auth.verify(t, SECRET)
    assert list(auth._verified) == [auth._digest(t.encode()) for t in toks[2:]]
    auth.verify(toks[2], SECRET)                                  # a hit makes it the youngest
    auth.verify(toks[0], SECRET)
    assert list(auth._verified) == [auth._digest(t.encode()) for t in (toks[4], toks[2], toks[0])]


def test_a_flood_of_new_tokens_evicts_unused_ones_first(monkeypatch):
    monkeypatch.setattr(auth, "VERIFIED_MAX", 4)
    monkeypatch.setattr(auth, "_verified", {})
    toks = [auth.issue(SECRET, f"u{i}", "guest", 60) for i in range(10)]
    d = [auth._digest(t.encode()) for t in toks]
    for t in toks[:4]:
        auth.verify(t, SECRET)
    auth.verify(toks[0], SECRET)
    auth.verify(toks[2], SECRET)                 # 0 and 2 in use, 1 and 3 idle
    auth.verify(toks[4], SECRET)                 # 0 gets its second chance, 1 goes
    assert list(auth._verified) == [d[2], d[3], d[0], d[4]]
    auth.verify(toks[5], SECRET)                 # 2 gets its second chance, 3 goes
    assert list(auth._verified) == [d[0], d[4], d[2], d[5]]
    auth.verify(toks[6], SECRET)                 # 0 was not used again since: it goes
    assert list(auth._verified) == [d[4], d[2], d[5], d[6]]
    for t in (toks[4], toks[2], toks[5], toks[6]):
        auth.verify(t, SECRET)                   # all in use: the oldest goes after one pass
    auth.verify(toks[7], SECRET)
    assert list(auth._verified) == [d[2], d[5], d[6], d[7]]
    assert not any(auth._verified.values())      # the pass unmarked them
    calls = []
    monkeypatch.setattr(auth, "_check", lambda *a: calls.append(a))
    for t in (toks[2], toks[5], toks[6], toks[7]):
        auth.verify(t, SECRET)                   # still hits: no PyJWT run
    assert calls == []


def test_a_hit_does_not_grow_the_cache_table(monkeypatch):
    import sys
    monkeypatch.setattr(auth, "_verified", {})
    toks = [auth.issue(SECRET, f"u{i}", "guest", 60) for i in range(600)]
    for t in toks:
        auth.verify(t, SECRET)
    size = sys.getsizeof(auth._verified)
    for _ in range(3):
        for t in toks:                           # an SSE login verifies twice, a reconnect again
            auth.verify(t, SECRET)
    assert sys.getsizeof(auth._verified) == size
    assert list(auth._verified) == [auth._digest(t.encode()) for t in toks]


def test_a_token_that_failed_is_not_remembered():
    bad = jwt.encode({"sub": "u", "role": "guest", "exp": 9999999999}, "another-secret-of-thirty-two-bytes!",
                     algorithm="HS256")
    for _ in range(2):
        with pytest.raises(auth.AuthError, match="signature"):
            auth.verify(bad, SECRET)
    assert auth._digest(bad.encode()) not in auth._verified


def test_the_cache_keeps_digests_not_tokens():
    tok = auth.issue(SECRET, "host_4", "guest", 60, platform="web")
    ident = auth.verify(tok, SECRET)
    assert tok not in auth._verified and auth._digest(tok.encode()) in auth._verified
    assert auth._digest(tok.encode()) < 2 ** 128 and auth._digest(tok.encode()) != auth._digest(tok.encode() + b"x")
    assert auth.verify(tok, SECRET) == ident == auth.Identity("host_4", "guest", "web", ident.exp)


@pytest.mark.parametrize("mangle", [
    lambda h, p, s: f"{h}.{p}.{s[:-2]}{'AA' if s[-2:] != 'AA' else 'BB'}",     # another signature
    lambda h, p, s: f"{h}.{p[:-2]}.{s}",                                         # a shorter payload
    lambda h, p, s: f"{h}.{p}x.{s}",                                             # a longer one
    lambda h, p, s: f"{h}.{p}.{s}.",                                             # a trailing dot
])
def test_a_token_like_a_remembered_one_is_verified_again(mangle):
    tok = auth.issue(SECRET, "host_5", "host", 60)
    auth.verify(tok, SECRET)
    forged = mangle(*tok.split("."))
    with pytest.raises(auth.AuthError):
        auth.verify(forged, SECRET)
    assert auth.verify(tok, SECRET).user == "host_5"


@pytest.mark.parametrize("payload", [b"[1]", b"{bad", b"\xff"])
def test_payloads_that_are_not_json_objects(payload):
    import base64
    import hashlib
    import hmac

    def b64(raw):
        return base64.urlsafe_b64encode(raw).rstrip(b"=")
    signing = b64(b'{"alg":"HS256","typ":"JWT"}') + b"." + b64(payload)
    sig = hmac.new(SECRET.encode(), signing, hashlib.sha256).digest()
    with pytest.raises(auth.AuthError, match="invalid"):
        auth.verify((signing + b"." + b64(sig)).decode(), SECRET)
