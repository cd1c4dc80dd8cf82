"""The SQLite store's writer process (``store.sqlite_writer = "process"``, the default).

Why a process: a batch's transaction is Python work as much as SQLite's (planning
it, binding every parameter of its multi-row INSERTs, which the sqlite3 module does
holding the GIL), and in imd's own process it shares the GIL with the network loop.
In a process of its own it runs on the other core, and the loop keeps its core.

:class:`WriterProcess` (in imd's process) has the interface of
:class:`~imd.store.sqlite_writer.SqliteWriter` (``open``, ``apply``, ``close``,
``checkpoints``, ``wal_frames``) and hands each call to the writer process, which
runs a real ``SqliteWriter`` (the writer connection, its transactions and its
checkpoints) in a gevent hub of its own: ``python -m imd.store.sqlite_proc FD FILE
SYNCHRONOUS``. imd keeps its read connections; WAL lets them read while the other
process writes.

Wire: a socketpair no other process holds; frames of a 4-byte big-endian length
and a pickle (protocol 5; the peer is our own child, nothing else can write
there). imd sends ``("apply", ops, pending)`` or ``("close",)``; the child answers
each, and its start, with ``(status, value, checkpoints, wal_frames, logs)``:
status ``"ok"`` with the value, or ``"err"`` with the exception raised there
(sqlite3's pickle whole, with their result code). Ops cross as tuples of what a
batch plan reads (:func:`pack_ops`), a notice's mids made in imd by its own ``mids`` (a role
notice's users are known only in the transaction: the first time, the writer
process rolls it back and asks for as many, :class:`MidsShort`); they come back
as their plans and the users' bases, from which imd builds the results with the
ops it kept (:func:`~imd.store.batch.batch_results`). ``logs`` are the child's log records
since its last answer, logged again in imd under their own logger names.

Lifetime: imd starts the child in ``open()`` (which waits until the file is set up
and raises the child's error, a failed migration say) and again on the next
``apply`` after it died: a batch whose answer was lost raises
:class:`~imd.store.sqlite_writer.WriterGone` (transient: the store retries it;
the (sender, client_id) dedupe makes the retry of a committed message an ack of
the original). The child ignores the signals imd handles (a Ctrl-C in a terminal
reaches the whole process group, and imd still flushes its last batch
through it), dies with imd (``PR_SET_PDEATHSIG``, and an end of file on its
socket), and exits after ``("close",)`` once its connections are closed.

Everything on imd's side runs in the hub thread and blocks only the calling
greenlet; one call at a time (the store's writer has one lane).
"""

from __future__ import annotations

import ctypes
import logging
import os
import pickle
import signal
import struct
import sys
from typing import Optional

import gevent
from gevent import socket, subprocess

from .sqlite_writer import SqliteWriter, WriterGone
from .writer import MessageOp, NoticeOp, Pending

log = logging.getLogger("imd.store.sqlite")

_HEADER = struct.Struct(">I")
FRAME_MAX = 1 << 30              # bytes: a longer length is a broken stream, not a frame
CLOSE_TIMEOUT = 10.0             # seconds imd waits for the child to exit after ("close",)
IGNORED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)
PR_SET_PDEATHSIG = 1


# -- the wire ------------------------------------------------------------------
class MidsShort(Exception):
    """A role notice reached more users than imd made mids for: ``needed`` for op ``index``.
    The writer process rolls the batch back; imd sends it again with that many."""

    def __init__(self, index: int, needed: int) -> None:
        super().__init__(index, needed)
        self.index, self.needed = index, needed


class PlannedMessage(MessageOp):
    """The writer process's copy of a MessageOp: what a batch plan reads, nothing else."""

    __slots__ = ()

    def __init__(self, sender, recipient, client_id, body_json, ctx_json, mid, ts, flags) -> None:
        self.sender, self.recipient, self.client_id = sender, recipient, client_id
        self.body_json, self.ctx_json, self.mid, self.ts, self.flags = body_json, ctx_json, mid, ts, flags
        self.body = self.ctx = self.callback = None


class PlannedNotice(NoticeOp):
    """The writer process's copy of a NoticeOp, with the mids imd made for it."""

    __slots__ = ("premade", "index")

    def __init__(self, users, role, kind, body_json, ts, premade, index) -> None:
        self.users, self.role, self.kind, self.body_json, self.ts = users, role, kind, body_json, ts
        self.premade, self.index = premade, index
        self.body = self.mids = self.callback = None

    def take_mids(self, n: int) -> list:
        if n > len(self.premade):
            raise MidsShort(self.index, n)
        return self.premade[:n]


