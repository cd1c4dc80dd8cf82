"""imd.net.listener: what an accepted socket looks like when the protocol's hook gets
it, and a hook that fails costs only its own connection. In-process, over loopback."""

import socket

import pytest

from imd.net.listener import Listener, bind_socket
from tests.test_poller import wait


def _loopback(family):
    host = "::1" if family == socket.AF_INET6 else "127.0.0.1"
    if family == socket.AF_INET6:
        try:
            with socket.socket(socket.AF_INET6) as probe:
                probe.bind(("::1", 0))
        except OSError:
            pytest.skip("no IPv6 loopback here")
    return host


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6], ids=["ipv4", "ipv6"])
def test_accepted_sockets_are_non_blocking_with_nodelay(family):
    """TCP_NODELAY is set once, on the listening socket; every connection must still have it
    (answers and acks are small writes that Nagle's algorithm would hold back)."""
    seen = []
    listener = Listener("t", bind_socket(_loopback(family), 0), lambda sock, addr: seen.append((sock, addr)))
    listener.start()
    try:
        clients = [socket.create_connection(listener.address) for _ in range(3)]
        assert wait(lambda: len(seen) == 3)
        for sock, addr in seen:
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
            assert sock.gettimeout() == 0.0
            assert addr[0] == listener.address[0]
            sock.close()
        assert listener.accepted == 3
        for c in clients:
            c.close()
    finally:
        listener.stop()


def test_a_failing_hook_closes_only_its_connection():
    calls = []

    def handle(sock, addr):
        calls.append(sock)
        if len(calls) == 1:
            raise RuntimeError("protocol bug")

    listener = Listener("t", bind_socket("127.0.0.1", 0), handle)
    listener.start()
    try:
        first = socket.create_connection(listener.address)
        assert wait(lambda: len(calls) == 1)
        first.settimeout(5)
        assert first.recv(1) == b""                 # closed by the listener
        second = socket.create_connection(listener.address)
        assert wait(lambda: len(calls) == 2)        # still accepting
        assert calls[1].fileno() != -1
        calls[1].close()
        first.close()
        second.close()
    finally:
        listener.stop()
