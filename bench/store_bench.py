"""Store write throughput: messages committed per second and ack latency, straight on the Store.

    PYTHONPATH=. python bench/store_bench.py --backend postgresql --writers 4 --batch 1000
    PYTHONPATH=. python bench/store_bench.py --backend sqlite --synchronous full
    PYTHONPATH=. python bench/store_bench.py --backend sqlite --pairs 500 --batch-wait 0.002 \
        --rate 10000 --messages 120000 --prefill 300000

Each message is stored for sender and recipient (two inbox entries); ``--senders``
guests write to ``--recipients`` hosts, or with ``--pairs N`` 2N users write to their
partner (the chat bench's shape). ``--prefill`` messages are stored first, not measured:
SQLite's cost per message grows with the file (docs/store.md, session 7). The load keeps
the write queue busy: it submits until StoreFull, then yields. PostgreSQL runs in a
fresh database ``imd_bench`` (dropped after); SQLite in a temporary directory.
PostgreSQL also reports its own side per message: the CPU of the backends serving
the store (``pg_cpu_us_per_msg``) and the WAL written (``wal_bytes_per_msg``, from
pg_current_wal_lsn: includes anything else the server writes meanwhile). SQLite, in this
process, reports the bytes it wrote per message (``bytes_written_per_msg``, /proc/self/io
``wchar``: the WAL's and the checkpoints' writes).
Prints one JSON line.
"""

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import gevent  # noqa: E402
import orjson  # noqa: E402
import psycopg  # noqa: E402

from bench import peers  # noqa: E402
from imd.ids import MidGen  # noqa: E402
from imd.store.base import StoreFull  # noqa: E402
from imd.store.postgresql import PostgresStore  # noqa: E402
from imd.store.sqlite import SqliteStore  # noqa: E402

PG_SERVER = "host=127.0.0.1 port=5432 user=postgres"


def make_store(args):
    if args.backend == "sqlite":
        path = tempfile.mkdtemp(prefix="imd-bench-")
        store = SqliteStore(path, queue_size=args.queue, batch_max=args.batch,
                            synchronous=args.synchronous, batch_wait=args.batch_wait)
        return store, lambda: shutil.rmtree(path)
    with psycopg.connect(PG_SERVER + " dbname=test", autocommit=True) as con:
        con.execute("DROP DATABASE IF EXISTS imd_bench WITH (FORCE)")
        con.execute("CREATE DATABASE imd_bench")

    def drop():
        with psycopg.connect(PG_SERVER + " dbname=test", autocommit=True) as con:
            con.execute("DROP DATABASE IF EXISTS imd_bench WITH (FORCE)")
    store = PostgresStore(PG_SERVER + " dbname=imd_bench", writers=args.writers,
                          queue_size=args.queue, batch_max=args.batch)
    return store, drop


def pg_side():
    """(CPU seconds of the backends serving imd_bench, current WAL position in bytes)."""
    with psycopg.connect(PG_SERVER + " dbname=test", autocommit=True) as con:
        pids = [r[0] for r in con.execute("SELECT pid FROM pg_stat_activity WHERE datname = 'imd_bench'")]
        lsn = con.execute("SELECT pg_current_wal_lsn() - '0/0'").fetchone()[0]
    return peers.cpu_seconds(pids), pids, int(lsn)


