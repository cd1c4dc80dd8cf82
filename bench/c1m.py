"""The C1000K run (issue 6): as many idle authenticated raw-TCP connections as the machine holds,
heartbeats flowing, spread over imd processes and load-generator processes (each < 20,000 fds).

    flock /tmp/imd-bench.lock python bench/run.py c1m --c1m-conns 1000000 --c1m-mode workers \\
        --c1m-engine redis --heartbeat 120 --keep-other-parts

imd runs either as one master with `node.workers = N` sharing one port (SO_REUSEPORT; engine redis),
or as `nodes` independent processes (one port each). With the redis engine the bench starts a
private redis-server on a free port (never the shared one). Connections are opened in steps of
STEP_PER_LOADGEN per load-generator process from ~1,000 source addresses 127.0.{1..4}.x (so no
source address needs more than a few thousand ephemeral ports); between steps the bench prints the
count, the rates and the memory, and stops opening more when the machine would drop under
MEM_FLOOR (+ the next step's predicted cost) or the connect phase has used its time.

Safety: a watchdog thread aborts everything (SIGKILL to imd, the load generators and the private
Redis) if MemAvailable drops under MEM_FLOOR at any moment; a detached guard process kills imd's and
Redis's process groups after `budget` seconds even if this process dies; the load generators exit
by themselves at the same deadline.

Reports the count reached, server RSS (every imd process) and kernel slab per connection, Redis's
memory per connection, CPU while idle (imd, load generators, Redis separately), and the time for one
broadcast reminder (`POST /api/v1/notices {"all": true}`) to reach every connection.
"""
import http.client
import math
import os
import signal
import subprocess
import threading
import time

import orjson

from bench import loadgen as lg
from bench import peers
from bench.parts import SECRET, Result, _spec_for, say
from bench.peers import PrivateRedis

PER_WORKER = 17500          # imd sessions per worker: the 20,000-fd limit minus headroom for the
                            # uneven spread of SO_REUSEPORT's hash
PER_LOADGEN = 18000         # connections per load-generator process
STEP_PER_LOADGEN = 1000     # connections each load-generator process opens per step
WINDOW = 48                 # handshakes in flight per load-generator process
MEM_FLOOR = 3 << 30         # never let MemAvailable go under this (other work shares the machine)
SOURCES = [f"127.0.{a}.{b}" for a in range(1, 5) for b in range(2, 254)]


def mem_available():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


