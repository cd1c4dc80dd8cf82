"""imd.net.tls.TlsSocket on its own, over a socketpair with small buffers, driven by hand
the way imd.net.conn.Conn drives it: partial writes (the one-byte-owed rule), plaintext
written before the handshake, plaintext clients, garbage, and the failure counters."""

from __future__ import annotations

import _socket
import os
import socket
import ssl

import pytest

from imd.net.tls import TlsServer, TlsSocket
from tests.tlsca import TestCA


@pytest.fixture(scope="module")
def ca(tmp_path_factory):
    return TestCA(tmp_path_factory.mktemp("ca"))


@pytest.fixture
def server(ca):
    srv = TlsServer("test", refusal=b"speak TLS\n")
    srv.load(*ca.issue("unit"))
    return srv


class Peer:
    """A TLS client over memory BIOs on one end of a socketpair (never blocks)."""

    def __init__(self, ca, sock) -> None:
        self.sock = sock
        self.inc, self.out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = ca.client_context().wrap_bio(self.inc, self.out, server_hostname="localhost")
        self.got = b""

    def pump(self) -> None:
        if self.out.pending:
            self.sock.sendall(self.out.read())
        try:
            data = self.sock.recv(65536)
        except BlockingIOError:
            return
        self.inc.write(data)

    def handshake(self) -> bool:
        try:
            self.tls.do_handshake()
            return True
        except ssl.SSLWantReadError:
            return False
        finally:
            self.pump()

    def read(self) -> None:
        self.pump()
        while True:
            try:
                self.got += self.tls.read(65536)
            except ssl.SSLWantReadError:
                return


def pair(server, ca, sndbuf=4096):
    a, b = _socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    a.setblocking(False)
    b.setblocking(False)
    return TlsSocket(a, server), Peer(ca, b)


def server_recv(ts) -> bytes:
    try:
        return ts.recv(65536)
    except BlockingIOError:
        return b"<nothing>"


def handshake(ts, peer) -> None:
    for _ in range(50):
        done = peer.handshake()
        server_recv(ts)
        if done and ts.established:
            peer.pump()
            return
    raise AssertionError("no handshake")


def test_partial_writes_deliver_every_byte_in_order(server, ca):
    ts, peer = pair(server, ca)
    early = b"written before the handshake;"
    assert ts.send(early) == len(early)                 # kept, encrypted once the handshake is done
    handshake(ts, peer)
    assert server.handshakes == 1
    payload = os.urandom(1 << 20)
    out = payload
    short = 0
    for _ in range(100000):
        if not out and not ts._cipher:
            break
        if out:
            try:
                n = ts.send(out)                           # as Conn._send: retry what was not taken
            except BlockingIOError:
                n = 0
            short += n < len(out)
            out = out[n:]
        peer.read()
    peer.read()
    assert short > 0                                      # the kernel did refuse some: the path was taken
    assert peer.got == early + payload


def test_plaintext_client_gets_the_refusal(server, ca):
    ts, peer = pair(server, ca)
    peer.sock.sendall(b"GET / HTTP/1.1\r\n\r\n")
    with pytest.raises(OSError) as e:
        ts.recv(65536)
    assert "plaintext" in str(e.value)
    assert peer.sock.recv(100) == b"speak TLS\n"
    ts.close()
    assert server.failures == {"plaintext": 1, "protocol": 0, "incomplete": 0}


def test_garbage_after_a_record_header_is_a_protocol_failure(server, ca):
    ts, peer = pair(server, ca)
    peer.sock.sendall(b"\x16\x03\x01\x00\x10" + b"\xff" * 16)
    with pytest.raises(ssl.SSLError):
        ts.recv(65536)
    ts.close()
    assert server.failures == {"plaintext": 0, "protocol": 1, "incomplete": 0}


def test_close_before_the_handshake_ends_is_incomplete(server, ca):
    ts, peer = pair(server, ca)
    peer.handshake()                                      # the ClientHello only
    assert server_recv(ts) == b"<nothing>"
    ts.close()
    ts2, _ = pair(server, ca)
    ts2.close()                                           # connected and never said anything
    assert server.failures == {"plaintext": 0, "protocol": 0, "incomplete": 2}


def test_close_notify_reads_as_eof(server, ca):
    ts, peer = pair(server, ca)
    handshake(ts, peer)
    peer.tls.write(b"last words")
    peer.pump()
    assert ts.recv(65536) == b"last words"
    try:
        peer.tls.unwrap()
    except ssl.SSLWantReadError:
        pass
    peer.pump()
    assert ts.recv(65536) == b""          # (with data in the same read: the data; EOF comes with the FIN)
