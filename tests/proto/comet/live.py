"""A real imd subprocess and plain-socket HTTP clients for the comet tests.

    d = Imd(tmp_path, {"comet": {"polling_timeout": 2}}).start()
    d.addr["comet"], d.addr["admin"]          # (host, port) read from the log lines
    status, headers, body = request(d.addr["admin"], "GET", "/info")
    s = Stream(d.addr["comet"], "/stream?cname=a"); s.chunk()   # one chunk's bytes

The daemon runs ``tests/proto/comet/run_imd.py`` (``python -m imd`` plus the
comet and admin listeners) with every listener on 127.0.0.1:0.
"""

from __future__ import annotations

import http.client
import os
import re
import signal
import socket
import subprocess
import sys
import threading

from imd.auth import issue

SECRET = "test-secret-of-at-least-32-bytes!!"
LISTEN_RE = re.compile(r"listening name=(\w+) addr=(\S+):(\d+)")
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))
TIMEOUT = 10.0


def token(user: str, role: str = "guest", ttl: int = 3600, **kw) -> str:
    return issue(SECRET, user, role, ttl, **kw)


def _toml(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


class Imd:
    def __init__(self, tmp_path, overrides: dict | None = None, env: dict | None = None) -> None:
        self.dir = str(tmp_path)
        self.env = env or {}
        cfg = {"node": {"id": "t1", "data_dir": os.path.join(self.dir, "var")},
               "auth": {"secret": SECRET},
               "listen": {"tcp": "127.0.0.1:0", "comet": "127.0.0.1:0", "admin": "127.0.0.1:0",
                          "xmpp": "", "control": ""},
               "presence": {"grace": 0.3}, "admin": {"dev_tokens": True}}
        for sec, vals in (overrides or {}).items():
            cfg.setdefault(sec, {}).update(vals)
        self.config = os.path.join(self.dir, "imd.toml")
        with open(self.config, "w") as f:
            for sec, vals in cfg.items():
                f.write(f"[{sec}]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in vals.items()))
        self.proc = None
        self.addr: dict = {}
        self.lines: list = []

    def start(self, timeout: float = 20.0) -> "Imd":
        ready = threading.Event()
        env = dict(os.environ, PYTHONPATH=ROOT, **self.env)
        self.proc = subprocess.Popen([sys.executable, os.path.join(HERE, "run_imd.py"), "-c",
                                      self.config], cwd=self.dir, env=env, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

        def read(proc=self.proc):
            for line in proc.stdout:
                self.lines.append(line.rstrip("\n"))
                m = LISTEN_RE.search(line)
                if m:
                    self.addr[m.group(1)] = (m.group(2), int(m.group(3)))
                if "ready node=" in line:
                    ready.set()
            ready.set()

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(timeout) or self.proc.poll() is not None:
            raise RuntimeError("imd did not start:\n" + "\n".join(self.lines[-30:]))
        return self

    def stop(self) -> int:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode if self.proc else 0

    def log_text(self) -> str:
        return "\n".join(self.lines)


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
