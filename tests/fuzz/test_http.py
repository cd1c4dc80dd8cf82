"""Property tests of the comet/admin HTTP request parser (imd/proto/comet/http.py;
skipped while that module is not on this branch).

Properties: only HTTPError (a 4xx status) escapes ``feed``; feeding whole or in
arbitrary pieces gives the same requests and the same outcome (see ``agree``
for how the refusal's status may differ); what a parser holds stays bounded (target ≤
max_target, head ≤ max_head, body ≤ the route's limit); valid pipelined
requests come back exactly; the bytes after an upgrade request's head are
handed over intact.
"""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.fuzz.strategies import FUZZ, mutate, split

http = pytest.importorskip("imd.proto.comet.http")

LIMITS = dict(max_head=1024, max_headers=16, max_target=256)
BODY = 200


def summary(req):
    return (req.method, req.target, req.path, req.query, dict(req.headers), req.body, req.version,
            req.keep_alive, req.upgrade)


def run(pieces):
    """(requests, error status or None, bytes after an upgrade or None)."""
    p = http.RequestParser(**LIMITS, body_limit=lambda req: BODY)
    got = []
    try:
        for i, piece in enumerate(pieces):
            got += [summary(r) for r in p.feed(piece)]
            assert p._head <= LIMITS["max_head"] + LIMITS["max_target"]
            assert p._body_len <= BODY
            if p.upgraded is not None:
                return got, None, p.upgraded + b"".join(pieces[i + 1:])
    except http.HTTPError as e:
        assert 400 <= e.status < 500, e.status
        return got, e.status, None
    finally:
        p.close()
    return got, None, None


def agree(a, b):
    """Equal; or the requests agree up to where the shorter list ends (an error drops
    the requests completed in the failing read) and: both refused — a size limit
    (414/431) can trip in one read order before a malformed byte is seen in the other
    (found by bench/fuzz: a long target with a control byte gives 400 whole, 414 in
    pieces) — or one refused with 431 (the head limit also counts raw reads)."""
    if a == b:
        return True
    short, long_ = sorted((a[0], b[0]), key=len)
    if long_[:len(short)] != short:
        return False
    return (a[1] is not None and b[1] is not None) or 431 in (a[1], b[1])


token = st.text("abcdefghijklmnopqrstuvwxyz-", min_size=1, max_size=12)
value = st.text("abcdefghijklmnopqrstuvwxyz0123456789 ;=/,.", max_size=30).map(str.strip)
path = st.lists(st.text("abcxyz0189-_.", min_size=1, max_size=10), max_size=4).map(lambda p: "/" + "/".join(p))
query = st.lists(st.tuples(token, st.text("abc019", max_size=8)), max_size=4).map(
    lambda kv: "&".join(f"{k}={v}" for k, v in kv))


@st.composite
def request(draw):
    method = draw(st.sampled_from(("GET", "POST", "PUT", "DELETE")))
    q = draw(query)
    target = draw(path) + ("?" + q if q else "")
    reserved = ("host", "content-length", "transfer-encoding", "connection", "upgrade", "expect")
    headers = draw(st.dictionaries(token.filter(lambda t: t not in reserved),
                                   value, max_size=6))
    body = draw(st.binary(max_size=BODY)) if method in ("POST", "PUT") else b""
    lines = [f"{method} {target} HTTP/1.1", "host: x"] + [f"{k}: {v}" for k, v in headers.items()]
    if body or method in ("POST", "PUT"):
        lines.append(f"content-length: {len(body)}")
    raw = ("\r\n".join(lines) + "\r\n\r\n").encode() + body
    expect = {"host": "x", **headers}
    if body or method in ("POST", "PUT"):
        expect["content-length"] = str(len(body))
    return raw, (method, target, expect, body)


@FUZZ
@given(data=st.binary(max_size=600), draw=st.data())
def test_arbitrary_bytes_in_any_split(data, draw):
    assert agree(run([data]), run(split(data, draw.draw)))


@FUZZ
@given(data=st.binary(max_size=300), draw=st.data())
def test_arbitrary_bytes_after_a_request_line(data, draw):
    data = b"GET /sub?cname=a HTTP/1.1\r\n" + data
    assert agree(run([data]), run(split(data, draw.draw)))


@FUZZ
@given(reqs=st.lists(request(), min_size=1, max_size=4), draw=st.data())
def test_valid_pipelined_requests_round_trip(reqs, draw):
    stream = b"".join(raw for raw, _ in reqs)
    got, err, _ = run(split(stream, draw.draw))
    assert err is None
    assert [(m, t.decode(), h, b) for m, t, _, _, h, b, *_ in got] == [exp for _, exp in reqs]


@FUZZ
@given(reqs=st.lists(request(), min_size=1, max_size=3), draw=st.data())
def test_mutated_requests(reqs, draw):
    data = mutate(b"".join(raw for raw, _ in reqs), draw.draw)
    assert agree(run([data]), run(split(data, draw.draw)))


@FUZZ
@given(tail=st.binary(max_size=200), draw=st.data())
def test_bytes_after_an_upgrade_are_handed_over(tail, draw):
    head = (b"GET /ws?token=t HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
    got, err, after = run(split(head + tail, draw.draw))
    assert err is None and after == tail
    assert len(got) == 1 and got[0][-1] is True


@FUZZ
@given(n=st.integers(LIMITS["max_target"] + 1, 5000), draw=st.data())
def test_oversized_target_is_414(n, draw):
    data = b"GET /" + b"a" * n + b" HTTP/1.1\r\n\r\n"
    assert run(split(data, draw.draw))[1] in (414, 431)


@FUZZ
@given(n=st.integers(LIMITS["max_head"], 20000), draw=st.data())
def test_oversized_head_is_431(n, draw):
    data = b"GET / HTTP/1.1\r\nx-big: " + b"v" * n + b"\r\n\r\n"
    assert run(split(data, draw.draw))[1] == 431


@FUZZ
@given(n=st.integers(BODY + 1, 10 ** 12), chunked=st.booleans(), draw=st.data())
def test_oversized_body_is_413(n, chunked, draw):
    if chunked:
        data = b"POST /im/send HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n" + b"%x\r\n" % n + b"z" * (BODY + 1)
    else:
        data = b"POST /im/send HTTP/1.1\r\ncontent-length: %d\r\n\r\n" % n + b"z" * min(n, BODY + 1)
    assert run(split(data, draw.draw))[1] == 413
