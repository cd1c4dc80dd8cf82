"""The signals an imd process handles, held (blocked) from the start of a run until their handlers exist.

imd.cli calls :func:`hold` before it detaches (``--daemon``) and imports gevent and
imd.daemon; imd.daemon (and imd.master, with ``node.workers`` > 1) call :func:`release`
right after installing their handlers; imd.master holds them again across each worker's
fork (the worker releases them once its own handlers exist, the master right after the
fork). A signal that arrives in between stays pending and is delivered to its handler
then, so a TERM during boot drains right after the boot.
Unheld, it would end the process in the middle of the boot without the cleanup that
releases the ``--daemon`` pidfile: HUP, USR1 and QUIT take their default action (the
process ends); TERM (python-daemon's handler) and INT are raised as an exception where the
main thread happens to be, which is inside DaemonContext.open() after it has written the
pidfile but before its release is registered, or inside orjson's module init (which crashes
the interpreter when an import it makes fails). Lightweight: imd.cli imports it before gevent.
"""

from __future__ import annotations

import signal

SIGNALS = {signal.SIGTERM: "term", signal.SIGINT: "int", signal.SIGQUIT: "quit",
           signal.SIGHUP: "hup", signal.SIGUSR1: "usr1"}


def hold() -> None:
    """Block :data:`SIGNALS` in the calling thread (and in the processes and threads it starts)."""
    signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)


def release() -> None:
    """Unblock :data:`SIGNALS`; one that arrived while they were held is delivered now."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)
