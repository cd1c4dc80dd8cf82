"""Chat throughput across nodes against one node (raw TCP, PostgreSQL store).

    python bench/cross_node.py [--dsn postgresql://postgres@127.0.0.1/imd_bench] [--pairs 30 --msgs 500]
    python bench/run.py xnode --keep-other-parts          # the same, as a bench part

Starts nodes with ``python -m imd`` and runs three cases: one node with the
memory engine, one node with the redis engine, three nodes with the redis
engine (pair i: sender on node i mod 3, receiver on node i+1 mod 3, so every
message crosses nodes and every node sends and receives). Each of ``--pairs``
sender threads sends ``--msgs`` messages without waiting (then collects the
acks); its receiver counts arrivals. Prints one JSON line per case: messages
per second from the first send to the last arrival, and the CPU time the imd
processes and the Redis server spent per message (the numbers to trust on a
machine shared by clients, PostgreSQL and Redis). Without ``--dsn`` a database
is created on 127.0.0.1:5432 (user postgres) and dropped after; Redis is a
private redis-server on a free port.
"""

import argparse
import os
import re
import shutil
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


def start_node(tmp, node_id, engine, dsn, redis_url, prefix, python=sys.executable, repo=ROOT):
    d = os.path.join(tmp, node_id)
    os.makedirs(d, exist_ok=True)
    cfg = os.path.join(d, "imd.toml")
    with open(cfg, "w") as f:
        f.write(f'[node]\nid = "{node_id}"\ndata_dir = "{d}/var"\n[auth]\nsecret = "{SECRET}"\n'
                f'[listen]\nxmpp = ""\ncomet = ""\nadmin = ""\ncontrol = ""\ntcp = "127.0.0.1:0"\n'
                f'[store]\nbackend = "postgresql"\ndsn = "{dsn}"\n'
                f'[engine]\nbackend = "{engine}"\nurl = "{redis_url}"\nprefix = "{prefix}"\n'
                f'[limits]\nmsg_rate = 0\n')   # capacity, not the per-session policy
    log = os.path.join(d, "imd.log")
    proc = subprocess.Popen([python, "-m", "imd", "-c", cfg], cwd=repo, stdout=open(log, "wb"),
                            stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONPATH=repo),
                            start_new_session=True)
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


def case_label(name):
    return name.split(",")[0]


def run_case(name, ports, pairs, msgs, tag, pids, redis_url):
    """Pair i: sender on ports[i % n], receiver on ports[(i + 1) % n] (the same node when n = 1)."""
    n = len(ports)
    senders = [login(ports[i % n], f"{tag}s{i}") for i in range(pairs)]
    receivers = [login(ports[(i + 1) % n], f"{tag}r{i}") for i in range(pairs)]
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
    if len(done) < pairs:
        raise RuntimeError(f"{case_label(name)}: {pairs - len(done)} of {pairs} receivers did not get "
                           "every message (see the threads' errors above)")
    dt = max(done) - t0
    node_cpu = sum(cpu_seconds(p) for p in pids) - c0
    redis_cpu_s = redis_cpu(redis_url) - r0
    for c in senders + receivers:
        c.close()
    return {"case": name, "nodes": n, "pairs": pairs, "msgs": pairs * msgs, "seconds": round(dt, 2),
            "msgs_per_s": round(pairs * msgs / dt),
            "node_cpu_us_per_msg": round(node_cpu / (pairs * msgs) * 1e6, 1),
            "redis_cpu_us_per_msg": round(redis_cpu_s / (pairs * msgs) * 1e6, 1)}


CASES = (("one node, memory engine", "memory", 1), ("one node, redis engine", "redis", 1),
         ("three nodes, redis engine, pairs split across nodes", "redis", 3))


