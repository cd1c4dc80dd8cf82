"""sd_notify(3) without libsystemd: datagrams to ``$NOTIFY_SOCKET``.

    notify("READY=1", "STATUS=serving 12 connections")

A no-op (returns False) when the process was not started by systemd with
``Type=notify`` (no ``$NOTIFY_SOCKET``). An address starting with ``@`` is in
the abstract namespace. Sending a datagram on a unix socket never blocks for
long; errors are swallowed (the service manager is gone or not listening) and
reported as False.
"""

from __future__ import annotations

import os
import socket


def notify(*fields: str) -> bool:
    """Send ``fields`` (e.g. "READY=1") as one newline-separated datagram."""
    addr = os.environ.get("NOTIFY_SOCKET", "")
    if not addr:
        return False
    if addr[0] == "@":
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.sendto("\n".join(fields).encode(), addr)
    except OSError:
        return False
    return True


def watchdog_interval() -> float | None:
    """Seconds between ``WATCHDOG=1`` pings (half of ``$WATCHDOG_USEC``), or None
    when the watchdog is off or meant for another process (``$WATCHDOG_PID``)."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0 or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2e6