def pack_ops(ops: list, role_mids: dict) -> list:
    """What the batch plan reads of each op: 8-tuples for messages, 6-tuples for notices
    with their mids made here by the op's own ``mids``: one per user for a list, and
    ``role_mids.get(index, 0)`` for a role (the count the writer process asked for)."""
    return [(op.sender, op.recipient, op.client_id, op.body_json, op.ctx_json, op.mid, op.ts, op.flags)
            if isinstance(op, MessageOp) else
            (op.users, op.role, op.kind, op.body_json, op.ts,
             op.take_mids(len(op.users) if op.users is not None else role_mids.get(i, 0)))
            for i, op in enumerate(ops)]


def unpack_ops(packed: list) -> list:
    """The writer process's copies of the ops of :func:`pack_ops`."""
    return [PlannedMessage(*t) if len(t) == 8 else PlannedNotice(*t, i) for i, t in enumerate(packed)]


def pack_pending(pending: Optional[Pending]) -> Optional[tuple]:
    if not pending:
        return None
    return pending.cursors, pending.touches, pending.contacts, pending.passwords


def unpack_pending(packed: Optional[tuple]) -> Optional[Pending]:
    if packed is None:
        return None
    pending = Pending()
    pending.cursors, pending.touches, pending.contacts, pending.passwords = packed
    return pending


def send_frame(sock, obj) -> None:
    data = pickle.dumps(obj, protocol=5)
    sock.sendall(_HEADER.pack(len(data)) + data)


def recv_frame(sock):
    """The next frame's object; None at the end of the stream (or a torn or oversized frame)."""
    head = _recv_exactly(sock, _HEADER.size)
    if head is None:
        return None
    size = _HEADER.unpack(head)[0]
    if size > FRAME_MAX:
        return None
    data = _recv_exactly(sock, size)
    return None if data is None else pickle.loads(data)


def _recv_exactly(sock, n: int) -> Optional[bytes]:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


# -- imd's side ----------------------------------------------------------------
class WriterProcess:
    """A :class:`SqliteWriter` in a process of its own (module docstring)."""

    def __init__(self, file: str, synchronous: str = "full") -> None:
        self.file = file
        self.synchronous = synchronous
        self.checkpoints = 0
        self.wal_frames = 0
        self.starts = 0                  # writer processes started (1 + restarts)
        self._proc = None
        self._sock = None

    @property
    def pid(self) -> Optional[int]:
        return None if self._proc is None else self._proc.pid

    def open(self) -> None:
        self._start()

    def apply(self, ops: list, pending: Optional[Pending]) -> tuple:
        """One batch in the writer process; a role notice short of mids (MidsShort) is sent
        again with as many as its users, counted in the transaction that was rolled back
        (mids made for a try that was rolled back are dropped: a mid only has to be unique)."""
        role_mids: dict = {}
        packed_pending = pack_pending(pending)
        while True:
            if self._sock is None:
                self._start()
            try:
                return self._call(("apply", pack_ops(ops, role_mids), packed_pending))
            except MidsShort as short:
                role_mids[short.index] = short.needed

    def close(self) -> None:
        """Ask the child to close its connections and exit; wait up to CLOSE_TIMEOUT for
        it, then kill it. Blocks the calling greenlet."""
        if self._sock is None:
            return
        proc = self._proc
        try:
            self._call(("close",))
        except WriterGone:
            pass
        finally:
            self._drop()
            try:
                proc.wait(CLOSE_TIMEOUT)
            except subprocess.TimeoutExpired:
                log.warning("sqlite: writer process did not exit pid=%s; killing it", proc.pid)
                proc.kill()
                proc.wait()

    def _start(self) -> None:
        """Start the child and wait for its first answer: raises its error (the file could
        not be set up), or WriterGone if it exited first."""
        ours, theirs = socket.socketpair()
        env = None
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        if root not in {os.path.abspath(p or ".") for p in sys.path}:   # a source tree: this one
            env = dict(os.environ)
            env["PYTHONPATH"] = os.pathsep.join(filter(None, (root, env.get("PYTHONPATH"))))
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "imd.store.sqlite_proc", str(theirs.fileno()), self.file,
                 self.synchronous], pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, env=env)
        except OSError as exc:
            ours.close()
            raise WriterGone("cannot start the sqlite writer process: %s" % exc) from exc
        finally:
            theirs.close()
        self._sock = ours
        self.starts += 1
        try:
            self._answer()
        except BaseException:
            self._drop(kill=True)
            raise
        if self.starts > 1:
            log.warning("sqlite: writer process restarted pid=%s starts=%d", self._proc.pid, self.starts)
        else:
            log.info("sqlite: writer process started pid=%s", self._proc.pid)

    def _call(self, request: tuple):
        """Send ``request``, return the answer's value (or raise its error). An answer
        that cannot be had (the child died, or this greenlet was killed while it waited)
        ends the child: its next answer could not be told from this one's."""
        try:
            send_frame(self._sock, request)
            return self._answer()
        except WriterGone:
            self._drop(kill=True)
            raise
        except OSError as exc:
            self._drop(kill=True)
            raise WriterGone("sqlite writer process lost: %s" % exc) from exc
        except BaseException as exc:
            if not isinstance(exc, Exception):        # killed (GreenletExit, Timeout): desynced
                self._drop(kill=True)
            raise

    def _answer(self):
        frame = recv_frame(self._sock)
        if frame is None:
            code = self._proc.poll() if self._proc is not None else None
            raise WriterGone("sqlite writer process exited (code %s)" % code)
        status, value, self.checkpoints, self.wal_frames, logs = frame
        for name, level, message in logs:
            logging.getLogger(name).log(level, "%s", message)
        if status == "err":
            raise value
        return value

    def _drop(self, kill: bool = False) -> None:
        """Forget the child (killed first when ``kill``) and close our end of the socket."""
        proc, sock = self._proc, self._sock
        self._proc = self._sock = None
        if sock is not None:
            sock.close()
        if kill and proc is not None and proc.poll() is None:
            proc.kill()
            gevent.spawn(proc.wait)                   # reaped in the background


