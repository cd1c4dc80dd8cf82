"""The RFC 6455 opening handshake."""

import pytest

from imd.proto.comet.http import HTTPError, RequestParser
from imd.proto.comet.ws import accept, accept_key, origin_allowed


def req(extra=b"", method=b"GET", version=b"1.1"):
    head = (method + b" /ws?token=t HTTP/" + version + b"\r\nHost: h\r\n" + extra + b"\r\n")
    p = RequestParser()
    return p.feed(head)[0]


GOOD = (b"Upgrade: websocket\r\nConnection: keep-alive, Upgrade\r\n"
        b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n")


def test_rfc_example_key():
    assert accept_key("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


def test_accept():
    out = accept(req(GOOD))
    assert out.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
    assert b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n" in out
    assert out.endswith(b"\r\n\r\n")


@pytest.mark.parametrize("extra,status", [
    (GOOD.replace(b"13", b"8"), 426),
    (GOOD.replace(b"Upgrade: websocket", b"Upgrade: h2c"), 426),
    (GOOD.replace(b"keep-alive, Upgrade", b"keep-alive"), 400),
    (GOOD.replace(b"dGhlIHNhbXBsZSBub25jZQ==", b"short"), 400),
    (GOOD.replace(b"dGhlIHNhbXBsZSBub25jZQ==", b"!!!!notbase64!!!!!!!!!!="), 400),
    (GOOD.replace(b"dGhlIHNhbXBsZSBub25jZQ==", b""), 400),
    (GOOD + b"Origin: https://evil.example\r\n", 403),
])
def test_refused(extra, status):
    with pytest.raises(HTTPError) as e:
        accept(req(extra), ["https://app.example"])
    assert e.value.status == status
    if status == 426 and b"8" in extra:
        assert ("Sec-WebSocket-Version", "13") in e.value.headers


def test_method_and_version():
    with pytest.raises(HTTPError) as e:
        accept(req(GOOD + b"Content-Length: 0\r\n", method=b"POST"))
    assert e.value.status == 405


def test_origins():
    assert accept(req(GOOD + b"Origin: https://App.example\r\n"), ["https://app.example"])
    assert origin_allowed("", [])
    assert origin_allowed("https://x", ["*"])
    assert not origin_allowed("https://x", [])
    assert not origin_allowed("https://app.example.evil", ["https://app.example"])
    assert origin_allowed("http://h:8100", [], "h:8100")          # same origin
    assert not origin_allowed("http://h:8100", [], "other:8100")
