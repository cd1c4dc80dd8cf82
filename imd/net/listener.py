"""A listening socket that accepts in an io-watcher callback (gevent BaseServer style).

The listener owns bind, accept and accept backoff; a protocol fills in one
hook, ``handle(sock, addr)``, called in the hub for each new connection. The
hook must not block (a protocol that needs to wait spawns a greenlet) and its
exceptions are logged and the socket closed; they never reach the loop.
"""

from __future__ import annotations

import _socket
import errno
import logging
import socket

import gevent

log = logging.getLogger("imd.net")

ACCEPTS_PER_WAKEUP = 64
BACKOFF_MIN, BACKOFF_MAX = 0.05, 1.0


def bind_socket(host: str, port: int, backlog: int = 4096, reuse_port: bool = False) -> _socket.socket:
    """A non-blocking listening TCP socket on (host, port).

    Listening and accepted sockets are the C-level ``_socket.socket``: gevent's
    monkey-patched socket class would add two libev watchers and a Python
    wrapper to every connection (~0.5 KB) that io-watcher-driven connections
    never use.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = _socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(backlog)
    sock.setblocking(False)
    return sock


class Listener:
    """Accepts connections on one socket and hands them to ``handle``.

    With an ``admission`` (imd.net.admission.Admission), a connection over a
    limit is given to ``refuse(sock, code, reason)`` (the protocol's error, best
    effort, non-blocking) and closed before ``handle`` ever sees it.
    """

    def __init__(self, name: str, sock: socket.socket, handle, admission=None, refuse=None) -> None:
        self.name = name
        self.sock = sock
        self.handle = handle
        self.admission = admission
        self.refuse = refuse
        self.refused = 0
        self.accepted = 0
        self._watcher = None
        self._backoff = BACKOFF_MIN
        self._timer = None

    @property
    def address(self) -> tuple:
        return self.sock.getsockname()[:2]

    def start(self) -> None:
        if self.sock.family in (socket.AF_INET, socket.AF_INET6):
            # Linux copies a listening socket's TCP options into each connection it
            # accepts: set once here, it saves a system call per connection
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        loop = gevent.get_hub().loop
        self._watcher = loop.io(self.sock.fileno(), 1)
        self._watcher.start(self._on_accept)

    def stop(self) -> None:
        """Stop accepting and close the socket (established connections stay)."""
        if self._watcher is not None:
            self._watcher.stop()
            self._watcher.close()
            self._watcher = None
        if self._timer is not None:
            self._timer.stop()
            self._timer = None
        try:
            self.sock.close()
        except OSError:
            pass

    def _on_accept(self) -> None:
        for _ in range(ACCEPTS_PER_WAKEUP):
            try:
                fd, addr = self.sock._accept()
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self._pause(e)
                    return
                if e.errno in (errno.ECONNABORTED, errno.EPROTO):
                    continue
                log.warning("accept failed listener=%s error=%s", self.name, e)
                return
            self._backoff = BACKOFF_MIN
            self.accepted += 1
            ls = self.sock
            sock = _socket.socket(ls.family, ls.type, ls.proto, fileno=fd)
            if self.admission is not None and isinstance(addr, tuple):
                verdict = self.admission.admit(fd, addr[0])
                if verdict is not None:
                    self._refuse(sock, *verdict)
                    continue
            try:
                sock.setblocking(False)
                self.handle(sock, addr)
            except Exception:
                log.exception("connection setup failed listener=%s peer=%s", self.name, addr)
                if self.admission is not None:
                    self.admission.release(fd)
                try:
                    sock.close()
                except OSError:
                    pass

    def _refuse(self, sock, code: int, reason: str) -> None:
        self.refused += 1
        try:
            sock.setblocking(False)
            if self.refuse is not None:
                self.refuse(sock, code, reason)
        except OSError:
            pass
        finally:
            sock.close()

    def _pause(self, err: OSError) -> None:
        """Out of descriptors: stop accepting for a while instead of spinning."""
        log.warning("accept paused listener=%s error=%s retry_in=%.2fs", self.name, err.strerror, self._backoff)
        self._watcher.stop()
        self._timer = gevent.get_hub().loop.timer(self._backoff)
        self._timer.start(self._resume)
        self._backoff = min(self._backoff * 2, BACKOFF_MAX)

    def _resume(self) -> None:
        self._timer = None
        if self._watcher is not None:
            self._watcher.start(self._on_accept)
