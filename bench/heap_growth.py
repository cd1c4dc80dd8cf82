"""Where does the daemon's memory grow? A tracemalloc diff of imd's Python heap under load.

    PYTHONPATH=. python bench/heap_growth.py [--store sqlite|postgresql] [--warmup 60] [--span 150]

Runs an imd node inside this (gevent-patched) process (tests/inproc.py) with
the soak's load (tests/faults/load.py: 8 senders at 50 msg/s each, 16
followers, 4 churning devices), takes a tracemalloc snapshot after
``--warmup`` seconds and another ``--span`` seconds later, and prints the
growth of the Python heap allocated by imd (the load generator's and the
checker's allocations are filtered out) with the biggest differences by
traceback. Memory that RSS shows growing in bench/soak.py but that does not
appear here was allocated outside Python's allocator: SQLite's page caches,
libpq, the C allocator's fragmentation. It also prints SQLite's own heap (in this
process: the read connections'; the writer connection's is in the SQLite writer
process, unless ``store.sqlite_writer = "thread"``), the store's open read
connections and the process's file descriptors at both snapshots: a count that
grows with time (not with load) is a leak of connections, as the SQLite store had
one per gevent pool thread until 2026-12-05 (gevent retires idle pool threads
after 5 s and starts new ones).
"""

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import gc  # noqa: E402
import os  # noqa: E402
import pathlib  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import tracemalloc  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("VmRSS")).split()[1])


def sqlite_memory_kib() -> int:
    """SQLite's own heap (sqlite3_memory_used) in this process, or -1 if not reachable."""
    import ctypes
    import ctypes.util
    import sqlite3  # noqa: F401  (loads the library the store uses)
    try:
        lib = ctypes.CDLL(ctypes.util.find_library("sqlite3") or "libsqlite3.so.0")
        lib.sqlite3_memory_used.restype = ctypes.c_int64
        return lib.sqlite3_memory_used() // 1024
    except (OSError, AttributeError):
        return -1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--store", default="sqlite", choices=("sqlite", "postgresql"))
    ap.add_argument("--warmup", type=float, default=60.0)
    ap.add_argument("--span", type=float, default=150.0)
    args = ap.parse_args()
    tracemalloc.start(10)

    from tests import inproc
    from tests.daemon import token
    from tests.faults.checker import Checker
    from tests.faults.load import Receiver, Sender

    overrides, scratch = {}, None
    if args.store == "postgresql":
        import psycopg
        scratch = f"imd_heap_{os.getpid()}"
        with psycopg.connect("host=127.0.0.1 user=postgres dbname=test", autocommit=True) as con:
            con.execute(f"CREATE DATABASE {scratch}")
        overrides = {"store": {"backend": "postgresql", "dsn": f"host=127.0.0.1 user=postgres dbname={scratch}"}}
    d = inproc.start(pathlib.Path(tempfile.mkdtemp(prefix="imd-heap-")), overrides)
    where = inproc.addr(d)
    addr = lambda: where  # noqa: E731
    chk, stop = Checker(), threading.Event()
    users = [f"r{i}" for i in range(16)]
    load = [Receiver(u, "phone", addr, token, chk, stop) for u in users]
    load += [Receiver(users[i], "tablet", addr, token, chk, stop, churn=5.0) for i in range(4)]
    load += [Sender(f"s{i}", users, addr, token, chk, stop, rate=50) for i in range(8)]
    for t in load:
        t.start()

    def connections():
        return len(getattr(d.store, "_read_cons", ())), len(os.listdir("/proc/self/fd"))

    def snapshot():
        gc.collect()
        return tracemalloc.take_snapshot().filter_traces([
            tracemalloc.Filter(False, "*/tests/faults/*", all_frames=True),
            tracemalloc.Filter(False, "*/imd/client.py", all_frames=True),
            tracemalloc.Filter(False, tracemalloc.__file__)]), rss_kib(), chk.report().acked, sqlite_memory_kib()

    sqlite_memory_kib()                     # imports ctypes now, not between the snapshots
    time.sleep(args.warmup)
    s1, r1, n1, q1 = snapshot()
    c1 = connections()
    time.sleep(args.span)
    s2, r2, n2, q2 = snapshot()
    c2 = connections()
    heap1, heap2 = (sum(t.size for t in s.traces) for s in (s1, s2))
    print(f"messages acked in the span: {n2 - n1}")
    print(f"imd Python heap: {heap1 // 1024} KiB -> {heap2 // 1024} KiB ({(heap2 - heap1) / 1024:+.1f} KiB, "
          f"{(heap2 - heap1) / max(1, n2 - n1):+.2f} B/message)")
    print(f"process RSS (includes the load generator): {r1} -> {r2} KiB")
    print(f"SQLite's own heap (sqlite3_memory_used): {q1} -> {q2} KiB")
    print(f"store read connections: {c1[0]} -> {c2[0]}; open file descriptors: {c1[1]} -> {c2[1]}")
    for stat in s2.compare_to(s1, "traceback")[:8]:
        print(stat)
        for line in stat.traceback.format()[-4:]:
            print("   ", line)
    stop.set()
    if scratch:
        import psycopg
        d.stop(False, 5.0)
        with psycopg.connect("host=127.0.0.1 user=postgres dbname=test", autocommit=True) as con:
            con.execute(f"DROP DATABASE IF EXISTS {scratch} WITH (FORCE)")
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
