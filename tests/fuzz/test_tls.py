"""Hostile bytes to the server side of imd.net.tls.TlsSocket, in arbitrary read splits:
arbitrary bytes, and mutations of a real client's first flight. Whatever arrives, a
read returns nothing (BlockingIOError), ends the connection with an OSError (ssl.SSLError
is one) or, never here, plaintext; the failure is counted; nothing else escapes."""

from __future__ import annotations

import _socket
import socket
import ssl

import pytest
from hypothesis import given
from hypothesis import strategies as st

from imd.net.tls import TlsServer, TlsSocket
from tests.fuzz.strategies import FUZZ, mutate, split
from tests.tlsca import TestCA


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    ca = TestCA(tmp_path_factory.mktemp("ca"))
    srv = TlsServer("fuzz", refusal=b"no\n")
    srv.load(*ca.issue("fuzz"))
    return srv


def client_hello() -> bytes:
    ctx = ssl.create_default_context()
    obj = ctx.wrap_bio(ssl.MemoryBIO(), out := ssl.MemoryBIO(), server_hostname="localhost")
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return out.read()


HELLO = client_hello()


def feed(server, pieces) -> str:
    """Feed pieces through a socketpair; how the connection ended: "open" or "error"."""
    a, b = _socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    a.setblocking(False)
    ts = TlsSocket(a, server)
    try:
        for piece in pieces:
            if not piece:
                continue
            b.sendall(piece)
            try:
                data = ts.recv(65536)
            except BlockingIOError:
                continue
            except OSError:
                return "error"
            assert data == b"", "plaintext from a peer that never finished a handshake"
        return "open"
    finally:
        ts.close()
        b.close()


def failures(server) -> int:
    return sum(server.failures.values())


@FUZZ
@given(data=st.binary(min_size=1, max_size=3000), draw=st.data())
def test_arbitrary_bytes(server, data, draw):
    before = failures(server)
    feed(server, split(data, draw.draw))
    assert failures(server) == before + 1          # every one of these connections failed, once


@FUZZ
@given(draw=st.data())
def test_mutated_client_hello(server, draw):
    data = mutate(HELLO, draw.draw)
    before_ok, before_failed = server.handshakes, failures(server)
    feed(server, split(data, draw.draw))
    assert server.handshakes == before_ok           # a first flight alone never completes a handshake
    assert failures(server) == before_failed + 1
