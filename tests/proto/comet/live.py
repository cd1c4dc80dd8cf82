"""A real imd subprocess and plain-socket HTTP clients for the comet tests.

    d = Imd(tmp_path, {"comet": {"polling_timeout": 2}}).start()
    d.addr["comet"], d.addr["admin"]          # (host, port) read from the log lines
    status, headers, body = request(d.addr["admin"], "GET", "/info")
    s = Stream(d.addr["comet"], "/stream?cname=a"); s.chunk()   # one chunk's bytes

The daemon is ``python -m imd`` with every listener on 127.0.0.1:0.
"""

from __future__ import annotations

import http.client
import os
import socket

from tests import daemon
from tests.daemon import SECRET, token  # noqa: F401  (re-exported for the comet tests)

HERE = os.path.dirname(os.path.abspath(__file__))
TIMEOUT = 10.0


class Imd(daemon.Imd):
    """tests.daemon.Imd with the comet and admin listeners on 127.0.0.1:0 and
    development tokens on."""

    def __init__(self, tmp_path, overrides: dict | None = None, env: dict | None = None) -> None:
        cfg = {"listen": {"comet": "127.0.0.1:0", "admin": "127.0.0.1:0"}, "admin": {"dev_tokens": True}}
        for sec, vals in (overrides or {}).items():
            cfg.setdefault(sec, {}).update(vals)
        super().__init__(tmp_path, cfg, env)


def request(addr, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
            timeout: float = TIMEOUT):
    """One request on a fresh connection: (status, headers dict lower-case, body bytes)."""
    c = http.client.HTTPConnection(addr[0], addr[1], timeout=timeout)
    try:
        c.request(method, path, body=body, headers=headers or {})
        r = c.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        c.close()


class Raw:
    """A plain socket: send raw bytes, read raw bytes (for hostile input)."""

    def __init__(self, addr, timeout: float = TIMEOUT) -> None:
        self.sock = socket.create_connection(addr, timeout=timeout)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_until(self, marker: bytes) -> bytes:
        while marker not in self.buf:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError(self.buf)
            self.buf += data
        i = self.buf.index(marker) + len(marker)
        out, self.buf = self.buf[:i], self.buf[i:]
        return out

    def read_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError(self.buf)
            self.buf += data
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def read_all(self) -> bytes:
        """Everything until the server closes."""
        while True:
            data = self.sock.recv(65536)
            if not data:
                out, self.buf = self.buf, b""
                return out
            self.buf += data

    def response(self):
        """One Content-Length response: (status, headers, body)."""
        head = self.read_until(b"\r\n\r\n").decode("latin-1")
        status, headers = _head(head)
        return status, headers, self.read_exact(int(headers.get("content-length", "0")))

    def close(self) -> None:
        self.sock.close()


def _head(head: str):
    lines = head.split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    return status, headers


class Stream(Raw):
    """A GET whose answer is chunked and open-ended; ``chunk()`` reads one chunk."""

    def __init__(self, addr, path: str, headers: dict | None = None, timeout: float = TIMEOUT) -> None:
        super().__init__(addr, timeout)
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        self.send(f"GET {path} HTTP/1.1\r\nHost: {addr[0]}:{addr[1]}\r\n{extra}\r\n".encode())
        self.status, self.headers = _head(self.read_until(b"\r\n\r\n").decode("latin-1"))

    def chunk(self) -> bytes:
        """The next chunk's data; b"" for the last chunk."""
        size = int(self.read_until(b"\r\n")[:-2], 16)
        data = self.read_exact(size)
        self.read_exact(2)
        return data
