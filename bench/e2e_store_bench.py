"""End to end: chat messages acked per second through the raw-TCP protocol, and ack latency.

    PYTHONPATH=. python bench/e2e_store_bench.py --backend postgresql --writers 2 --batch 1000
    PYTHONPATH=. python bench/e2e_store_bench.py --backend postgresql --rate 8000

Starts imd (one worker, memory engine) as a subprocess, then ``--procs`` load
processes, each with ``--conns`` raw-TCP sender connections. Every sender keeps
``--window`` messages in flight (or, with ``--rate``, offers its share of that
rate), to offline recipients, so each message is stored for sender and recipient
and acked. Throughput and latency are counted over ``--seconds`` after a 2 s
warm-up. The load processes share the machine's cores with imd and PostgreSQL.
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import os
import struct
import subprocess
import sys
import tempfile
import time

import orjson

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
PG = "host=127.0.0.1 port=5432 user=postgres"


def load(host: str, port: int, proc: int, conns: int, window: int, rate: float,
         warmup: float, seconds: float) -> None:
    """A load process: prints {"acks", "errors", "lat"} measured after the warm-up."""
    from gevent import monkey
    monkey.patch_all()
    import gevent
    from gevent import socket
    from gevent.event import Event

    from tests.daemon import token

    start = time.monotonic()
    t_measure, t_end = start + warmup, start + warmup + seconds
    stats = {"acks": 0, "errors": 0, "lat": []}

    def frame(env: dict) -> bytes:
        data = orjson.dumps(env)
        return struct.pack(">I", len(data)) + data

    def conn(c: int) -> None:
        user = "p%dc%d" % (proc, c)
        sock = socket.create_connection((host, port))
        sock.sendall(frame({"type": "auth", "token": token(user, "guest"), "platform": "android",
                            "device": "bench"}))
        sent: dict = {}
        credit = Event()
        credit.set()

        def reader() -> None:
            buf = b""
            while True:
                data = sock.recv(262144)
                if not data:
                    return
                buf += data
                while len(buf) >= 4:
                    n = struct.unpack(">I", buf[:4])[0]
                    if len(buf) < 4 + n:
                        break
                    env = orjson.loads(buf[4:4 + n])
                    buf = buf[4 + n:]
                    kind = env.get("type")
                    if kind in ("ack", "error") and env.get("id") in sent:
                        t0 = sent.pop(env["id"])
                        now = time.monotonic()
                        if t_measure <= t0 and now <= t_end:
                            if kind == "ack":
                                stats["acks"] += 1
                                stats["lat"].append(now - t0)
                            else:
                                stats["errors"] += 1
                        credit.set()

        reading = gevent.spawn(reader)
        i = 0
        per_conn = rate / conns if rate else 0
        while time.monotonic() < t_end:
            if per_conn:
                due = int((time.monotonic() - start) * per_conn)
                if i >= due:
                    gevent.sleep(0.005)
                    continue
            elif len(sent) >= window:
                credit.clear()
                credit.wait(1)
                continue
            out = []
            burst = 1 if per_conn else window - len(sent)
            for _ in range(max(burst, 1)):
                cid = "%d" % i
                sent[cid] = time.monotonic()
                out.append(frame({"type": "msg", "id": cid, "to": "r%d" % ((proc * 7919 + c * 31 + i) % 5000),
                                  "body": "hello, is the flat still free on the 12th?",
                                  "ctx": {"listing": "L12345"}}))
                i += 1
            sock.sendall(b"".join(out))
        gevent.sleep(0.5)
        reading.kill()
        sock.close()

    gevent.joinall([gevent.spawn(conn, c) for c in range(conns)])
    os.write(1, orjson.dumps(stats) + b"\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", default="postgresql", choices=["sqlite", "postgresql"])
    ap.add_argument("--writers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--conns", type=int, default=50)
    ap.add_argument("--window", type=int, default=20)
    ap.add_argument("--rate", type=float, default=0, help="total messages/s offered (0: windowed)")
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--load", nargs=8, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.load:
        h, p, proc, conns, window, rate, warm, secs = args.load
        load(h, int(p), int(proc), int(conns), int(window), float(rate), float(warm), float(secs))
        return

    import psycopg

    from tests.daemon import Imd
    tmp = tempfile.mkdtemp(prefix="imd-e2e-")
    store = {"backend": args.backend, "batch_max": args.batch, "queue_size": 100000}
    if args.backend == "postgresql":
        with psycopg.connect(PG + " dbname=test", autocommit=True) as con:
            con.execute("DROP DATABASE IF EXISTS imd_e2e WITH (FORCE)")
            con.execute("CREATE DATABASE imd_e2e")
        store.update(dsn=PG + " dbname=imd_e2e", writers=args.writers)
    d = Imd(tmp, {"store": store}).start()
    host, port = d.addr["tcp"]
    try:
        procs = [subprocess.Popen([sys.executable, __file__, "--load", host, str(port), str(n),
                                   str(args.conns), str(args.window), str(args.rate / args.procs),
                                   "2", str(args.seconds)], stdout=subprocess.PIPE)
                 for n in range(args.procs)]
        results = [orjson.loads(p.communicate(timeout=args.seconds + 60)[0]) for p in procs]
    finally:
        d.stop()
        if args.backend == "postgresql":
            with psycopg.connect(PG + " dbname=test", autocommit=True) as con:
                con.execute("DROP DATABASE IF EXISTS imd_e2e WITH (FORCE)")
    lat = sorted(x for r in results for x in r["lat"])
    acks = sum(r["acks"] for r in results)
    pct = (lambda q: round(1000 * lat[min(int(len(lat) * q), len(lat) - 1)], 1) if lat else None)
    print(orjson.dumps({
        "backend": args.backend, "writers": args.writers, "batch_max": args.batch,
        "procs": args.procs, "conns": args.conns, "window": args.window, "rate": args.rate,
        "acked_per_s": round(acks / args.seconds), "errors": sum(r["errors"] for r in results),
        "ack_p50_ms": pct(0.5), "ack_p99_ms": pct(0.99),
    }).decode())


if __name__ == "__main__":
    main()
