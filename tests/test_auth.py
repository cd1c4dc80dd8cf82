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
        assert auth._digest(t.encode()) in auth._verified
    assert len(auth._verified) == 3 == len(auth._verified.digests())
    assert auth._digest(tok.encode()) not in auth._verified


def test_a_hit_keeps_a_token_that_a_flood_of_new_ones_would_evict(monkeypatch):
    monkeypatch.setattr(auth, "VERIFIED_MAX", 100)
    monkeypatch.setattr(auth, "_verified", auth.DigestCache(ways=32, sets=8))
    monkeypatch.setattr(auth, "_verified_secret", SECRET)
    kept = auth.issue(SECRET, "kept", "guest", 60)
    auth.verify(kept, SECRET)
    for i in range(400):                          # four times the cache, the kept token in use
        auth.verify(auth.issue(SECRET, f"f{i}", "guest", 60), SECRET)
        auth.verify(kept, SECRET)
    assert auth._digest(kept.encode()) in auth._verified and len(auth._verified) == 100
    calls = []
    monkeypatch.setattr(auth, "_check", lambda *a: calls.append(a))
    auth.verify(kept, SECRET)
    assert calls == []


def same_set(i, first=b"\x00" * 8):
    """A 16-byte digest in set 0 whatever the table's size (its first 8 bytes are zero)."""
    return first + i.to_bytes(8, "little")


def test_each_set_of_the_digest_cache_is_least_recently_used_first():
    c = auth.DigestCache(ways=4, sets=8)
    d = [same_set(i) for i in range(6)]
    for x in d[:4]:
        c.add(x, 1000)
    assert c.digests() == [d[3], d[2], d[1], d[0]]
    assert c.hit(d[0]) and not c.hit(d[5])
    assert c.digests() == [d[0], d[3], d[2], d[1]]
    c.add(d[4], 1000)                            # the set is full: its least recently used goes
    assert c.digests() == [d[4], d[0], d[3], d[2]] and len(c) == 4
    c.discard(d[3])
    c.discard(d[5])                              # not held: nothing happens
    assert c.digests() == [d[4], d[0], d[2]] and len(c) == 3
    c.add(d[5], 3)                               # at the limit: the set's least recently used goes
    assert c.digests() == [d[5], d[4], d[0]] and len(c) == 3


def test_at_the_limit_a_digest_of_an_empty_set_evicts_from_the_next_set_that_holds_any():
    c = auth.DigestCache(ways=4, sets=8)
    a, b = same_set(1), same_set(2)
    c.add(a, 2)
    c.add(b, 2)
    other = b"\x05" + bytes(15)                  # set 5 of 8
    c.add(other, 2)
    assert c.digests() == [b, other] and len(c) == 2


def test_a_digest_is_only_found_at_a_slot_not_across_two():
    c = auth.DigestCache(ways=4, sets=8)
    first, second = b"X" * 8 + b"P" * 8, b"P" * 8 + b"Q" * 8     # both in set 0 of 8 ("X", "P": 0 mod 8)
    c.add(second, 10)
    c.add(first, 10)                             # held as XXXXXXXXPPPPPPPP PPPPPPPPQQQQQQQQ
    straddling = b"P" * 16
    assert straddling not in c and not c.hit(straddling)
    c.discard(straddling)
    assert c.digests() == [first, second]


def test_the_digest_cache_grows_at_half_full_and_keeps_every_digest_in_order():
    import random
    rnd = random.Random(9)                       # keyed MACs look like random bytes
    c = auth.DigestCache(ways=32, sets=8)
    ds = [rnd.randbytes(16) for _ in range(15200)]
    for i, x in enumerate(ds):
        c.add(x, 20000)
        if i == 99:
            assert c.hit(ds[0])                  # now the most recent of its set
    assert len(c) == 15200 and all(x in c for x in ds)
    assert len(c.fill) == 1024 and len(c.keys) == 1024 * 32 * 16   # half full at most
    assert len(c.keys) + len(c.fill) <= 36 * 15200                  # ~35 B a token
    for x in ds[:100]:
        c.hit(x)
    for _ in range(3800):                        # a flood of new ones, at the limit
        c.add(rnd.randbytes(16), 15200)
    assert len(c) == 15200 and all(x in c for x in ds[:100])        # those in use stay
    assert sum(x in c for x in ds[100:]) < 15100 - 3000             # idle ones went


def test_a_hit_does_not_grow_the_cache(monkeypatch):
    monkeypatch.setattr(auth, "_verified", auth.DigestCache())
    monkeypatch.setattr(auth, "_verified_secret", SECRET)
    toks = [auth.issue(SECRET, f"u{i}", "guest", 60) for i in range(600)]
    for t in toks:
        auth.verify(t, SECRET)
    size = len(auth._verified.keys)
    for _ in range(3):
        for t in toks:                           # an SSE login verifies twice, a reconnect again
            auth.verify(t, SECRET)
    assert len(auth._verified.keys) == size and len(auth._verified) == 600


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
    assert len(auth._digest(tok.encode())) == 16 and auth._digest(tok.encode()) != auth._digest(tok.encode() + b"x")
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
