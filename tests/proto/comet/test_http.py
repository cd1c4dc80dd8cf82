"""The bounded HTTP request parser and response writers, including hostile input."""

import pytest

from imd.proto.comet.http import (LAST_CHUNK, HTTPError, RequestParser, chunk, error_response,
                                  response, stream_head)


def parse(data, **kw):
    return RequestParser(**kw).feed(data)


def status_of(data, **kw):
    with pytest.raises(HTTPError) as e:
        p = RequestParser(**kw)
        if isinstance(data, list):
            for piece in data:
                p.feed(piece)
        else:
            p.feed(data)
    return e.value.status


def test_simple_get():
    [r] = parse(b"GET /sub?cname=a&seq=3&cb=x HTTP/1.1\r\nHost: h\r\nX-A: 1\r\nX-A: 2\r\n\r\n")
    assert (r.method, r.path, r.query, r.version, r.keep_alive) == ("GET", "/sub",
                                                                    "cname=a&seq=3&cb=x", "1.1", True)
    assert r.header("host") == "h" and r.header("x-a") == "1, 2"
    assert r.params() == {"cname": "a", "seq": "3", "cb": "x"}


def test_pipelined_and_split_anywhere():
    data = (b"GET /a HTTP/1.1\r\nHost: h\r\n\r\n"
            b"POST /pub?cname=q HTTP/1.1\r\nContent-Length: 12\r\n"
            b"Content-Type: application/x-www-form-urlencoded\r\n\r\ncontent=x%3D"
            b"GET /c HTTP/1.0\r\n\r\n")
    for split in range(1, len(data)):
        p = RequestParser()
        reqs = p.feed(data[:split]) + p.feed(data[split:])
        assert [r.path for r in reqs] == ["/a", "/pub", "/c"]
        assert reqs[1].params() == {"cname": "q", "content": "x="}
        assert reqs[2].keep_alive is False and reqs[2].version == "1.0"


def test_body_overrides_query_first_wins():
    [r] = parse(b"POST /pub?cname=a&content=q HTTP/1.1\r\nContent-Length: 23\r\n\r\n"
                b"content=b&content=c&x=1")
    assert r.params() == {"cname": "a", "content": "b", "x": "1"}


def test_chunked_body():
    [r] = parse(b"POST /im/send HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
    assert r.body == b"abcde"


def test_upgrade_keeps_the_rest():
    p = RequestParser()
    reqs = p.feed(b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n\x81\x80")
    assert reqs[0].upgrade and p.upgraded == b"\x81\x80"
    with pytest.raises(HTTPError):
        p.feed(b"more")


@pytest.mark.parametrize("data", [
    b"FOO / HTTP/1.1\r\n\r\n",
    b"\x00\x01\x02garbage\r\n\r\n",
    b"GET / HTTP/1.1\r\nBad Header: x\r\n\r\n",
    b"GET / HTTP/9.9\r\n\r\n",
    b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
    b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"GET / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\nb\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nhost: b\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nHost: \r\n\r\n",
])
def test_malformed_is_400(data):
    assert status_of(data) == 400


def test_long_target_is_414():
    assert status_of(b"GET /" + b"a" * 5000 + b" HTTP/1.1\r\n\r\n") == 414
    # also when it trickles in
    assert status_of([b"GET /"] + [b"a" * 100] * 50) in (414, 431)


def test_huge_header_is_431():
    assert status_of(b"GET / HTTP/1.1\r\nX: " + b"a" * 9000 + b"\r\n\r\n") == 431


def test_header_that_never_finishes_is_431():
    p = RequestParser()
    p.feed(b"GET / HTTP/1.1\r\nX: ")
    with pytest.raises(HTTPError) as e:
        for _ in range(1000):
            p.feed(b"a" * 100)
    assert e.value.status == 431
    assert p.in_request


def test_too_many_headers_is_431():
    data = b"GET / HTTP/1.1\r\n" + b"".join(b"X%d: 1\r\n" % i for i in range(100)) + b"\r\n"
    assert status_of(data) == 431


def test_body_limit_per_route_is_413():
    limit = lambda req: 10 if req.path == "/small" else 1000
    assert status_of(b"POST /small HTTP/1.1\r\nContent-Length: 11\r\n\r\n", body_limit=limit) == 413
    [r] = parse(b"POST /big HTTP/1.1\r\nContent-Length: 11\r\n\r\nhello world", body_limit=limit)
    assert r.body == b"hello world"
    chunked = b"POST /small HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n" + b"5\r\nhello\r\n" * 3
    assert status_of(chunked, body_limit=limit) == 413


def test_too_many_params_is_400():
    [r] = parse(b"GET /sub?" + b"&".join(b"a%d=1" % i for i in range(100)) + b" HTTP/1.1\r\n\r\n")
    with pytest.raises(HTTPError) as e:
        r.params()
    assert e.value.status == 400


def test_bad_percent_encoding_is_replaced_not_fatal():
    [r] = parse(b"GET /sub?cname=%ff%fe&seq=%zz HTTP/1.1\r\n\r\n")
    assert r.params() == {"cname": "\ufffd\ufffd", "seq": "%zz"}


def test_response_writers():
    out = response(200, b"hi", "text/plain", [("X-A", "1")])
    assert out == (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nX-A: 1\r\n"
                   b"Content-Length: 2\r\n\r\nhi")
    assert b"Connection: close\r\n" in response(404, keep_alive=False)
    err = error_response(431, "too big")
    assert err.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n")
    assert err.endswith(b"\r\n\r\ntoo big\n") and b"Connection: close" in err
    head = stream_head("text/event-stream", [("Cache-Control", "no-cache")])
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and b"Transfer-Encoding: chunked\r\n" in head
    assert head.endswith(b"\r\n\r\n")
    head10 = stream_head("text/plain", chunked=False)
    assert head10.startswith(b"HTTP/1.0 200 OK") and b"chunked" not in head10
    assert chunk(b"hello") == b"5\r\nhello\r\n" and LAST_CHUNK == b"0\r\n\r\n"
