"""TLS on every listener, with real clients and a test CA made here (tests/tlsca.py).

One daemon with raw TCP over TLS (``tls.tcp``), HTTPS/WSS on the comet port
(``tls.comet``), HTTPS on the admin port (``tls.admin``), XMPP STARTTLS and
direct TLS (``listen.xmpps``): imd.client over TLS, requests over https,
websocket-client over wss, ALPN, TLS versions, and hostile input (garbage,
truncated handshakes, plaintext on TLS ports) while a sentinel connection
keeps working. Certificate rotation on SIGHUP is in test_tls_reload.py; slixmpp
over direct TLS in tests/proto/xmpp/test_tls.py; Chromium over https in
tests/proto/comet/test_webim_browser.py.
"""

from __future__ import annotations

import os
import re
import socket
import ssl
import time

import orjson
import pytest
import requests
import websocket

from imd.client import Client, ClientError
from tests.daemon import Imd, token
from tests.tlsca import TestCA, serial_of

TIMEOUT = 10


@pytest.fixture(scope="module")
def ca(tmp_path_factory):
    return TestCA(tmp_path_factory.mktemp("ca"))


@pytest.fixture(scope="module")
def imd(tmp_path_factory, ca):
    cert, key = ca.issue("srv", serial=0x1001)
    d = Imd(tmp_path_factory.mktemp("imd-tls"), {
        "listen": {"comet": "127.0.0.1:0", "admin": "127.0.0.1:0", "xmpp": "127.0.0.1:0",
                   "xmpps": "127.0.0.1:0"},
        "tls": {"cert": cert, "key": key, "tcp": True, "comet": True, "admin": True},
        "admin": {"dev_tokens": True},
        "limits": {"auth_timeout": 2, "max_body": 100000, "max_frame": 200000},
    }).start()
    yield d
    d.stop()
    assert "Traceback" not in d.log_text(), d.log_text()


def url(d, listener, path, scheme="https"):
    host, port = d.addr[listener]
    return f"{scheme}://{host}:{port}{path}"


def tls_client(d, ca) -> Client:
    host, port = d.addr["tcp"]
    return Client(host, port, tls=ca.client_context(), server_hostname="localhost")


def metrics(d, ca) -> str:
    return requests.get(url(d, "admin", "/metrics"), verify=ca.cert, timeout=TIMEOUT).text


def metric(text: str, name: str, **labels) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    m = re.search(re.escape(name) + r"\{" + re.escape(want) + r"\} (\S+)", text)
    return float(m.group(1)) if m else 0.0


def test_listeners_log_tls(imd):
    text = imd.log_text()
    for name in ("tcp", "comet", "admin", "xmpps"):
        assert re.search(rf"listening name={name} addr=\S+ tls=yes", text)
    assert re.search(r"listening name=xmpp addr=\S+ tls=starttls", text)     # xmpp.tls = "optional"


# -- raw TCP ---------------------------------------------------------------------------
def test_raw_tcp_chat_over_tls(imd, ca):
    with tls_client(imd, ca) as alice, tls_client(imd, ca) as bob:
        assert serial_of(alice.sock) == 0x1001
        assert alice.sock.version() in ("TLSv1.2", "TLSv1.3")
        alice.auth(token("t_alice"), device="a1")
        bob.auth(token("t_bob"), device="b1")
        body = "x" * 60000                               # several TLS records in one frame
        ack = alice.msg("t_bob", body)
        env = bob.wait_for(lambda e: e.get("type") == "msg")
        assert env["body"] == body and env["mid"] == ack["mid"]
        for i in range(200):                             # many small writes coalesced per flush
            alice.msg("t_bob", f"m{i}", wait=False)
        got = [bob.wait_for(lambda e: e.get("type") == "msg")["body"] for _ in range(200)]
        assert got == [f"m{i}" for i in range(200)]
        assert alice.ping()["type"] == "pong"


def test_raw_tcp_client_verifies_the_name(imd, ca):
    host, port = imd.addr["tcp"]
    with pytest.raises(ssl.SSLCertVerificationError):
        Client(host, port, tls=ca.client_context(), server_hostname="not-this-host.example")
    with pytest.raises(ssl.SSLCertVerificationError):
        Client(host, port, tls=True, server_hostname="localhost")          # the system CAs do not know ours


# -- comet: HTTPS and WSS ----------------------------------------------------------------
def test_https_icomet_and_admin(imd, ca):
    r = requests.get(url(imd, "comet", "/ping?cb=cb"), verify=ca.cert, timeout=TIMEOUT)
    assert r.status_code == 200 and r.text.startswith("cb(")
    r = requests.get(url(imd, "admin", "/pub?cname=tlsch&content=hello"), verify=ca.cert, timeout=TIMEOUT)
    assert r.status_code == 200 and r.json() == {"type": "ok"}
    r = requests.get(url(imd, "comet", "/sub?cname=tlsch&seq=1"), verify=ca.cert, timeout=TIMEOUT)
    assert r.status_code == 200 and '"content":"hello"' in r.text
    with requests.Session() as s:                          # keep-alive: several requests, one TLS session
        for _ in range(5):
            assert s.get(url(imd, "comet", "/ping"), verify=ca.cert, timeout=TIMEOUT).status_code == 200


