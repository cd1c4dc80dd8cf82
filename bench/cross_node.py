"""Chat throughput between two nodes against one node (raw TCP, PostgreSQL store).

    python bench/cross_node.py --dsn postgresql://postgres@127.0.0.1/imd_bench [--pairs 20 --msgs 500]

Starts nodes with ``python -m imd`` and runs three cases: one node with the
memory engine, one node with the redis engine, two nodes with the redis
engine (senders on one, receivers on the other). Each of ``--pairs`` sender
threads sends ``--msgs`` messages without waiting (then collects the acks);
its receiver counts arrivals. Prints one JSON line per case: messages per
second from the first send to the last arrival, and the CPU time the imd
processes and the Redis server spent per message (the numbers to trust on a
machine shared by clients, PostgreSQL and Redis).
"""

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid

import jwt
import orjson

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from imd.client import Client  # noqa: E402

SECRET = "bench-secret-bench-secret-bench-secret!"


def start_node(tmp, node_id, engine, dsn, redis_url, prefix):
    d = os.path.join(tmp, node_id)
    os.makedirs(d, exist_ok=True)
    cfg = os.path.join(d, "imd.toml")
    with open(cfg, "w") as f:
        f.write(f'[node]\nid = "{node_id}"\ndata_dir = "{d}/var"\n[auth]\nsecret = "{SECRET}"\n'
                f'[listen]\nxmpp = ""\ncomet = ""\nadmin = ""\ncontrol = ""\ntcp = "127.0.0.1:0"\n'
                f'[store]\nbackend = "postgresql"\ndsn = "{dsn}"\n'
                f'[engine]\nbackend = "{engine}"\nurl = "{redis_url}"\nprefix = "{prefix}"\n')
    log = os.path.join(d, "imd.log")
    proc = subprocess.Popen([sys.executable, "-m", "imd", "-c", cfg], cwd=ROOT, stdout=open(log, "wb"),
                            stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONPATH=ROOT))
    deadline = time.time() + 30
    while "ready node=" not in open(log).read():
        if time.time() > deadline or proc.poll() is not None:
            raise SystemExit(open(log).read())
        time.sleep(0.1)
    port = int(re.search(r"listening name=tcp addr=[\d.]+:(\d+)", open(log).read()).group(1))
    return proc, port


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def redis_cpu(url):
    import redis
    info = redis.Redis.from_url(url).info("cpu")
    return info["used_cpu_sys"] + info["used_cpu_user"]


def login(port, user):
    c = Client("127.0.0.1", port, timeout=60)
    c.auth(jwt.encode({"sub": user, "role": "guest", "exp": int(time.time()) + 3600}, SECRET, algorithm="HS256"),
           device="d")
    return c


def run_case(name, send_port, recv_port, pairs, msgs, tag, pids, redis_url):
    senders = [login(send_port, f"{tag}s{i}") for i in range(pairs)]
    receivers = [login(recv_port, f"{tag}r{i}") for i in range(pairs)]
    done = []

    def send(c, to):
        for k in range(msgs):
            c.msg(to, f"message {k} from a bench sender", wait=False)
        acks = 0
        while acks < msgs:
            if c.recv(timeout=60).get("type") == "ack":
                acks += 1

    def receive(c):
        n = 0
        while n < msgs:
            if c.recv(timeout=60).get("type") == "msg":
                n += 1
        done.append(time.perf_counter())

    threads = [threading.Thread(target=receive, args=(r,)) for r in receivers]
    threads += [threading.Thread(target=send, args=(s, f"{tag}r{i}")) for i, s in enumerate(senders)]
    c0, r0 = sum(cpu_seconds(p) for p in pids), redis_cpu(redis_url)
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    dt = max(done) - t0
    node_cpu = sum(cpu_seconds(p) for p in pids) - c0
    redis_cpu_s = redis_cpu(redis_url) - r0
    for c in senders + receivers:
        c.close()
    return {"case": name, "pairs": pairs, "msgs": pairs * msgs, "seconds": round(dt, 2),
            "msgs_per_s": round(pairs * msgs / dt),
            "node_cpu_us_per_msg": round(node_cpu / (pairs * msgs) * 1e6, 1),
            "redis_cpu_us_per_msg": round(redis_cpu_s / (pairs * msgs) * 1e6, 1)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dsn", required=True)
    ap.add_argument("--redis", default="redis://127.0.0.1:6379/12")
    ap.add_argument("--pairs", type=int, default=20)
    ap.add_argument("--msgs", type=int, default=500)
    a = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="imd-xnode-")
    prefix = f"xn{uuid.uuid4().hex[:6]}:"
    for case in ("one node, memory engine", "one node, redis engine", "two nodes, redis engine"):
        engine = "memory" if "memory" in case else "redis"
        procs = []
        try:
            p1, port1 = start_node(tmp, "x1", engine, a.dsn, a.redis, prefix)
            procs.append(p1)
            port2 = port1
            if case.startswith("two"):
                p2, port2 = start_node(tmp, "x2", engine, a.dsn, a.redis, prefix)
                procs.append(p2)
            tag = uuid.uuid4().hex[:6]
            result = run_case(case, port1, port2, a.pairs, a.msgs, tag, [p.pid for p in procs], a.redis)
            print(orjson.dumps(result).decode(), flush=True)
        finally:
            for p in procs:
                p.send_signal(signal.SIGTERM)
            for p in procs:
                p.wait(60)


if __name__ == "__main__":
    main()