def written() -> int:
    """Bytes this process passed to write calls so far (/proc/self/io ``wchar``)."""
    for line in open("/proc/self/io"):
        if line.startswith("wchar:"):
            return int(line.split()[1])
    return 0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", default="postgresql", choices=["sqlite", "postgresql"])
    ap.add_argument("--writers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--synchronous", default="full", choices=["full", "normal"])
    ap.add_argument("--messages", type=int, default=50000)
    ap.add_argument("--senders", type=int, default=2000)
    ap.add_argument("--recipients", type=int, default=2000)
    ap.add_argument("--queue", type=int, default=20000)
    ap.add_argument("--rate", type=int, default=0, help="messages/s to offer (0: as fast as it takes)")
    ap.add_argument("--pairs", type=int, default=0, help="2N users writing to their partner (0: senders to recipients)")
    ap.add_argument("--prefill", type=int, default=0, help="messages stored first, not measured")
    ap.add_argument("--batch-wait", type=float, default=0.0, help="SQLite's gathering (imd's default config: 0.002)")
    args = ap.parse_args()
    pg = args.backend == "postgresql"
    store, cleanup = make_store(args)
    store.open()
    latencies = []
    body = {"text": "hello, is the flat still free on the 12th? " * 2}
    ctx = {"listing": "L12345", "booking": "B987"}

    def acked(started):
        return lambda result, error: latencies.append(time.perf_counter() - started)

    mid = MidGen()

    def users(i):
        if args.pairs:
            u = i % (2 * args.pairs)
            return "u%d" % u, "u%d" % (u ^ 1)
        s = i % args.senders
        return "g%d" % s, "h%d" % ((s * 7 + i) % args.recipients)

    try:
        for start in range(0, args.prefill, 1000):
            for i in range(start, min(start + 1000, args.prefill)):
                store.send_message(*users(i), "p%d" % i, body, ctx, mid(), 1712345678000, acked(0))
            store.flush()
        latencies.clear()
        if pg:      # one batch first, so that the writer connections exist when counted
            for n in range(args.writers * 4):
                store.send_message("w%d" % n, "x%d" % n, None, body, ctx, mid(), 1, acked(0))
            store.flush()
            latencies.clear()
            db0, pids, wal0 = pg_side()
        t0 = time.perf_counter()
        cpu0, w0, s0 = resource.getrusage(resource.RUSAGE_SELF), written(), store.stats()
        i = 0
        while i < args.messages:
            if args.rate and i >= (time.perf_counter() - t0) * args.rate:
                gevent.sleep(0.002)
                continue
            try:
                store.send_message(*users(i), "c%d" % i, body, ctx, mid(), 1712345678000 + i,
                                   acked(time.perf_counter()))
                i += 1
            except StoreFull:
                gevent.sleep(0.001)
            if i % 200 == 0:
                gevent.sleep(0)
        store.flush()
        elapsed = time.perf_counter() - t0
        cpu1, w1 = resource.getrusage(resource.RUSAGE_SELF), written()
        stats = {k: v - s0[k] for k, v in store.stats().items()
                 if k in ("batches", "retries", "committed", "commit_seconds_sum", "commit_count")}
        latencies.sort()
        extra = {} if pg else {"bytes_written_per_msg": (w1 - w0) // args.messages}
        if pg:
            db1 = sum(peers.cpu_seconds([p]) for p in pids)
            wal1 = pg_side()[2]
            extra = {"pg_cpu_us_per_msg": round(1e6 * (db1 - db0) / args.messages, 1),
                     "wal_bytes_per_msg": round((wal1 - wal0) / args.messages)}
        print(orjson.dumps({
            "backend": args.backend, "writers": args.writers if args.backend == "postgresql" else 1,
            "batch_max": args.batch, "synchronous": args.synchronous,
            "messages": args.messages, "rate": args.rate, "prefill": args.prefill,
            "client_cpu_s": round(cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime, 2), "seconds": round(elapsed, 3),
            "msgs_per_s": round(args.messages / elapsed), "batches": stats["batches"], "retries": stats["retries"],
            "avg_batch": round(stats["committed"] / max(stats["batches"], 1), 1),
            "avg_commit_ms": round(1000 * stats["commit_seconds_sum"] / max(stats["commit_count"], 1), 2),
            "ack_p50_ms": round(1000 * latencies[len(latencies) // 2], 1),
            "ack_p99_ms": round(1000 * latencies[int(len(latencies) * 0.99)], 1),
            "client_cpu_us_per_msg": round(1e6 * (cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime
                                                  - cpu0.ru_stime) / args.messages, 1),
            "client_user_us_per_msg": round(1e6 * (cpu1.ru_utime - cpu0.ru_utime) / args.messages, 1),
            "client_sys_us_per_msg": round(1e6 * (cpu1.ru_stime - cpu0.ru_stime) / args.messages, 1),
            **extra, "loadavg": open("/proc/loadavg").read().split()[0],
        }).decode())
    finally:
        store.close()
        cleanup()


if __name__ == "__main__":
    main()
