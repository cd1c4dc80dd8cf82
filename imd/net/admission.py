"""Who may connect: connections per process and per IP address, and new
connections per second per IP address (``limits.*``, read at every accept so a
reload applies at once).

A refused connection is handed to the protocol's ``refuse(sock, code, reason)``
hook (which writes the protocol's own error: an ``error`` frame, an XMPP stream
error, an HTTP status) and closed; the metric ``imd_connections_refused_total``
counts it by reason. Runs in the hub; never blocks.
"""

from __future__ import annotations

import resource
import time

from . import conn as conn_mod

FD_RESERVE = 64           # descriptors kept for the store, logs, the control socket


def fd_capacity() -> int:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(16, soft - FD_RESERVE)


class Admission:
    def __init__(self, limits, metrics) -> None:
        self.limits = limits
        self.metrics = metrics
        self._per_ip: dict[str, int] = {}
        self._fd_ip: dict[int, str] = {}
        self._rate_sec = 0
        self._rate: dict[str, int] = {}
        self._capacity = fd_capacity()
        conn_mod.on_release = self.release

    def admit(self, fd: int, ip: str):
        """None when the connection may stay; else (code, reason) to refuse it."""
        lim = self.limits
        cap = lim.max_connections or self._capacity
        if conn_mod.Conn.open_count >= cap:
            return self._refused(503, "server full, try another node", "max_connections")
        rate = lim.connect_rate_per_ip
        if rate:
            now = int(time.monotonic())
            if now != self._rate_sec:
                self._rate_sec, self._rate = now, {}
            n = self._rate.get(ip, 0) + 1
            self._rate[ip] = n
            if n > rate:
                return self._refused(429, "too many new connections from your address", "connect_rate_per_ip")
        per_ip = lim.max_connections_per_ip
        if per_ip:
            n = self._per_ip.get(ip, 0)
            if n >= per_ip:
                return self._refused(429, "too many connections from your address", "max_connections_per_ip")
            self._per_ip[ip] = n + 1
            self._fd_ip[fd] = ip
        return None

    def release(self, fd: int) -> None:
        """A connection closed (called by Conn for every connection)."""
        ip = self._fd_ip.pop(fd, None)
        if ip is not None:
            n = self._per_ip.get(ip, 1) - 1
            if n > 0:
                self._per_ip[ip] = n
            else:
                self._per_ip.pop(ip, None)

    def _refused(self, code: int, reason: str, limit: str):
        self.metrics.inc("imd_connections_refused_total", (("limit", limit),))
        return code, reason
