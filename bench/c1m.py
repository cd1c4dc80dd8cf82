"""The C1000K run (issue 6): as many idle authenticated raw-TCP connections as the machine holds,
heartbeats flowing, spread over imd processes and load-generator processes (each ≤ 19,000 fds).

imd runs either as `nodes` independent processes (one port each; engine memory, or redis so that
they form a cluster), or — once imd has it — as one process with `node.workers = N` sharing a port.
Reports the count reached, server RSS and kernel slab per connection, server CPU while idle, and,
when imd has an admin listener, the time for one broadcast reminder to reach every connection.
Not part of the default suite: `python bench/run.py c1m --c1m-conns 1000000`.
"""
import http.client
import math
import time

import orjson

from bench import loadgen as lg
from bench import peers
from bench.parts import SECRET, Result, _spec_for, say

PER_NODE = 18000


def _broadcast(admin_port, fleet, expected, timeout=120):
    """POST one notice to every user; seconds until every connection has it (None if not)."""
    h = http.client.HTTPConnection("127.0.0.1", admin_port, timeout=timeout)
    body = orjson.dumps({"all": True, "kind": "bench.broadcast", "body": "reminder " + lg.MARK.decode()})
    base = fleet.count()[0]
    t0 = time.monotonic()
    h.request("POST", "/api/v1/notices", body=body, headers={"Content-Type": "application/json"})
    resp = h.getresponse()
    resp.read()
    if resp.status >= 300:
        raise peers.PeerError(f"/api/v1/notices answered {resp.status}")
    while time.monotonic() - t0 < timeout:
        if fleet.count()[0] - base >= expected:
            return time.monotonic() - t0
        time.sleep(0.05)
    return None


def part_c1m(ctx, conns=None, mode="nodes", engine="memory", heartbeat=30.0, idle_seconds=30):
    conns = conns or (40_000 if ctx.quick else 1_000_000)
    n_nodes = math.ceil(conns / PER_NODE)
    metric = "server RSS per idle connection at scale"
    if not ctx.imd_available():
        return [Result("c1m", metric, "imd tcp", None, "B", "lower", note="imd not in this tree")]
    say(f"c1m: {conns:,} connections over {n_nodes} imd {mode}, engine {engine}, "
        f"client heartbeat every {heartbeat:g}s")
    if mode == "workers":
        servers = [peers.Imd(ctx.repo, python=ctx.imd_python, secret=SECRET, engine=engine,
                             workers=n_nodes)]
    else:
        servers = [peers.Imd(ctx.repo, python=ctx.imd_python, secret=SECRET, engine=engine)
                   for _ in range(n_nodes)]
    fleets = []
    try:
        for s in servers:
            s.start()
        pids = [p for s in servers for p in s.pids()]
        time.sleep(1)
        rss0, slab0 = peers.rss_bytes(pids), peers.slab_bytes()
        per_server = [conns // len(servers) + (1 if i < conns % len(servers) else 0)
                      for i in range(len(servers))]
        series = [(0, 0.0)]
        done = 0
        t0 = time.monotonic()
        for i, (server, n) in enumerate(zip(servers, per_server)):
            spec = _spec_for("tcp", server, base=i * 100_000_000)
            fleet = lg.Fleet(spec, processes=math.ceil(n / PER_NODE), deadline=3600).start()
            fleets.append(fleet)
            if heartbeat:
                fleet.heartbeat(heartbeat)
            ok, failed, secs = fleet.connect(n, timeout=600)
            done += ok
            rss = peers.rss_bytes(peers_pids(servers))
            series.append((done, (rss - rss0) / 1e6))
            say(f"c1m: {done:,}/{conns:,} connected ({ok / max(secs, 1e-9):,.0f}/s), "
                f"server RSS +{(rss - rss0) / 1e9:.2f} GB, slab +{(peers.slab_bytes() - slab0) / 1e9:.2f} GB")
            if failed:
                say(f"c1m: {failed} failed: {fleet.errors()[:2]}; stopping here")
                break
        connect_s = time.monotonic() - t0
        time.sleep(3)
        pids = peers_pids(servers)
        rss1, slab1 = peers.rss_bytes(pids), peers.slab_bytes()
        cpu0 = peers.cpu_seconds(pids)
        say(f"c1m: holding {done:,} connections for {idle_seconds}s")
        time.sleep(idle_seconds)
        idle_cpu = (peers.cpu_seconds(pids) - cpu0) / idle_seconds
        alive = sum(f.count()[1] for f in fleets)
        results = [
            Result("c1m", metric, "imd tcp", (rss1 - rss0) / max(done, 1), "B", "lower",
                   note=f"{done:,} of {conns:,} connected in {connect_s:.0f}s, {alive:,} alive "
                        f"after {idle_seconds}s, {len(servers)} imd {mode}", series=series),
            Result("c1m", "kernel slab per connection at scale (both ends)", "imd tcp",
                   (slab1 - slab0) / max(done, 1), "B", "lower"),
            Result("c1m", "server CPU while idle (cores)", "imd tcp", idle_cpu, "cores", "lower",
                   note=f"client heartbeat every {heartbeat:g}s" if heartbeat else "no client heartbeat"),
        ]
        admin = [s.ports.get("admin") for s in servers]
        if all(admin) and (len(servers) == 1 or engine == "redis"):
            secs = _broadcast(admin[0], _Fleets(fleets), alive)
            results.append(Result("c1m", "one broadcast reminder reaches every connection", "imd tcp",
                                  secs * 1000 if secs else None, "ms", "lower"))
        else:
            results.append(Result("c1m", "one broadcast reminder reaches every connection", "imd tcp",
                                  None, "ms", "lower",
                                  note="needs an admin listener and one cluster (engine redis)"))
        return results
    except peers.PeerError as e:
        return [Result("c1m", metric, "imd tcp", None, "B", "lower", note=str(e)[:80])]
    finally:
        for f in fleets:
            f.stop()
        for s in servers:
            s.stop()


def peers_pids(servers):
    return [p for s in servers for p in s.pids()]


class _Fleets:
    """Several fleets counted as one."""

    def __init__(self, fleets):
        self.fleets = fleets

    def count(self):
        counts = [f.count() for f in self.fleets]
        return tuple(sum(c[i] for c in counts) for i in range(3))
