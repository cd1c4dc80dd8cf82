"""Server memory per idle authenticated raw-TCP connection, memory engine vs redis engine.

    python bench/conn_cost.py --engine redis --conns 5000 [--dsn postgresql://postgres@127.0.0.1/imd_bench]

Starts one imd node (``python -m imd``) on a PostgreSQL store (or SQLite with
``--dsn ""``), opens ``--conns`` connections from this process, authenticates
each as its own user, waits for presence to settle, and prints one JSON object:
the node's RSS growth per connection and, with the redis engine, Redis's
``used_memory`` growth per connection (its user channel and presence record).
"""

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import uuid

import jwt
import orjson
import redis

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from imd.client import Client  # noqa: E402
from bench.peers import rss_bytes  # noqa: E402

SECRET = "bench-secret-bench-secret-bench-secret!"



def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--engine", choices=("memory", "redis"), default="redis")
    ap.add_argument("--conns", type=int, default=5000)
    ap.add_argument("--dsn", default="")
    ap.add_argument("--redis", default="redis://127.0.0.1:6379/12")
    a = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="imd-conn-cost-")
    prefix = f"cc{uuid.uuid4().hex[:6]}:"
    store = f'backend = "postgresql"\ndsn = "{a.dsn}"' if a.dsn else 'backend = "sqlite"'
    cfg = os.path.join(tmp, "imd.toml")
    with open(cfg, "w") as f:
        f.write(f'[node]\nid = "cc"\ndata_dir = "{tmp}/var"\n[auth]\nsecret = "{SECRET}"\n'
                f'[listen]\nxmpp = ""\ncomet = ""\nadmin = ""\ncontrol = ""\ntcp = "127.0.0.1:0"\n'
                f'[store]\n{store}\n[engine]\nbackend = "{a.engine}"\nurl = "{a.redis}"\nprefix = "{prefix}"\n'
                f'[limits]\nheartbeat = 300\nidle_timeout = 900\n')
    log_path = os.path.join(tmp, "imd.log")
    logf = open(log_path, "wb")
    proc = subprocess.Popen([sys.executable, "-m", "imd", "-c", cfg], cwd=ROOT, stdout=logf, stderr=subprocess.STDOUT,
                            env=dict(os.environ, PYTHONPATH=ROOT))
    try:
        deadline = time.time() + 30
        while "ready node=" not in open(log_path).read():
            if time.time() > deadline or proc.poll() is not None:
                raise SystemExit(open(log_path).read())
            time.sleep(0.1)
        port = int(re.search(r"listening name=tcp addr=[\d.]+:(\d+)", open(log_path).read()).group(1))
        r = redis.Redis.from_url(a.redis) if a.engine == "redis" else None
        time.sleep(1)
        m0, r0 = rss_bytes([proc.pid]), (r.info("memory")["used_memory"] if r else 0)
        exp = int(time.time()) + 3600
        clients = []
        t0 = time.time()
        for i in range(a.conns):
            c = Client("127.0.0.1", port, timeout=30)
            c.auth(jwt.encode({"sub": f"{prefix}u{i}".replace(":", "_"), "role": "guest", "exp": exp}, SECRET,
                              algorithm="HS256"), device="d")
            clients.append(c)
        auth_s = time.time() - t0
        time.sleep(3)
        m1, r1 = rss_bytes([proc.pid]), (r.info("memory")["used_memory"] if r else 0)
        out = {"engine": a.engine, "store": "postgresql" if a.dsn else "sqlite", "conns": a.conns,
               "auth_per_s": round(a.conns / auth_s), "node_rss_bytes_per_conn": round((m1 - m0) / a.conns),
               "redis_bytes_per_conn": round((r1 - r0) / a.conns) if r else None}
        print(orjson.dumps(out).decode())
        for c in clients:
            c.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        if a.engine == "redis":
            rr = redis.Redis.from_url(a.redis)
            keys = list(rr.scan_iter(match=prefix + "*", count=5000))
            for i in range(0, len(keys), 5000):
                rr.delete(*keys[i:i + 5000])


if __name__ == "__main__":
    main()
