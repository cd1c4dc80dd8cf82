"""Where imd's memory per idle connection goes: runs imd's Daemon in this process under
tracemalloc, opens N authenticated connections (raw TCP, WebSocket, SSE or XMPP) from
load-generator processes, and prints the allocation sites that grew, per connection, next to the
RSS growth per connection.

    python bench/memprofile.py [--kind tcp|ws|sse|xmpp] [--conns 5000] [--top 25] [--engine redis]

With ``--engine redis`` imd uses the Redis at ``--redis-url`` (default 127.0.0.1:6379 db 14) under a
key prefix of its own, deleted afterwards.

What it prints is Python-level allocation (tracemalloc); RSS also holds what tracemalloc cannot
see (libev watchers, the allocator's slack), so the two totals differ.
"""
import argparse
import os
import sys
import tempfile
import tracemalloc

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from bench import loadgen as lg  # noqa: E402
from bench import peers  # noqa: E402
from bench.parts import SECRET  # noqa: E402


def settle(daemon, tracemalloc, limit=120.0):
    """Wait until the logins' work is done: the traced total stops moving for two seconds."""
    import gevent
    last, still, waited = -1, 0, 0.0
    while still < 2 and waited < limit:
        gevent.sleep(1)
        waited += 1
        now = tracemalloc.get_traced_memory()[0]
        still = still + 1 if abs(now - last) < 64 * 1024 else 0
        last = now


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kind", choices=("tcp", "ws", "sse", "xmpp"), default="tcp")
    ap.add_argument("--conns", type=int, default=5000)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--engine", choices=("memory", "redis"), default="memory")
    ap.add_argument("--redis-url", default="redis://127.0.0.1:6379/14")
    args = ap.parse_args(argv)

    port = peers.free_port()
    # the load generator forks before gevent is imported and the daemon starts
    listener = {"tcp": "tcp", "ws": "comet", "sse": "comet", "xmpp": "xmpp"}[args.kind]
    path = {"ws": "/ws?token={token}&platform=web&device=d{i}",
            "sse": "/im/events?token={token}&platform=web&device=d{i}"}.get(args.kind)
    fleet = lg.Fleet({"kind": args.kind, "port": port, "secret": SECRET, "host": "127.0.0.1",
                      "path": path, "domain": "localhost", "roster": True,
                      "window": 64 if args.kind == "xmpp" else 256,
                      "await_auth": args.kind in ("ws", "sse")},
                     processes=1, deadline=600).start()
    from gevent import monkey
    monkey.patch_all()
    import gevent
    from imd.config import load_dict
    from imd.daemon import Daemon

    tmp = tempfile.mkdtemp(prefix="imdbench-mem-")
    prefix = f"imdbench-mem-{os.getpid()}:"
    engine = {"backend": args.engine, "url": args.redis_url, "prefix": prefix}
    cfg = load_dict({"node": {"data_dir": tmp}, "auth": {"secret": SECRET}, "engine": engine,
                     "listen": {**{name: "" for name in ("tcp", "comet", "xmpp", "admin", "control")},
                                listener: f"127.0.0.1:{port}"},
                     "xmpp": {"tls": "disabled"}, "limits": {"msg_rate": 0}})
    tracemalloc.start(8)
    daemon = Daemon(cfg)
    daemon.start()
    pool = gevent.get_hub().threadpool

    def connect(n):
        return pool.apply(fleet.connect, (n, 120))

    connect(200)                           # warm-up: lazy imports, pools, caches
    gevent.sleep(1)
    rss0 = peers.rss_bytes([os.getpid()])
    snap0 = tracemalloc.take_snapshot()
    ok, failed, secs = connect(args.conns)
    settle(daemon, tracemalloc)
    snap1 = tracemalloc.take_snapshot()
    rss1 = peers.rss_bytes([os.getpid()])
    n = ok
    stats = snap1.compare_to(snap0, "lineno")
    traced = sum(s.size_diff for s in stats)
    print(f"{n} connections ({failed} failed); RSS +{(rss1 - rss0) / n:,.0f} B/conn, "
          f"traced Python allocations +{traced / n:,.0f} B/conn (tracemalloc itself adds to RSS)")
    print(f"\n{'B/conn':>8} {'objs/conn':>9}  allocation site")
    for s in stats[:args.top]:
        if s.size_diff <= 0:
            continue
        frame = s.traceback[0]
        where = f"{os.path.relpath(frame.filename, REPO) if frame.filename.startswith(REPO) else frame.filename}:{frame.lineno}"
        print(f"{s.size_diff / n:8.1f} {s.count_diff / n:9.2f}  {where}")
    pool.apply(fleet.stop)
    daemon.stop(reconnect=False, timeout=5)
    if args.engine == "redis":
        import redis
        r = redis.Redis.from_url(args.redis_url)
        keys = list(r.scan_iter(match=prefix + "*", count=1000))
        if keys:
            r.delete(*keys)
        r.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