class Guard:
    """A detached `sh` that SIGKILLs the given process groups after `seconds`, even if the bench
    itself dies; cancelled when the bench stops them itself."""

    def __init__(self, pgids, seconds):
        groups = " ".join(f"-{g}" for g in pgids)
        self.proc = subprocess.Popen(["sh", "-c", f"sleep {int(seconds)}; kill -KILL -- {groups} 2>/dev/null"],
                                     start_new_session=True, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def cancel(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


class Watchdog(threading.Thread):
    """Checks MemAvailable twice a second; under MEM_FLOOR it calls `abort` once."""

    def __init__(self, abort):
        super().__init__(daemon=True)
        self.abort = abort
        self.tripped = ""
        self.low = mem_available()
        self.done = threading.Event()

    def run(self):
        while not self.done.wait(0.5):
            avail = mem_available()
            self.low = min(self.low, avail)
            if avail < MEM_FLOOR and not self.tripped:
                self.tripped = f"MemAvailable {avail / 2**30:.2f} GiB < {MEM_FLOOR / 2**30:.0f} GiB"
                say(f"c1m: ABORT: {self.tripped}")
                self.abort()


def _broadcast(admin_port, fleet, expected, timeout):
    """POST one reminder to every user; (seconds until the admin API answered, seconds until every
    connection has it, or None)."""
    h = http.client.HTTPConnection("127.0.0.1", admin_port, timeout=timeout)
    body = orjson.dumps({"all": True, "kind": "bench.broadcast", "body": "reminder " + lg.MARK.decode()})
    base = fleet.count()[0]
    t0 = time.monotonic()
    h.request("POST", "/api/v1/notices", body=body, headers={"Content-Type": "application/json"})
    resp = h.getresponse()
    answer = resp.read()
    answered = time.monotonic() - t0
    if resp.status >= 300:
        raise peers.PeerError(f"/api/v1/notices answered {resp.status}: {answer[:200]!r}")
    say(f"c1m: admin API answered after {answered:.1f}s (count {orjson.loads(answer).get('count')})")
    last = -1
    while time.monotonic() - t0 < timeout:
        got = fleet.count()[0] - base
        if got >= expected:
            return answered, time.monotonic() - t0
        if got // 100_000 != last // 100_000:
            say(f"c1m: broadcast reached {got:,}/{expected:,} after {time.monotonic() - t0:.1f}s")
        last = got
        time.sleep(0.2)
    say(f"c1m: broadcast reached only {fleet.count()[0] - base:,}/{expected:,} in {timeout}s")
    return answered, None


def part_c1m(ctx, conns=None, mode="workers", engine="redis", heartbeat=120.0, idle_seconds=60,
             budget=1500):
    conns = conns or (40_000 if ctx.quick else 1_000_000)
    metric = "server RSS per idle connection at scale"
    if not ctx.imd_available():
        return [Result("c1m", metric, "imd tcp", None, "B", "lower", note="imd not in this tree")]
    if mode == "workers" and engine != "redis":
        raise ValueError("workers mode needs the redis engine")
    t_start = time.monotonic()
    n_imd = math.ceil(conns / PER_WORKER)
    n_lg = math.ceil(conns / PER_LOADGEN)
    # Clients ping every `heartbeat` s; the server pings only a connection silent for longer, and
    # closes one silent for 3x that.
    limits = {"heartbeat": heartbeat * 1.25, "idle_timeout": heartbeat * 3.5} if heartbeat else {}
    say(f"c1m: {conns:,} connections over {n_imd} imd {mode}, engine {engine}, {n_lg} load-generator "
        f"processes, client heartbeat every {heartbeat:g}s; MemAvailable "
        f"{mem_available() / 2**30:.1f} GiB; load {open('/proc/loadavg').read().split()[:3]}")
    import tempfile
    tmp = tempfile.mkdtemp(prefix="imd-c1m-")
    redis_srv = PrivateRedis(tmp) if engine == "redis" else None
    url = redis_srv.url if redis_srv else None
    if mode == "workers":
        servers = [peers.Imd(ctx.repo, python=ctx.imd_python, secret=SECRET, engine=engine,
                             workers=n_imd, engine_url=url, limits=limits)]
    else:
        servers = [peers.Imd(ctx.repo, python=ctx.imd_python, secret=SECRET, engine=engine,
                             engine_url=url, limits=limits) for _ in range(n_imd)]
    fleets = []
    guard = None
    aborted = threading.Event()

    def abort():
        aborted.set()
        for f in fleets:
            for p, _pipe in f.workers:
                if p.pid:
                    try:
                        os.kill(p.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
        for s in servers:
            if s.proc is not None:
                try:
                    os.killpg(s.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if redis_srv:
            redis_srv.stop()

    dog = Watchdog(abort)
    dog.start()
    try:
        for s in servers:
            s.start()
        guard = Guard([s.proc.pid for s in servers] + ([redis_srv.proc.pid] if redis_srv else []),
                      budget + 60)
        deadline = t_start + budget
        time.sleep(2)
        pids = peers_pids(servers)
        rss0, slab0, avail0 = peers.rss_bytes(pids), peers.slab_bytes(), mem_available()
        r0 = redis_srv.info() if redis_srv else (0, 0, 0)
        # load generators: spread over the servers (one fleet per server in `nodes` mode)
        per_server = [n_lg // len(servers) + (1 if i < n_lg % len(servers) else 0) for i in range(len(servers))]
        for i, (server, k) in enumerate(zip(servers, per_server)):
            if not k:
                continue
            spec = _spec_for("tcp", server, base=i * 100_000_000, window=WINDOW,
                             sources=SOURCES[i::len(servers)] or SOURCES)
            fleet = lg.Fleet(spec, processes=k, deadline=budget + 30).start()
            fleets.append(fleet)
            if heartbeat:
                fleet.heartbeat(heartbeat)
        lg_pids = [p.pid for f in fleets for p, _ in f.workers]
        lg_rss0 = peers.rss_bytes(lg_pids)
        series = [(0, 0.0)]
        done, failed_total, stop_reason = 0, 0, "target reached"
        t0 = time.monotonic()
        connect_deadline = deadline - idle_seconds - 420    # leave time to idle, broadcast, stop
        while done < conns:
            step_total = min(conns - done, sum(len(f.workers) for f in fleets) * STEP_PER_LOADGEN)
            avail = mem_available()
            per_conn = (avail0 - avail) / done if done else 20_000
            if avail - step_total * per_conn < MEM_FLOOR + (512 << 20):
                stop_reason = (f"memory: MemAvailable {avail / 2**30:.2f} GiB, next step needs "
                               f"~{step_total * per_conn / 2**30:.2f} GiB")
                break
            if time.monotonic() > connect_deadline:
                stop_reason = "time budget of the connect phase used"
                break
            ts = time.monotonic()
            ok = failed = 0
            for f in fleets:
                share = step_total * len(f.workers) // sum(len(g.workers) for g in fleets)
                o, fl, _ = f.connect(share, timeout=240)
                ok, failed = ok + o, failed + fl
            done += ok
            failed_total += failed
            dt = time.monotonic() - ts
            rss = peers.rss_bytes(peers_pids(servers))
            series.append((done, (rss - rss0) / 1e6))
            say(f"c1m: {done:,}/{conns:,} connected ({ok / max(dt, 1e-9):,.0f}/s), imd RSS "
                f"+{(rss - rss0) / 2**30:.2f} GiB, slab +{(peers.slab_bytes() - slab0) / 2**30:.2f} GiB, "
                f"MemAvailable {mem_available() / 2**30:.1f} GiB, load {open('/proc/loadavg').read().split()[0]}")
            if failed:
                errs = [e for f in fleets for e in f.errors()][:3]
                say(f"c1m: {failed} failed in this step: {errs}")
                if failed > max(100, ok // 10):
                    stop_reason = f"{failed_total} connections failed: {errs[:1]}"
                    break
        connect_s = time.monotonic() - t0
        say(f"c1m: connect phase over ({stop_reason}): {done:,} in {connect_s:.0f}s")
        time.sleep(5)
        pids = peers_pids(servers)
        rss1, slab1, avail1 = peers.rss_bytes(pids), peers.slab_bytes(), mem_available()
        lg_rss1 = peers.rss_bytes(lg_pids)
        r1 = redis_srv.info() if redis_srv else (0, 0, 0)
        cpu0, lg_cpu0 = peers.cpu_seconds(pids), peers.cpu_seconds(lg_pids)
        rcpu0 = redis_srv.info()[2] if redis_srv else 0
        say(f"c1m: holding {done:,} connections for {idle_seconds}s")
        time.sleep(idle_seconds)
        idle_cpu = (peers.cpu_seconds(pids) - cpu0) / idle_seconds
        lg_idle_cpu = (peers.cpu_seconds(lg_pids) - lg_cpu0) / idle_seconds
        redis_idle_cpu = ((redis_srv.info()[2] - rcpu0) / idle_seconds) if redis_srv else None
        alive = sum(f.count()[1] for f in fleets)
        load = " ".join(open("/proc/loadavg").read().split()[:3])
        n = max(done, 1)
        where = f"{len(servers)} imd {mode}" if mode == "nodes" else f"1 imd master + {n_imd} workers"
        results = [
            Result("c1m", "idle authenticated connections held", "imd tcp", alive, "conns", "higher",
                   note=f"{done:,} of {conns:,} connected in {connect_s:.0f}s ({stop_reason}); {alive:,} "
                        f"alive after {idle_seconds}s idle; {where}, engine {engine}, {n_lg} load-generator "
                        f"processes; client ping every {heartbeat:g}s; load {load}"),
            Result("c1m", metric, "imd tcp", (rss1 - rss0) / n, "B", "lower",
                   note=f"RSS of every imd process: {rss0 / 2**30:.2f} GiB idle, {rss1 / 2**30:.2f} GiB "
                        f"with {done:,} connections", series=series),
            Result("c1m", "server RSS per idle connection, marginal (after the first step)", "imd tcp",
                   ((rss1 - rss0) - series[1][1] * 1e6) / max(done - series[1][0], 1) if len(series) > 2 else None,
                   "B", "lower", note="without the workers' own growth in their first connections "
                                      "(imports, buffers, caches)"),
            Result("c1m", "kernel slab per connection at scale (both ends)", "imd tcp",
                   (slab1 - slab0) / n, "B", "lower"),
            Result("c1m", "machine memory per connection (MemAvailable drop, everything)", "imd tcp",
                   (avail0 - avail1) / n, "B", "lower",
                   note=f"includes load generators ({(lg_rss1 - lg_rss0) / n:.0f} B/conn RSS) and Redis"),
            Result("c1m", "server CPU while idle (cores)", "imd tcp", idle_cpu, "cores", "lower",
                   note=f"every imd process; client heartbeat every {heartbeat:g}s" if heartbeat
                   else "no client heartbeat"),
            Result("c1m", "load-generator CPU while idle (cores)", "imd tcp", lg_idle_cpu, "cores", "lower"),
        ]
        if redis_srv:
            results += [
                Result("c1m", "Redis memory per connection (used_memory)", "imd tcp", (r1[0] - r0[0]) / n,
                       "B", "lower", note=f"RSS {r1[1] / 2**20:.0f} MiB; one subscription and one "
                                          "presence record per user"),
                Result("c1m", "Redis CPU while idle (cores)", "imd tcp", redis_idle_cpu, "cores", "lower"),
            ]
        admin = [s.ports.get("admin") for s in servers]
        left = deadline - time.monotonic() - 60
        if all(admin) and (len(servers) == 1 or engine == "redis") and left > 60:
            try:
                answered, secs = _broadcast(admin[0], _Fleets(fleets), alive, timeout=min(600, left))
                note = (f"POST /api/v1/notices {{\"all\":true}} to {alive:,} users; the admin API answered "
                        f"after {answered:.1f}s (stored, publications queued)")
            except (peers.PeerError, OSError, http.client.HTTPException) as e:
                secs, note = None, f"broadcast failed: {e}"[:160]
                say(f"c1m: {note}; imd log: " + " | ".join(
                    line for s in servers for line in s.log_tail(200_000).splitlines()
                    if " error " in line or " warning " in line)[-2000:])
            results.append(Result("c1m", "one broadcast reminder reaches every connection", "imd tcp",
                                  secs * 1000 if secs else None, "ms", "lower", note=note))
        else:
            results.append(Result("c1m", "one broadcast reminder reaches every connection", "imd tcp",
                                  None, "ms", "lower",
                                  note="needs an admin listener, one cluster and time left"))
        for r in results:
            say(f"c1m: {r.metric}: {r.value if r.value is None else round(r.value, 3)} {r.unit}  {r.note}")
        return results
    except (peers.PeerError, EOFError, BrokenPipeError, OSError) as e:
        note = f"aborted: {dog.tripped}" if aborted.is_set() else str(e)[:120]
        say(f"c1m: {note}")
        return [Result("c1m", metric, "imd tcp", None, "B", "lower", note=note)]
    finally:
        dog.done.set()
        # imd first, and without a drain: closing the clients first makes every worker process
        # its sessions' ends (presence, unsubscribes, store writes) for minutes.
        say("c1m: stopping imd (SIGKILL: nothing left to measure), then the load generators")
        for s in servers:
            if s.proc is not None:
                try:
                    os.killpg(s.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                s.stop(grace=10)
        for f in fleets:
            try:
                f.stop()
            except (OSError, EOFError):
                pass
        if redis_srv:
            redis_srv.stop()
        if guard:
            guard.cancel()
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
        say(f"c1m: stopped; lowest MemAvailable seen {dog.low / 2**30:.1f} GiB")


def peers_pids(servers):
    """Every imd process: the master and its workers, or the nodes."""
    out = []
    for s in servers:
        if s.proc is None:
            continue
        out.append(s.proc.pid)
        out += peers.child_pids(s.proc.pid)
    return out


class _Fleets:
    """Several fleets counted as one."""

    def __init__(self, fleets):
        self.fleets = fleets

    def count(self):
        counts = [f.count() for f in self.fleets]
        return tuple(sum(c[i] for c in counts) for i in range(3))