def test_wss_chat(imd, ca):
    host, port = imd.addr["comet"]
    opts = {"ca_certs": ca.cert, "server_hostname": "localhost"}

    def login(user, device):
        ws = websocket.create_connection(f"wss://{host}:{port}/ws?token={token(user)}&device={device}",
                                         timeout=TIMEOUT, sslopt=opts)
        hello = orjson.loads(ws.recv())
        assert hello["type"] == "auth" and hello["user"] == user
        return ws

    a, b = login("w_alice", "wa"), login("w_bob", "wb")
    try:
        body = "y" * 30000
        a.send(orjson.dumps({"type": "msg", "id": "c1", "to": "w_bob", "body": body}))
        while True:
            env = orjson.loads(b.recv())
            if env["type"] == "msg":
                break
        assert env["body"] == body
        # a raw-TCP TLS client in the same conversation
        with tls_client(imd, ca) as c:
            c.auth(token("w_carol"), device="wc")
            c.msg("w_bob", "from tcp")
            while True:
                env = orjson.loads(b.recv())
                if env["type"] == "msg":
                    break
            assert env["body"] == "from tcp" and env["from"] == "w_carol"
    finally:
        a.close()
        b.close()


def test_requests_to_https_without_the_ca_fail_verification(imd):
    with pytest.raises(requests.exceptions.SSLError):
        requests.get(url(imd, "comet", "/ping"), timeout=TIMEOUT)


# -- ALPN and versions ------------------------------------------------------------------------
@pytest.mark.parametrize("listener, offered, chosen", [
    ("comet", ["h2", "http/1.1"], "http/1.1"),
    ("admin", ["http/1.1"], "http/1.1"),
    ("xmpps", ["xmpp-client"], "xmpp-client"),
    ("comet", ["h2"], None),          # nothing in common: the handshake goes on without ALPN
    ("tcp", ["xmpp-client"], None),
])
def test_alpn(imd, ca, listener, offered, chosen):
    ctx = ca.client_context()
    ctx.set_alpn_protocols(offered)
    with socket.create_connection(imd.addr[listener], timeout=TIMEOUT) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as s:
            assert s.selected_alpn_protocol() == chosen


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_modern_versions_are_accepted(imd, ca, version):
    ctx = ca.client_context()
    ctx.minimum_version = ctx.maximum_version = version
    with socket.create_connection(imd.addr["comet"], timeout=TIMEOUT) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as s:
            assert s.version() == version.name.replace("TLSv1_", "TLSv1.")
            s.sendall(b"GET /ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert s.recv(65536).startswith(b"HTTP/1.1 200")
            if version is ssl.TLSVersion.TLSv1_2:
                assert "GCM" in s.cipher()[0] or "CHACHA20" in s.cipher()[0]
                assert s.cipher()[0].startswith("ECDHE")


def old_client_context(version: ssl.TLSVersion) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_ciphers("ALL:@SECLEVEL=0")          # let OpenSSL 3 offer TLS 1.0/1.1 at all
    ctx.minimum_version = ssl.TLSVersion.TLSv1
    ctx.maximum_version = version
    return ctx


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1])
@pytest.mark.parametrize("listener", ["tcp", "comet", "xmpps"])
def test_tls_1_0_and_1_1_clients_are_refused(imd, ca, listener, version):
    before = metric(metrics(imd, ca), "imd_tls_handshake_failures_total", listener=listener, reason="protocol")
    with socket.create_connection(imd.addr[listener], timeout=TIMEOUT) as raw:
        with pytest.raises(ssl.SSLError) as e:
            old_client_context(version).wrap_socket(raw, server_hostname="localhost")
    assert "PROTOCOL_VERSION" in str(e.value).upper() or "UNSUPPORTED" in str(e.value).upper()
    assert metric(metrics(imd, ca), "imd_tls_handshake_failures_total", listener=listener,
                  reason="protocol") == before + 1


# -- hostile input --------------------------------------------------------------------------
def read_to_close(sock, timeout=TIMEOUT) -> bytes:
    sock.settimeout(timeout)
    out = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return out
        if not chunk:
            return out
        out += chunk


def client_hello() -> bytes:
    """The first flight of a real TLS client (captured through a memory BIO)."""
    ctx = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


@pytest.fixture
def sentinel(imd, ca):
    """A TLS raw-TCP session that must keep working whatever the hostile connections do."""
    c, peer = tls_client(imd, ca), tls_client(imd, ca)
    c.auth(token("t_sentinel"), device="s1")
    peer.auth(token("t_sentinel_peer"), device="s2")
    yield c
    assert c.ping()["type"] == "pong"
    c.msg("t_sentinel_peer", "still here")
    assert peer.wait_for(lambda e: e.get("type") == "msg")["body"] == "still here"
    c.close()
    peer.close()


