"""Limits with a clear error and a metric: connections per process and per IP,
new connections per second per IP, messages per second per session."""

import socket
import struct

import orjson
import pytest

from imd.client import Client, ClientError
from tests.daemon import Imd


def refused(addr, source="127.0.0.1"):
    """Connect from ``source``; return the error envelope the server sent, or None."""
    s = socket.socket()
    s.bind((source, 0))
    s.connect(addr)
    s.settimeout(5)
    data = b""
    try:
        while True:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    except (socket.timeout, ConnectionResetError):
        pass
    finally:
        s.close()
    if len(data) < 4:
        return None
    n = struct.unpack(">I", data[:4])[0]
    return orjson.loads(data[4:4 + n])


def test_connections_per_ip(tmp_path):
    d = Imd(tmp_path, {"limits": {"max_connections_per_ip": 2}}).start()
    try:
        a = d.login("ip1")
        b = d.login("ip2")
        env = refused(d.addr["tcp"])
        assert env == {"type": "error", "code": 429, "reason": "too many connections from your address"}
        other = Client(*d.addr["tcp"])       # another source address is not affected
        other.sock.close()
        s = socket.socket()
        s.bind(("127.0.0.9", 0))
        s.connect(d.addr["tcp"])
        s.close()
        a.close()                            # a slot frees up when a connection ends
        import time
        for _ in range(50):
            try:
                c = d.login("ip3")
                break
            except (ClientError, OSError):
                time.sleep(0.1)
        assert c.ping() == {"type": "pong"} and b.ping() == {"type": "pong"}
    finally:
        d.stop()


def test_connections_per_process(tmp_path):
    d = Imd(tmp_path, {"limits": {"max_connections": 2}}).start()
    try:
        a = d.login("p1")
        d.login("p2")
        env = refused(d.addr["tcp"], "127.0.0.5")
        assert env["code"] == 503 and "full" in env["reason"]
        assert a.ping() == {"type": "pong"}
    finally:
        d.stop()


def test_new_connections_per_second_per_ip(tmp_path):
    d = Imd(tmp_path, {"limits": {"connect_rate_per_ip": 3}}).start()
    try:
        socks = []
        for _ in range(10):                         # a burst well within one second
            s = socket.socket()
            s.bind(("127.0.0.7", 0))
            s.connect(d.addr["tcp"])
            socks.append(s)
        errors = 0
        for s in socks:
            s.settimeout(1)
            try:
                data = s.recv(4096)
            except socket.timeout:
                continue                            # accepted: waiting for auth
            if data:
                env = orjson.loads(data[4:])
                assert env["code"] == 429 and "new connections" in env["reason"]
                errors += 1
            s.close()
        assert 1 <= errors <= 7
        ok = Client(*d.addr["tcp"])                 # 127.0.0.1 is not limited by 127.0.0.7's rate
        assert ok.sock.fileno() > 0
    finally:
        d.stop()


def test_message_rate_per_session(tmp_path):
    d = Imd(tmp_path, {"limits": {"msg_rate": 2, "msg_burst": 5}}).start()
    try:
        a = d.login("chatty")
        r = d.login("calm-reader")
        for i in range(5):
            a.msg("calm-reader", f"m{i}")
        with pytest.raises(ClientError) as e:
            a.msg("calm-reader", "one too many")
        assert e.value.env["code"] == 429 and "rate limit" in e.value.env["reason"]
        assert a.ping() == {"type": "pong"}          # the connection stays
        got = [r.wait_for(lambda e: e["type"] == "msg")["body"] for _ in range(5)]
        assert got == [f"m{i}" for i in range(5)]
        assert [e for e in r.drain(0.3) if e["type"] == "msg"] == []   # the refused one was not stored
    finally:
        d.stop()