def run_all(dsn, redis_url, pairs, msgs, python=sys.executable, repo=ROOT, say=print):
    """Every case of CASES; returns one result dict per case."""
    tmp = tempfile.mkdtemp(prefix="imd-xnode-")
    prefix = f"xn{uuid.uuid4().hex[:6]}:"
    out = []
    for case, engine, n_nodes in CASES:
        procs = []
        try:
            ports = []
            for k in range(n_nodes):
                proc, port = start_node(tmp, f"x{k + 1}", engine, dsn, redis_url, prefix, python, repo)
                procs.append(proc)
                ports.append(port)
            result = run_case(case, ports, pairs, msgs, uuid.uuid4().hex[:6], [p.pid for p in procs], redis_url)
            result["load"] = open("/proc/loadavg").read().split()[0]
            say(orjson.dumps(result).decode())
            out.append(result)
        finally:
            for p in procs:
                p.send_signal(signal.SIGTERM)
            for p in procs:
                try:
                    p.wait(60)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait()
    shutil.rmtree(tmp, ignore_errors=True)
    return out


def part_xnode(ctx, pairs=None, msgs=None):
    """The bench part: every case of CASES, rows per case (subject "imd tcp, <case>")."""
    from bench.c1m import PrivateRedis
    from bench.parts import Result, say
    pairs = pairs or (6 if ctx.quick else 30)
    msgs = msgs or (100 if ctx.quick else 500)
    metric = "1:1 chat throughput across nodes (PostgreSQL store)"
    if not ctx.imd_available():
        return [Result("xnode", metric, "imd tcp", None, "msg/s", "higher", note="imd not in this tree")]
    db = TempDatabase()
    tmp = tempfile.mkdtemp(prefix="imd-xnode-redis-")
    srv = PrivateRedis(tmp)
    try:
        rows = run_all(db.dsn, srv.url, pairs, msgs, ctx.imd_python, ctx.repo, say=lambda m: say("xnode: " + m))
    except (RuntimeError, OSError) as e:
        return [Result("xnode", metric, "imd tcp", None, "msg/s", "higher", note=str(e)[:120])]
    finally:
        srv.stop()
        db.drop()
        shutil.rmtree(tmp, ignore_errors=True)
    out = []
    for r in rows:
        subject = f"imd tcp, {r['case']}"
        note = f"{r['pairs']} pairs x {r['msgs'] // r['pairs']} msgs, load {r['load']}"
        out += [Result("xnode", metric, subject, r["msgs_per_s"], "msg/s", "higher", note=note),
                Result("xnode", "node CPU per chat message (every imd process)", subject,
                       r["node_cpu_us_per_msg"], "us", "lower"),
                Result("xnode", "Redis CPU per chat message", subject, r["redis_cpu_us_per_msg"], "us", "lower")]
    return out


class TempDatabase:
    """A PostgreSQL database on 127.0.0.1:5432 (user postgres) for one run, dropped after."""

    SERVER = "host=127.0.0.1 port=5432 user=postgres"

    def __init__(self):
        import psycopg
        self.name = "imd_xnode_" + uuid.uuid4().hex[:10]
        with psycopg.connect(self.SERVER + " dbname=postgres", autocommit=True) as con:
            con.execute(f'CREATE DATABASE "{self.name}"')
        self.dsn = f"postgresql://postgres@127.0.0.1:5432/{self.name}"

    def drop(self):
        import psycopg
        with psycopg.connect(self.SERVER + " dbname=postgres", autocommit=True) as con:
            con.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dsn", help="PostgreSQL DSN (default: a database made for the run)")
    ap.add_argument("--redis", help="Redis URL (default: a private redis-server on a free port)")
    ap.add_argument("--pairs", type=int, default=30)
    ap.add_argument("--msgs", type=int, default=500)
    a = ap.parse_args()
    from bench.c1m import PrivateRedis
    db = None if a.dsn else TempDatabase()
    tmp = tempfile.mkdtemp(prefix="imd-xnode-redis-")
    srv = None if a.redis else PrivateRedis(tmp)
    try:
        run_all(a.dsn or db.dsn, a.redis or srv.url, a.pairs, a.msgs)
    finally:
        if srv:
            srv.stop()
        if db:
            db.drop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
