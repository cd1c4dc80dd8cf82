"""The SQLite data directory's disk fills up under load, then space returns.

The data directory is a dedicated 24 MiB tmpfs mounted for this test (it needs
root and mount(2); the test skips otherwise). Under sustained load a filler
file takes every free byte. SQLite then fails its writes with SQLITE_FULL; the
writer retries them, its queue (40 operations) fills, and senders must get
error 503 — never an ack for a message that was not stored. The filler is
removed; the daemon must recover by itself. Finally it is killed with SIGKILL,
restarted, and every inbox is read back from disk: the checker must report
none lost, none duplicated, none reordered, and nothing refused stored. The
failures are the writer's one-line warnings; no traceback in the log.
"""

import errno
import os
import subprocess
import threading
import time

import pytest

from tests.daemon import Imd, token
from tests.faults.checker import Checker
from tests.faults.load import Receiver, Sender, audit, wind_down

USERS = [f"r{i}" for i in range(4)]
SIZE = "24m"


@pytest.fixture
def small_fs(tmp_path):
    mnt = tmp_path / "var"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={SIZE},mode=0700", "tmpfs", str(mnt)],
                          capture_output=True, text=True)
    if proc.returncode:
        pytest.skip(f"cannot mount a small tmpfs here: {proc.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(path) -> int:
    """Take every free byte of the filesystem holding ``path``: fallocate what statvfs
    reports free, then 4 KiB writes until ENOSPC. Returns the bytes taken."""
    st = os.statvfs(path)
    free = st.f_bavail * st.f_frsize
    fd = os.open(os.path.join(path, "filler"), os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while free > 65536:
            try:                         # the daemon writes meanwhile: back off on ENOSPC
                os.posix_fallocate(fd, 0, free - 65536)
                break
            except OSError as e:
                assert e.errno == errno.ENOSPC, e
                free //= 2
        os.lseek(fd, 0, os.SEEK_END)
        while True:
            try:
                os.write(fd, b"\0" * 4096)
            except OSError as e:
                assert e.errno == errno.ENOSPC, e
                break
        return os.fstat(fd).st_size
    finally:
        os.close(fd)


def wait_for(cond, timeout, what):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_sqlite_disk_full_under_load(tmp_path, small_fs):
    d = Imd(tmp_path, {"store": {"backend": "sqlite", "queue_size": 40}}).start()
    assert d.data_dir == str(small_fs)
    addr = lambda: d.addr["tcp"]  # noqa: E731
    chk = Checker()
    stop_send, stop_recv = threading.Event(), threading.Event()
    receivers = [Receiver(u, "phone", addr, token, chk, stop_recv) for u in USERS]
    senders = [Sender(f"s{i}", USERS, addr, token, chk, stop_send, window=20, body_size=400)
               for i in range(4)]
    try:
        for t in receivers + senders:
            t.start()
        wait_for(lambda: chk.report().acked >= 300, 30, "no load before the disk filled")
        taken = fill(str(small_fs))
        wait_for(lambda: chk.report().refused > 0, 30,
                 f"no 503 within 30 s of filling the disk ({taken} bytes taken): {chk.report().summary()}")
        time.sleep(2)
        full = chk.report()
        os.unlink(small_fs / "filler")                         # space returns
        wait_for(lambda: chk.report().acked >= full.acked + 300, 45, "imd did not recover by itself")
        wind_down(d, token, USERS, senders, receivers, stop_send, stop_recv)
        d.kill()
        d.start()
        audit(addr, token, USERS, chk)
    finally:
        stop_send.set()
        stop_recv.set()
        d.stop()
    rep = chk.report()
    print(rep, f"refused while full: {full.refused}", sep="\n")
    if os.environ.get("IMD_FAULT_LOG"):
        print(d.log_text())
    assert rep.ok, rep          # none lost, duplicated or reordered; no conflicting or twice-stored id
    assert rep.unacked_delivered == 0, "a message refused with 503 was stored anyway"
    log = d.log_text()
    assert "database or disk is full" in log          # the writer's one-line warnings
    assert "Traceback" not in log and "ThreadPoolWorker" not in log, "threadpool noise in the log"
