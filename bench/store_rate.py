"""The SQLite store alone at a fixed rate: CPU and bytes written per message, ack p50/p99.

    PYTHONPATH=. python bench/store_rate.py --rate 10000 --seconds 12 --prefill 300000

500 pairs of users (``--pairs``) send to each other, as in the chat part, straight on
SqliteStore (``batch_wait`` 2 ms, as imd's default config) in a temporary directory under /tmp.
``--prefill`` messages are stored first (closed loop, not measured): the cost per message grows
with the file (docs/store.md, session 7). CPU is this process's (getrusage: the store's threads
and the few µs per message of the load itself); bytes are /proc/self/io ``wchar`` (WAL and
checkpoint writes). Prints one JSON line.
"""

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import gevent  # noqa: E402

from imd.ids import MidGen  # noqa: E402
from imd.store.sqlite import FILENAME, SqliteStore  # noqa: E402


def written() -> int:
    for line in open("/proc/self/io"):
        if line.startswith("wchar:"):
            return int(line.split()[1])
    return 0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rate", type=int, default=10000, help="messages per second offered")
    ap.add_argument("--seconds", type=float, default=12)
    ap.add_argument("--pairs", type=int, default=500)
    ap.add_argument("--prefill", type=int, default=0, help="messages stored first, not measured")
    args = ap.parse_args()
    path = tempfile.mkdtemp(prefix="imd-store-rate-", dir="/tmp")
    store = SqliteStore(path, batch_wait=0.002)
    store.open()
    mids = MidGen()
    users = ["user%05d" % i for i in range(2 * args.pairs)]
    latencies = []

    def send(i, sent_at):
        u = i % len(users)
        cb = (lambda result, error: latencies.append(time.monotonic() - sent_at)) if sent_at else (
            lambda result, error: None)
        store.send_message(users[u], users[u ^ 1], "c%d" % i, {"text": "hello there, message %d" % i},
                           None, mids(), int(time.time() * 1000), cb)

    try:
        i = 0
        while i < args.prefill:
            for _ in range(min(1000, args.prefill - i)):
                send(i, 0)
                i += 1
            store.flush()
        r0, w0, t0 = resource.getrusage(resource.RUSAGE_SELF), written(), time.monotonic()
        sent = 0
        while time.monotonic() - t0 < args.seconds:
            for _ in range(int((time.monotonic() - t0) * args.rate) - sent):
                send(i, time.monotonic())
                i += 1
                sent += 1
            gevent.sleep(0.001)
        store.flush()
        r1, w1 = resource.getrusage(resource.RUSAGE_SELF), written()
        latencies.sort()
        n = len(latencies)
        print(json.dumps({
            "rate": args.rate, "prefill": args.prefill, "acked": n,
            "user_us_per_msg": round((r1.ru_utime - r0.ru_utime) / n * 1e6, 1),
            "sys_us_per_msg": round((r1.ru_stime - r0.ru_stime) / n * 1e6, 1),
            "bytes_written_per_msg": (w1 - w0) // n,
            "ack_p50_ms": round(latencies[n // 2] * 1e3, 1), "ack_p99_ms": round(latencies[int(n * .99)] * 1e3, 1),
            "file_mb": os.path.getsize(os.path.join(path, FILENAME)) >> 20, "batches": store.stats()["batches"]}))
    finally:
        store.close()
        shutil.rmtree(path)


if __name__ == "__main__":
    main()