def test_plaintext_http_to_https_gets_400(imd, ca, sentinel):
    for listener in ("comet", "admin"):
        with socket.create_connection(imd.addr[listener], timeout=TIMEOUT) as s:
            s.sendall(b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n")
            reply = read_to_close(s)
        assert reply.startswith(b"HTTP/1.1 400 ") and b"https://" in reply
        sentinel.ping()
    r = requests.get(url(imd, "comet", "/ping", scheme="http"), timeout=TIMEOUT)
    assert r.status_code == 400 and "HTTPS only" in r.text
    assert metric(metrics(imd, ca), "imd_tls_handshake_failures_total", listener="comet", reason="plaintext") >= 2


def test_plaintext_raw_tcp_and_xmpp_are_refused(imd, sentinel):
    with socket.create_connection(imd.addr["tcp"], timeout=TIMEOUT) as s:
        s.sendall(b"\x00\x00\x00\x0f" + b'{"type":"ping"}')
        reply = read_to_close(s)
    assert orjson.loads(reply[4:]) == {"type": "error", "code": 400, "reason": "this port speaks TLS only"}
    with socket.create_connection(imd.addr["xmpps"], timeout=TIMEOUT) as s:
        s.sendall(b"<?xml version='1.0'?><stream:stream to='localhost' version='1.0' "
                  b"xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'>")
        reply = read_to_close(s)
    assert b"<policy-violation" in reply and reply.endswith(b"</stream:stream>")
    host, port = imd.addr["tcp"]
    with pytest.raises(ClientError):                # imd.client without tls=: a clear error, not a hang
        Client(host, port).auth(token("t_plain"))


@pytest.mark.parametrize("listener", ["tcp", "comet", "admin", "xmpps"])
def test_garbage_and_truncated_handshakes(imd, ca, sentinel, listener):
    hello = client_hello()
    cases = [
        os.urandom(3000),                                   # garbage, not starting like TLS
        b"\x16\x03\x01\x00\x05" + os.urandom(2000),         # a handshake record header, then garbage
        b"\x16\x03\x01\xff\xff" + b"\x01" * 100,            # an oversized record, never finished
        hello + os.urandom(500),                            # a real ClientHello, then garbage
    ]
    for data in cases:
        with socket.create_connection(imd.addr[listener], timeout=TIMEOUT) as s:
            try:
                s.sendall(data)
            except (BrokenPipeError, ConnectionResetError):
                pass
            started = time.monotonic()
            read_to_close(s)              # closed: at once, or by the auth deadline (2 s)
            assert time.monotonic() - started < 6
        sentinel.ping()
    # half a ClientHello and then nothing: the auth deadline ends it
    with socket.create_connection(imd.addr[listener], timeout=TIMEOUT) as s:
        s.sendall(hello[:len(hello) // 2])
        started = time.monotonic()
        read_to_close(s)
        assert 1 <= time.monotonic() - started < 6
    # half a ClientHello and then the client goes away
    s = socket.create_connection(imd.addr[listener], timeout=TIMEOUT)
    s.sendall(hello[:20])
    s.close()
    sentinel.ping()
    text = metrics(imd, ca)
    assert metric(text, "imd_tls_handshake_failures_total", listener=listener, reason="incomplete") >= 2
    assert metric(text, "imd_tls_handshake_failures_total", listener=listener, reason="protocol") >= 1


def test_connect_and_send_nothing_is_ended_by_the_auth_deadline(imd):
    with socket.create_connection(imd.addr["comet"], timeout=TIMEOUT) as s:
        started = time.monotonic()
        read_to_close(s)
        assert 1 <= time.monotonic() - started < 6


def test_handshake_metrics(imd, ca):
    with tls_client(imd, ca) as c:
        c.auth(token("t_metrics"))
    text = metrics(imd, ca)
    for listener in ("tcp", "comet", "admin"):
        assert metric(text, "imd_tls_handshakes_total", listener=listener) >= 1
    assert "imd_tls_reload_failures_total 0" in text


def test_a_reader_that_lags_gets_everything_in_order(imd, ca):
    """Partial TLS writes: the kernel takes part of the ciphertext, the rest waits for the
    write watcher, nothing is lost or reordered."""
    with tls_client(imd, ca) as alice, tls_client(imd, ca) as bob:
        bob.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        alice.auth(token("lag_alice"), device="la")
        bob.auth(token("lag_bob"), device="lb")
        bodies = [f"{i:03d}" + "z" * 50000 for i in range(12)]      # ~600 KB, under limits.send_buffer
        for body in bodies:
            alice.msg("lag_bob", body, wait=False)
        for _ in bodies:
            alice.wait_for(lambda e: e.get("type") == "ack")
        time.sleep(0.5)                                             # the server meets a full socket
        got = [bob.wait_for(lambda e: e.get("type") == "msg")["body"] for _ in bodies]
        assert got == bodies
        assert bob.ping()["type"] == "pong"
