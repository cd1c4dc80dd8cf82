"""Chat through raw TCP with the store's own view: acked msgs/s, ack p50/p99, server CPU-seconds per
1,000 acked (imd — its SQLite writer process included, and that process's share alone — and the
PostgreSQL backends serving it), and from imd's /metrics the batches, mean batch size, mean commit
time and how busy the writers were (commit seconds per second).

    PYTHONPATH=. python bench/chat_store.py --rates 0,8000 --seconds 5
    PYTHONPATH=. python bench/chat_store.py --store '{"backend": "postgresql", "writers": 4,
        "batch_max": 100}' --rates 0,15000
    PYTHONPATH=. python bench/chat_store.py --store '{"backend": "postgresql"}' --workers 2 --engine redis

Rate 0 = closed loop (--window unacked per connection); else open loop at that total rate.
Pairs of users (bench/loadgen.py, --procs processes) send `msg` to each other, so every message
is stored for sender and recipient and delivered live. PostgreSQL runs in a fresh database
imd_chat_store (dropped after). With `--workers N --engine redis` the "pg" CPU includes redis-server's
and the store columns from /metrics are one worker's. `--pyspy PREFIX` records a py-spy profile of imd per rate
(PREFIX-RATE.txt, collapsed stacks; needs py-spy on PATH or --pyspy-bin). One JSON line per rate.
"""
import argparse
import json
import os
import subprocess
import sys
import time
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from bench import loadgen as lg, parts, peers  # noqa: E402

DATABASE = "imd_chat_store"


def scrape(port):
    """imd's store counters and ack-latency sums from /metrics."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith(("imd_store", "imd_ack_latency_seconds_sum", "imd_ack_latency_seconds_count")):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


def recreate_database(drop_only=False):
    import psycopg
    with psycopg.connect(parts.PG_SERVER + " dbname=postgres", autocommit=True) as con:
        con.execute(f"DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)")
        if not drop_only:
            con.execute(f"CREATE DATABASE {DATABASE}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rates", default="0", help="comma-separated; 0 = closed loop")
    ap.add_argument("--pairs", type=int, default=500)
    ap.add_argument("--procs", type=int, default=2, help="load-generator processes")
    ap.add_argument("--seconds", type=float, default=8)
    ap.add_argument("--window", type=int, default=8)
    ap.add_argument("--store", default="{}", help="JSON: [store] settings for imd")
    ap.add_argument("--python", default=sys.executable, help="interpreter that runs imd")
    ap.add_argument("--workers", type=int, default=1, help="node.workers (> 1 needs --engine redis)")
    ap.add_argument("--engine", default="memory", choices=("memory", "redis"))
    ap.add_argument("--pyspy", default="", metavar="PREFIX")
    ap.add_argument("--pyspy-bin", default="py-spy")
    a = ap.parse_args()
    store = json.loads(a.store)
    pg = store.get("backend") == "postgresql"
    if pg:
        store.setdefault("dsn", f"{parts.PG_SERVER} dbname={DATABASE}")
        recreate_database()
    imd = peers.Imd(REPO, python=a.python, secret=parts.SECRET, store=store, workers=a.workers,
                    engine=a.engine).start()
    try:
        spec = parts._spec_for("tcp", imd, pairs=True)
        pids = imd.pids()
        writer_pids = [p for p in pids if p not in imd.pids(writers=False)]   # SQLite writer processes
        with lg.Fleet(spec, processes=a.procs, deadline=900) as fleet:
            ok, failed, _ = fleet.connect(2 * a.pairs, timeout=120)
            if failed:
                raise SystemExit(f"{failed} connections failed: {fleet.errors()[:1]}")
            fleet.traffic(0, 1, 0.5)            # the database connections exist after this
            db_pids = parts.pg_backend_pids(DATABASE) if pg else []
            if a.engine == "redis":     # the bus's CPU counts with the database's
                db_pids += [int(p) for p in subprocess.run(["pidof", "redis-server"], capture_output=True,
                                                           text=True).stdout.split()]
            for rate in [float(x) for x in a.rates.split(",")]:
                m0, c0, d0 = scrape(imd.ports["admin"]), peers.cpu_seconds(pids), parts._db_cpu(db_pids)
                w0 = peers.cpu_seconds(writer_pids)
                load = open("/proc/loadavg").read().split()[0]
                spy = None
                if a.pyspy:
                    spy = subprocess.Popen([a.pyspy_bin, "record", "-f", "raw", "-r", "200", "--nonblocking",
                                            "-o", f"{a.pyspy}-{int(rate)}.txt", "--pid", str(pids[0]),
                                            "-d", str(int(a.seconds))],
                                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                sent, acked, wall, lat = fleet.traffic(rate, a.window if rate == 0 else 0, a.seconds)
                slip = fleet.client_slip
                if spy:
                    spy.wait()
                m1, c1, d1 = scrape(imd.ports["admin"]), peers.cpu_seconds(pids), parts._db_cpu(db_pids)
                w1 = peers.cpu_seconds(writer_pids)
                d = {k: v - m0.get(k, 0) for k, v in m1.items()}
                batches = d.get("imd_store_batches_total", 0)
                commit_s = d.get("imd_store_commit_seconds_total", 0)
                lat = sorted(lat)
                print(json.dumps({
                    "store": store.get("backend", "sqlite"), "workers": a.workers, "engine": a.engine,
                    "writers": store.get("writers", 1 if not pg else 2),
                    "batch_max": store.get("batch_max", 1000), "rate": rate or f"window {a.window}",
                    "sent": sent, "acked": acked, "acked_per_s": round(acked / wall),
                    "ack_p50_ms": round(lg.quantile(lat, .5) / 1000, 1),
                    "ack_p99_ms": round(lg.quantile(lat, .99) / 1000, 1),
                    "imd_cpu_s_per_1k": round(1000 * (c1 - c0) / max(acked, 1), 3),
                    "writer_process_cpu_s_per_1k": round(1000 * (w1 - w0) / max(acked, 1), 3)
                    if writer_pids else None,
                    "pg_cpu_s_per_1k": round(1000 * (d1 - d0) / max(acked, 1), 3) if pg else None,
                    "batches": int(batches),
                    "mean_batch": round(d.get("imd_store_committed_total", 0) / max(batches, 1), 1),
                    "mean_commit_ms": round(1000 * commit_s / max(batches, 1), 2),
                    "writers_busy": round(commit_s / wall, 2),
                    "generator_cpu": round(fleet.client_load, 2), "generator_slip_ms": round(1000 * slip),
                    "loadavg": load}), flush=True)
                time.sleep(1)
    finally:
        imd.stop()
        if pg:
            recreate_database(drop_only=True)


if __name__ == "__main__":
    main()