# -- the writer process --------------------------------------------------------
class _Records(logging.Handler):
    """Keeps the writer process's log records until its next answer carries them."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append((record.name, record.levelno, record.getMessage()))

    def take(self) -> list:
        out, self.records = self.records, []
        return out


def _die_with_parent() -> None:
    """SIGKILL this process when imd's dies (Linux). If imd died before this, the socket's
    end of file ends the process at its first read."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (AttributeError, OSError):
        pass


def _answerable(exc: BaseException) -> BaseException:
    """``exc`` if it survives pickling, else a RuntimeError carrying its repr."""
    try:
        pickle.loads(pickle.dumps(exc, protocol=5))
        return exc
    except Exception:  # noqa: BLE001  (any failure to pickle: send its text)
        return RuntimeError(repr(exc))


def main(argv: list) -> int:
    """The writer process: serve ``apply`` and ``close`` on the socket FD for FILE."""
    fd, file, synchronous = int(argv[0]), argv[1], argv[2]
    _die_with_parent()
    for sig in IGNORED_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    records = _Records()
    root = logging.getLogger()
    root.addHandler(records)
    root.setLevel(logging.INFO)
    sock = socket.socket(fileno=fd)
    writer = SqliteWriter(file, synchronous)

    def answer(status: str, value) -> None:
        send_frame(sock, (status, value, writer.checkpoints, writer.wal_frames, records.take()))

    try:
        writer.open()
    except Exception as exc:  # noqa: BLE001  (imd raises it from open())
        answer("err", _answerable(exc))
        return 1
    try:
        answer("ok", None)
        while True:
            request = recv_frame(sock)
            if request is None:                      # imd is gone
                return 0
            if request[0] == "close":
                writer.close()
                answer("ok", None)
                return 0
            try:
                value = writer.apply(unpack_ops(request[1]), unpack_pending(request[2]))
            except Exception as exc:  # noqa: BLE001  (raised again in imd, where it is handled)
                answer("err", _answerable(exc))
            else:
                answer("ok", value)
    except OSError:                                  # the socket broke: imd is gone
        return 0
    finally:
        writer.close()


if __name__ == "__main__":
    # run under the module's own name, not __main__: the exceptions it pickles
    # (MidsShort) must be the classes imd unpickles
    from imd.store.sqlite_proc import main as _main
    sys.exit(_main(sys.argv[1:]))
