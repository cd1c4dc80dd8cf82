"""A small blocking client of the raw-TCP protocol, for tests, benchmarks and scripts.

    c = Client("127.0.0.1", 8900)
    hello = c.auth(token, platform="android", device="phone-1", since=None)
    ack = c.msg("guest42", "Is the flat free on Friday?", ctx={"listing": "L1"})
    env = c.recv(timeout=5)          # next server envelope (msg, notice, presence, ...)

    c = Client("chat.example.com", 8900, tls=True)     # tls.tcp = true: verified TLS
    c = Client(host, port, tls=ssl.create_default_context(cafile="ca.pem"), server_hostname="localhost")

Envelopes other than the one a call waits for are kept, in order, for
``recv``. Uses plain sockets (works with or without gevent patching); one
client is not meant to be shared between threads or greenlets.
"""

from __future__ import annotations

import itertools
import socket
import ssl
import struct
import time
from collections import deque
from typing import Any, Optional, Union

import orjson


class ClientError(Exception):
    """The server answered with ``error`` (``env`` holds it) or the connection ended."""

    def __init__(self, message: str, env: Optional[dict] = None):
        super().__init__(message)
        self.env = env


class Client:
    def __init__(self, host: str = "127.0.0.1", port: int = 8900, timeout: float = 10.0,
                 tls: Union[bool, ssl.SSLContext] = False, server_hostname: Optional[str] = None) -> None:
        """``tls``: True for TLS verified against the system's CAs, or an SSLContext;
        ``server_hostname`` is the name the certificate must carry (default ``host``)."""
        sock = socket.create_connection((host, port), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if tls:
            ctx = tls if isinstance(tls, ssl.SSLContext) else ssl.create_default_context()
            try:
                sock = ctx.wrap_socket(sock, server_hostname=server_hostname or host)
            except BaseException:
                sock.close()
                raise
        self.sock = sock
        self.timeout = timeout
        self._buf = b""
        self._queue: deque = deque()
        self._ids = itertools.count(1)
        self.hello: Optional[dict] = None

    # -- framing -------------------------------------------------------------
    def send(self, env: dict) -> None:
        data = orjson.dumps(env)
        self.sock.sendall(struct.pack(">I", len(data)) + data)

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _read_frame(self, deadline: float) -> Optional[dict]:
        while True:
            if len(self._buf) >= 4:
                n = struct.unpack(">I", self._buf[:4])[0]
                if len(self._buf) >= 4 + n:
                    frame, self._buf = self._buf[4:4 + n], self._buf[4 + n:]
                    return orjson.loads(frame)
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no envelope from the server in time")
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                raise TimeoutError("no envelope from the server in time") from None
            if not chunk:
                return None
            self._buf += chunk

    def recv(self, timeout: Optional[float] = None) -> dict:
        """The next envelope from the server; raises ClientError when the connection ended."""
        if self._queue:
            return self._queue.popleft()
        env = self._read_frame(time.monotonic() + (self.timeout if timeout is None else timeout))
        if env is None:
            raise ClientError("connection closed by the server")
        return env

    def wait_for(self, pred, timeout: Optional[float] = None) -> dict:
        """Read until an envelope satisfies ``pred``; keep the others for ``recv``."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        for i, env in enumerate(self._queue):
            if pred(env):
                del self._queue[i]
                return env
        while True:
            env = self._read_frame(deadline)
            if env is None:
                raise ClientError("connection closed by the server")
            if pred(env):
                return env
            self._queue.append(env)

    def drain(self, timeout: float = 0.3) -> list:
        """Everything that arrives within ``timeout`` (and what was kept)."""
        out = list(self._queue)
        self._queue.clear()
        deadline = time.monotonic() + timeout
        try:
            while True:
                env = self._read_frame(deadline)
                if env is None:
                    break
                out.append(env)
        except TimeoutError:
            pass
        return out

    # -- protocol ------------------------------------------------------------
    def auth(self, token: str, platform: str = "android", device: str = "d1",
             since: Optional[int] = None) -> dict:
        env = {"type": "auth", "token": token, "platform": platform, "device": device}
        if since is not None:
            env["since"] = since
        self.send(env)
        reply = self.wait_for(lambda e: e.get("type") in ("auth", "error", "close"))
        if reply.get("type") != "auth":
            raise ClientError(f"auth refused: {reply.get('reason')}", reply)
        self.hello = reply
        return reply

    def msg(self, to: str, body: Any, ctx: Optional[dict] = None, id: Optional[str] = None,
            wait: bool = True) -> Optional[dict]:
        cid = id or f"c{next(self._ids)}-{time.monotonic_ns():x}"
        env = {"type": "msg", "id": cid, "to": to, "body": body}
        if ctx is not None:
            env["ctx"] = ctx
        self.send(env)
        if not wait:
            return None
        reply = self.wait_for(lambda e: e.get("id") == cid and e.get("type") in ("ack", "error"))
        if reply["type"] == "error":
            raise ClientError(f"msg refused: {reply['reason']}", reply)
        return reply

    def ack(self, seq: int) -> None:
        self.send({"type": "ack", "seq": seq})

    def ping(self) -> dict:
        self.send({"type": "ping"})
        return self.wait_for(lambda e: e.get("type") == "pong")

    def sync(self, since: int, limit: int = 100) -> list:
        self.send({"type": "sync", "since": since, "limit": limit})
        entries = []
        while True:
            env = self.wait_for(lambda e: e.get("type") in ("msg", "notice", "sync", "error"))
            if env["type"] == "sync":
                return entries
            if env["type"] == "error":
                raise ClientError(env["reason"], env)
            entries.append(env)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
