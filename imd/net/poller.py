"""One epoll set for the read side of every connection of the process.

A libev io watcher per connection costs about 200 bytes of Python objects
(the watcher and the bound method it calls) plus libev's per-fd entry. An
idle connection needs none of it: :class:`Poller` keeps the read interest of
every :class:`imd.net.conn.Conn` in one ``epoll`` set of its own, watched by a
single libev io watcher on the epoll descriptor. When that descriptor is
readable, ``_ready`` asks the set which sockets are readable (level-triggered,
at most ``MAX_EVENTS`` per loop iteration; the rest are reported on the next
one) and calls each one's ``conn._on_readable()``. Per connection that leaves
one slot (8 bytes) in a list indexed by descriptor. The kernel keeps one
epoll entry per socket either way (libev's own epoll set held it before).

Everything runs in the hub and never blocks. One poller per process: after a
fork the child makes its own (the parent's epoll set is shared with it).
"""

from __future__ import annotations

import os
import select

import gevent
from gevent.monkey import get_original

_epoll = get_original("select", "epoll")     # monkey patching hides select.epoll

MAX_EVENTS = 512      # readable sockets handled per loop iteration
_GROW = 1024          # slots added at a time to the descriptor → conn list


class Poller:
    __slots__ = ("_ep", "_watcher", "_conns")

    def __init__(self, loop=None) -> None:
        self._ep = _epoll()
        self._conns: list = []          # conns[fd] is the Conn reading fd, or None
        self._watcher = (loop or gevent.get_hub().loop).io(self._ep.fileno(), 1)
        self._watcher.start(self._ready)

    def add(self, fd: int, conn) -> None:
        """Call ``conn._on_readable()`` whenever ``fd`` is readable (or at EOF/error)."""
        conns = self._conns
        if fd >= len(conns):
            conns.extend([None] * (fd + _GROW - len(conns)))
        conns[fd] = conn
        self.resume(fd)

    def pause(self, fd: int) -> None:
        """Stop watching ``fd`` for now (its conn stays known)."""
        try:
            self._ep.unregister(fd)
        except (FileNotFoundError, ValueError, OSError):
            pass                    # not registered (already paused), or closed

    def resume(self, fd: int) -> None:
        try:
            self._ep.register(fd, select.EPOLLIN)
        except FileExistsError:
            pass                    # already watched

    def remove(self, fd: int) -> None:
        """Forget ``fd``; call before the socket is closed."""
        self.pause(fd)
        if 0 <= fd < len(self._conns):
            self._conns[fd] = None

    def _ready(self) -> None:
        try:
            events = self._ep.poll(0, MAX_EVENTS)
        except InterruptedError:
            return
        conns = self._conns
        for fd, _ in events:
            conn = conns[fd]
            if conn is not None:
                conn._on_readable()

    def close(self) -> None:
        self._watcher.stop()
        self._watcher.close()
        self._ep.close()


_poller = None


def poller() -> Poller:
    """The poller of this process (made on first use in the hub's thread)."""
    global _poller
    if _poller is None:
        _poller = Poller()
    return _poller


def _forget_after_fork() -> None:
    global _poller
    if _poller is not None:
        try:
            _poller._ep.close()     # the child's copy of the parent's epoll descriptor
        except OSError:
            pass
        _poller = None


os.register_at_fork(after_in_child=_forget_after_fork)
