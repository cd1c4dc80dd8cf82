"""Bad input on the raw-TCP listener: a clear error, only that connection ends,
other sessions notice nothing (issue 2)."""

import socket
import struct

import orjson
import pytest

from imd.client import Client, ClientError
from tests.daemon import Imd, token


@pytest.fixture(scope="module")
def imd(tmp_path_factory):
    d = Imd(tmp_path_factory.mktemp("bad"), {"limits": {"max_frame": 8192, "max_body": 4096}}).start()
    yield d
    d.stop()


@pytest.fixture
def bystanders(imd):
    """A chatting pair that must notice nothing of the abuse."""
    a = imd.login("bystander-a", "host")
    b = imd.login("bystander-b")
    yield a, b
    ack = a.msg("bystander-b", "still here?")
    assert b.wait_for(lambda e: e["type"] == "msg" and e["mid"] == ack["mid"])
    assert a.ping() == {"type": "pong"}
    a.close()
    b.close()


def frame(payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + payload


def error_then_eof(c: Client) -> dict:
    env = c.recv(5)
    assert env["type"] == "error", env
    with pytest.raises(ClientError):
        c.recv(5)
    return env


def authed(imd, user="abuser"):
    return imd.login(user)


CASES = {
    "garbage bytes": lambda: b"\xff\xfe\xfd\xfcGET / HTTP/1.1\r\n\r\n",
    "zero length": lambda: struct.pack(">I", 0),
    "oversized length": lambda: struct.pack(">I", 1 << 30),
    "just over max_frame": lambda: struct.pack(">I", 8193) + b"x" * 10,
    "invalid utf-8": lambda: frame(b'{"type":"ping","x":"\xff\xfe"}'),
    "invalid json": lambda: frame(b'{"type": "msg", '),
    "json array": lambda: frame(b"[1,2,3]"),
    "unknown type": lambda: frame(b'{"type":"hack"}'),
    "wrong field type": lambda: frame(b'{"type":"msg","id":"x1","to":42,"body":"hi"}'),
    "bad user id": lambda: frame(b'{"type":"msg","id":"x1","to":"../../etc","body":"hi"}'),
    "bool seq": lambda: frame(b'{"type":"ack","seq":true}'),
    "negative seq": lambda: frame(b'{"type":"sync","since":-1}'),
    "deep json": lambda: frame(b'{"type":"msg","id":"x","to":"u","body":' + b'[' * 2000 + b']' * 2000 + b'}'),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_frames_after_auth(imd, bystanders, case):
    c = authed(imd)
    c.send_raw(CASES[case]())
    env = error_then_eof(c)
    assert env["code"] in (400, 413) and env["reason"]


@pytest.mark.parametrize("case", ["garbage bytes", "zero length", "oversized length", "invalid json"])
def test_bad_frames_before_auth(imd, bystanders, case):
    c = imd.connect()
    c.send_raw(CASES[case]())
    error_then_eof(c)


def test_anything_before_auth_is_refused(imd, bystanders):
    c = imd.connect()
    c.send({"type": "msg", "id": "m1", "to": "bystander-a", "body": "sneaky"})
    env = error_then_eof(c)
    assert env["code"] == 401


@pytest.mark.parametrize("tok,reason", [
    (lambda: token("u1", ttl=-120), "expired"),
    (lambda: token("u1")[:-4] + "AAAA", "signature"),
    (lambda: "not.a.token", "invalid"),
    (lambda: __import__("jwt").encode({"sub": "u1", "role": "guest", "exp": 9999999999}, "wrong-secret-of-32-bytes-or-more!!",
                                      algorithm="HS256"), "signature"),
    (lambda: __import__("jwt").encode({"sub": "u1", "exp": 9999999999}, "test-secret-of-at-least-32-bytes!!",
                                      algorithm="HS256"), "role"),
])
def test_bad_tokens(imd, bystanders, tok, reason):
    c = imd.connect()
    c.send({"type": "auth", "token": tok(), "platform": "ios", "device": "d"})
    env = error_then_eof(c)
    assert env["code"] == 401 and reason in env["reason"]


def test_unsigned_token_refused(imd, bystanders):
    import base64
    def b64(d):
        return base64.urlsafe_b64encode(orjson.dumps(d)).rstrip(b"=").decode()
    unsigned = b64({"alg": "none", "typ": "JWT"}) + "." + b64({"sub": "u1", "role": "host", "exp": 9999999999}) + "."
    c = imd.connect()
    c.send({"type": "auth", "token": unsigned, "platform": "ios", "device": "d"})
    assert error_then_eof(c)["code"] == 401


def test_platform_must_match_token(imd, bystanders):
    c = imd.connect()
    c.send({"type": "auth", "token": token("u2", platform="ios"), "platform": "web", "device": "d"})
    assert error_then_eof(c)["code"] == 403


def test_oversized_body_is_refused_connection_stays(imd, bystanders):
    c = authed(imd)
    with pytest.raises(ClientError) as e:
        c.msg("bystander-a", "x" * 5000)
    assert e.value.env["code"] == 413
    assert c.ping() == {"type": "pong"}


def test_frame_split_into_single_bytes(imd, bystanders):
    c = imd.connect()
    data = frame(orjson.dumps({"type": "auth", "token": token("slowpoke"), "platform": "h5", "device": "d"}))
    for i in range(len(data)):
        c.send_raw(data[i:i + 1])
    assert c.recv(5)["type"] == "auth"


def test_half_open_connection_is_closed_by_auth_timeout(tmp_path):
    d = Imd(tmp_path, {"limits": {"auth_timeout": 1}}).start()
    try:
        s = socket.create_connection(d.addr["tcp"])
        s.settimeout(10)
        data = s.recv(4096)
        env = orjson.loads(data[4:])
        assert env["type"] == "close" and env["code"] == 408
        assert s.recv(4096) == b""
    finally:
        d.stop()
