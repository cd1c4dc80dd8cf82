"""The benchmark parts. Each part starts its own servers (imd and the peers), drives them with
bench.loadgen, stops them, and returns a list of Result rows (plus plot series).

Server figures come from /proc: RSS from /proc/<pid>/status VmRSS, CPU from /proc/<pid>/stat
utime+stime, kernel memory from the Slab line of /proc/meminfo (it counts both ends of each
loopback connection). Every part is bounded in connections and time.
"""
import http.client
import math
import socket
import sys
import tempfile
import threading
import time
import urllib.parse
from dataclasses import dataclass, field

from bench import loadgen as lg
from bench import peers

SECRET = "imd-bench-secret-0123456789abcdef"


@dataclass
class Result:
    part: str
    metric: str          # what is measured, e.g. "RSS per idle connection"
    subject: str         # "imd tcp", "nchan sse", "mosquitto", ...
    value: float | None  # None = not available (n/a)
    unit: str
    better: str          # "lower" | "higher"
    note: str = ""
    series: list = field(default_factory=list)   # [(x, y), ...] for plots

    @property
    def is_imd(self):
        return self.subject.startswith("imd")


def say(msg):
    print(f"  {time.strftime('%H:%M:%S')} {msg}", file=sys.stderr, flush=True)


class Context:
    """What every part needs: the imd source tree and interpreter, sizes, and imd availability."""

    def __init__(self, repo, imd_python, quick=False, profile_dir=None, label="imd",
                 imd_only=False):
        self.repo = repo
        self.label = label          # "imd", or e.g. "imd/debian-py" for a second interpreter
        self.imd_only = imd_only    # skip the peers (a second pass with another interpreter)
        self.imd_python = imd_python
        self.quick = quick
        self.profile_dir = profile_dir
        self.started = 0

    def name(self, subject):
        """The subject as shown: imd's subjects carry this context's label."""
        return self.label + subject[3:] if subject.startswith("imd") else subject

    def imd_available(self):
        import os
        return all(os.path.exists(os.path.join(self.repo, p))
                   for p in ("imd/daemon.py", "imd/proto/tcp.py", "imd/__main__.py"))

    def imd(self, **options):
        """A started imd (PeerError if it is not in the tree or does not start); options go to
        peers.Imd (engine, workers, synchronous)."""
        if not self.imd_available():
            raise peers.PeerError("imd daemon not in this tree yet")
        self.started += 1
        if self.profile_dir:
            import os
            os.makedirs(self.profile_dir, exist_ok=True)
            options["profile"] = os.path.join(self.profile_dir, f"imd-{self.started:02d}.prof")
            say(f"profiling imd into {options['profile']}")
        return peers.Imd(self.repo, python=self.imd_python, secret=SECRET, **options).start()


def processes_for(n):
    return max(1, math.ceil(n / lg.MAX_PER_PROCESS))


def _spec_for(kind, peer, **extra):
    """The load-generator spec for one subject."""
    # handshakes in flight per load-generator process: prosody resets connections when hundreds of
    # XMPP logins queue at once; 64 is also what a reconnect storm through a load balancer sees
    spec = {"kind": kind, "host": "127.0.0.1", "secret": SECRET, "window": 64 if kind == "xmpp" else 256}
    spec.update(extra)
    if isinstance(peer, peers.Imd):
        port = {"tcp": "tcp", "sse": "comet", "ws": "comet", "xmpp": "xmpp"}[kind]
        if port not in peer.ports:
            raise peers.PeerError(f"imd has no {port} listener")
        spec["port"] = peer.ports[port]
        if kind in ("sse", "ws") and "path" not in spec:
            spec["path"] = {"sse": "/im/events?token={token}&platform=web&device=d{i}",
                            "ws": "/ws?token={token}&platform=web&device=d{i}"}[kind]
            spec["await_auth"] = True       # a user session counts once authenticated, as on tcp
        spec.setdefault("domain", "localhost")
        spec.pop("password", None)          # imd takes the token as the XMPP PLAIN password
    else:
        spec["port"] = peer.port
    return spec


def _warm_up(spec, peer):
    """Open and close 200 connections so that lazy imports and pools exist before the baseline."""
    with lg.Fleet(dict(spec, base=10_000_000 if spec["kind"] != "xmpp" else 0), deadline=60) as f:
        f.connect(200, timeout=30)
    time.sleep(0.5)


# ---------------------------------------------------------------- idle

def idle_one(subject, start_peer, kind, n, steps=5, heartbeat=0, redis_srv=None, **spec_extra):
    """RSS and slab per idle connection for one subject at n connections (sampled at `steps`);
    with `redis_srv` (a PrivateRedis imd's engine uses) also Redis's memory per connection."""
    say(f"idle: {subject}: starting")
    try:
        peer = start_peer()
    except peers.PeerError as e:
        say(f"idle: {subject}: n/a ({str(e)[:120]})")
        return [Result("idle", "server RSS per idle connection", subject, None, "B", "lower",
                       note=str(e).splitlines()[0][:80])]
    try:
        try:
            spec = _spec_for(kind, peer, **spec_extra)
        except peers.PeerError as e:
            say(f"idle: {subject}: n/a ({e})")
            return [Result("idle", "server RSS per idle connection", subject, None, "B", "lower",
                           note=str(e)[:80])]
        _warm_up(spec, peer)
        pids = peer.pids()
        rss0, slab0 = peers.rss_bytes(pids), peers.slab_bytes()
        redis0 = redis_srv.info()[0] if redis_srv else 0
        series = [(0, 0.0)]
        with lg.Fleet(spec, processes=processes_for(n), deadline=900) as fleet:
            if heartbeat:
                fleet.heartbeat(heartbeat)
            done = 0
            connect_s = 0.0
            for k in range(steps):
                want = n * (k + 1) // steps - done
                ok, failed, secs = fleet.connect(want, timeout=300)
                done += ok
                connect_s += secs
                time.sleep(1.0)
                rss = peers.rss_bytes(pids)
                series.append((done, (rss - rss0) / 1e6))
                say(f"idle: {subject}: {done}/{n} connected, {failed} failed, server RSS +{(rss - rss0) / 1e6:.1f} MB")
                if failed:
                    say(f"idle: {subject}: errors {fleet.errors()[:2]}")
                    break
            time.sleep(2.0)
            rss1, slab1 = peers.rss_bytes(pids), peers.slab_bytes()
            redis1 = redis_srv.info()[0] if redis_srv else 0
            alive = fleet.count()[1]
        per_conn = (rss1 - rss0) / max(done, 1)
        slab = (slab1 - slab0) / max(done, 1)
        note = f"{done} conns" + ("" if done == n else f" of {n}") + (f", heartbeat {heartbeat}s" if heartbeat else "")
        if alive != done:
            note += f", {done - alive} dropped by the server"
        out = [Result("idle", "server RSS per idle connection", subject, per_conn, "B", "lower",
                      note=note, series=series),
               Result("idle", "kernel slab per connection (both ends)", subject, slab, "B", "lower",
                      note=f"connect {done / connect_s:,.0f}/s")]
        if redis_srv:
            out.append(Result("idle", "Redis used_memory per idle connection", subject,
                              (redis1 - redis0) / max(done, 1), "B", "lower"))
        return out
    finally:
        peer.stop()


IDLE_KINDS = ("tcp", "ws", "sse", "xmpp")


def part_idle(ctx, n=None, heartbeat=0, kinds=IDLE_KINDS, engine="memory", workers=1):
    """imd's kinds, then the peers (unless ctx.imd_only). With engine "redis" each imd start gets
    a private redis-server (its memory per connection is a row of its own) and `workers` workers;
    the subjects are then named e.g. "imd tcp redis" or "imd tcp redis x2"."""
    n = n or (2000 if ctx.quick else 15000)
    nx = n
    pairs = [f"u{i}" for i in range(nx)]
    accounts = {u: "pw" for u in pairs}
    rosters = {f"u{i}": [f"u{i ^ 1}"] for i in range(nx)}
    suffix = "" if engine == "memory" else f" {engine}" + (f" x{workers}" if workers > 1 else "")
    out = []
    for kind in kinds:
        subject = ctx.name(f"imd {kind}{suffix}")
        if engine == "memory":
            out += idle_one(subject, ctx.imd, kind, n, heartbeat=heartbeat, password="pw", roster=True)
            continue
        tmp = tempfile.mkdtemp(prefix="imd-idle-redis-")
        try:
            redis_srv = peers.PrivateRedis(tmp)
        except peers.PeerError as e:
            out.append(Result("idle", "server RSS per idle connection", subject, None, "B", "lower",
                              note=str(e)[:80]))
            continue
        try:
            out += idle_one(subject, lambda: ctx.imd(engine=engine, workers=workers, engine_url=redis_srv.url),
                            kind, n, heartbeat=heartbeat, redis_srv=redis_srv, password="pw", roster=True)
        finally:
            redis_srv.stop()
    if ctx.imd_only:
        return out
    out += idle_one("mosquitto", peers.Mosquitto().start, "mqtt", n, heartbeat=heartbeat)
    out += idle_one("nchan sse", peers.Nchan().start, "sse", n, heartbeat=heartbeat,
                    path="/sub?id=idle")
    out += idle_one("nchan ws", peers.Nchan().start, "ws", n, heartbeat=heartbeat,
                    path="/sub?id=idle")
    out += idle_one("prosody xmpp", peers.Prosody(accounts, rosters).start, "xmpp", nx,
                    heartbeat=heartbeat, password="pw", domain="localhost", roster=True)
    return out


# ---------------------------------------------------------------- fanout

def _admin_port(peer):
    if "admin" not in peer.ports:
        raise peers.PeerError("imd has no admin listener")
    return peer.ports["admin"]


class Publisher:
    """Publishes to one channel. `publish` sends one message and waits for the server's answer
    (HTTP response or MQTT PUBACK), so every server sees the same pacing; `burst` writes n messages
    at once (pipelined HTTP requests, QoS 0 PUBLISH) and waits for the n HTTP answers."""

    def __init__(self, kind, port, channel):
        self.kind = kind
        self.channel = channel
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.settimeout(60)
        self.packet_id = 0
        self.host = f"127.0.0.1:{port}"
        if kind == "mqtt":
            self.sock.sendall(lg.mqtt_connect("bench-publisher"))
            if self._read(4) != lg.MQTT_CONNACK_OK:
                raise peers.PeerError("publisher CONNACK refused")
        else:
            self.http = http.client.HTTPConnection("127.0.0.1", port, timeout=60)

    def _read(self, n):
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise peers.PeerError("publisher connection closed")
            data += chunk
        return data

    def _request(self, payload):
        """(method, path, body, headers) of one publication."""
        if self.kind == "nchan":
            return "POST", f"/pub?id={self.channel}", payload, {}
        if self.kind == "imd-comet":
            q = urllib.parse.urlencode({"cname": self.channel, "content": payload.decode()})
            return "GET", f"/pub?{q}", None, {}
        body = lg.orjson.dumps({"from": "publisher", "to": self.channel, "body": payload.decode()})
        return "POST", "/api/v1/messages", body, {"Content-Type": "application/json"}

    def publish(self, payload):
        if self.kind == "mqtt":
            self.packet_id = self.packet_id % 65535 + 1
            self.sock.sendall(lg.mqtt_publish(self.channel, payload, qos=1, packet_id=self.packet_id))
            self._read(4)
            return
        method, path, body, headers = self._request(payload)
        self.http.request(method, path, body=body, headers=headers)
        resp = self.http.getresponse()
        resp.read()
        if resp.status >= 300:
            raise peers.PeerError(f"publish answered {resp.status}")

    PIPELINE = 8      # requests per connection in a burst (imd answers 429 past some depth)

    def burst(self, payload, n):
        """n publications at once: QoS 0 PUBLISHes in one write, or HTTP requests pipelined
        PIPELINE deep over ceil(n / PIPELINE) connections written one right after the other."""
        if self.kind == "mqtt":
            self.sock.sendall(lg.mqtt_publish(self.channel, payload) * n)
            return
        method, path, body, headers = self._request(payload)
        head = [f"{method} {path} HTTP/1.1", f"Host: {self.host}"]
        head += [f"{k}: {v}" for k, v in headers.items()]
        if body is not None:
            head.append(f"Content-Length: {len(body)}")
        one = ("\r\n".join(head) + "\r\n\r\n").encode() + (body or b"")
        host, port = self.sock.getpeername()
        shares = [min(self.PIPELINE, n - i) for i in range(0, n, self.PIPELINE)]
        conns = [socket.create_connection((host, port)) for _ in shares]
        try:
            for c, k in zip(conns, shares):
                c.sendall(one * k)
            for c, k in zip(conns, shares):
                c.settimeout(60)
                answered, tail = 0, b""
                while answered < k:
                    chunk = c.recv(65536)
                    if not chunk:
                        raise peers.PeerError(f"publisher closed after {answered} answers")
                    if b" 200 " not in chunk and b" 201 " not in chunk and b" 202 " not in chunk:
                        raise peers.PeerError(f"publish answered {chunk[:60]!r}")
                    m, tail = lg.count_marks(tail, chunk, b"HTTP/1.1 ")
                    answered += m
        finally:
            for c in conns:
                c.close()

    def close(self):
        self.sock.close()
        if self.kind != "mqtt":
            self.http.close()


class PingProbe(threading.Thread):
    """Interactive traffic beside a fan-out: a raw-TCP session of another user that sends `ping`
    every INTERVAL seconds and records each round trip to its `pong` (ms). imd only."""

    INTERVAL = 0.01

    def __init__(self, port):
        super().__init__(daemon=True)
        from imd.auth import issue
        from imd.client import Client
        self.client = Client("127.0.0.1", port, timeout=60)
        self.client.auth(issue(SECRET, "probe", "host", 3600), platform="android", device="probe")
        self.rtts = []
        self.done = threading.Event()

    def run(self):
        try:
            while not self.done.wait(self.INTERVAL):
                t0 = time.perf_counter()
                self.client.ping()
                self.rtts.append((time.perf_counter() - t0) * 1000)
        except Exception as e:          # reported as a missing figure, never fatal to the part
            say(f"ping probe stopped: {e}")

    def finish(self):
        """Stop; returns the note text with p50 and p99 of the round trips."""
        self.done.set()
        self.join(5)
        self.client.close()
        rtts = sorted(self.rtts)
        if not rtts:
            return "ping probe: no answer"
        return (f"ping p50 {lg.quantile(rtts, .5):.1f} ms p99 {lg.quantile(rtts, .99):.1f} ms "
                f"({len(rtts)} pings)")


def fanout_one(subject, start_peer, kind, pub_kind, subscribers, messages, sub_extra, channel,
               pub_port=None, burst=False):
    say(f"fanout: {subject}: {subscribers} subscribers")
    try:
        peer = start_peer()
    except peers.PeerError as e:
        return None, str(e).splitlines()[0][:80]
    try:
        spec = _spec_for(kind, peer, **sub_extra)
        with lg.Fleet(spec, processes=max(2, processes_for(subscribers)), deadline=600) as fleet:
            ok, failed, _ = fleet.connect(subscribers, timeout=120)
            if failed:
                return None, f"{failed} subscribers failed: {fleet.errors()[:1]}"
            time.sleep(0.5)
            port = pub_port(peer) if pub_port else peer.port
            pub = Publisher(pub_kind, port, channel)
            pids = peer.pids()
            payload = b'{"kind":"bench","body":"' + b"x" * 60 + b' ' + lg.MARK + b'"}'
            expected = ok * messages
            probe = PingProbe(peer.ports["tcp"]) if isinstance(peer, peers.Imd) else None
            if probe is not None:
                probe.start()
            cpu0, t0 = peers.cpu_seconds(pids), time.monotonic()
            if burst:
                pub.burst(payload, messages)
            else:
                for _ in range(messages):
                    pub.publish(payload)
            got = 0
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                got = fleet.count()[0]
                if got >= expected:
                    break
                time.sleep(0.01)
            cpu, wall = peers.cpu_seconds(pids) - cpu0, time.monotonic() - t0
            pub.close()
            probed = probe.finish() if probe is not None else ""
        note = f"{got:,}/{expected:,} delivered, {wall:.1f}s wall" + (f"; {probed}" if probed else "")
        say(f"fanout: {subject}: {note}, server CPU {cpu:.2f}s -> {got / max(cpu, 1e-9):,.0f}/CPU-s")
        if got < expected:
            return None, note
        return got / max(cpu, 0.01), note
    except peers.PeerError as e:
        return None, str(e)[:80]
    finally:
        peer.stop()


def fanout_subjects(ctx):
    imd = [
        (ctx.name("imd tcp"), ctx.imd, "tcp", "imd-user", {"user_fmt": "fan", "device_fmt": "d{}"},
         "fan", _admin_port),
        (ctx.name("imd sse"), ctx.imd, "sse", "imd-comet", {"path": "/sse?cname=bench"}, "bench",
         _admin_port)]
    if ctx.imd_only:
        return imd
    return imd + [
        ("nchan sse", lambda: peers.Nchan().start(), "sse", "nchan", {"path": "/sub?id=bench"},
         "bench", None),
        ("mosquitto", lambda: peers.Mosquitto().start(), "mqtt", "mqtt", {"topic": "bench"},
         "bench", None),
        ("mosquitto dup", lambda: peers.Mosquitto(duplicates=True).start(), "mqtt", "mqtt",
         {"topic": "bench"}, "bench", None),
    ]


def part_fanout(ctx, subscribers=None, messages=None):
    """One message at a time, at several subscriber counts (for the plot)."""
    subscribers = subscribers or (2000 if ctx.quick else 10000)
    messages = messages or (50 if ctx.quick else 200)
    sizes = sorted({max(500, subscribers // 5), subscribers // 2, subscribers})
    out = []
    for subject, start, kind, pub_kind, extra, channel, pub_port in fanout_subjects(ctx):
        series = []
        value, note = None, ""
        for n in sizes:
            v, note = fanout_one(subject, start, kind, pub_kind, n, messages, extra, channel, pub_port)
            if v is None:
                break
            series.append((n, v))
            value = v if n == subscribers else None
        out.append(Result("fanout", f"deliveries per server CPU-second ({subscribers:,} subs x "
                          f"{messages} msgs)", subject, value, "/CPU-s", "higher", note=note,
                          series=series))
    return out


def part_burst(ctx, subscribers=None, messages=None):
    """All messages written at once (pipelined publications): what write coalescing can do."""
    subscribers = subscribers or (2000 if ctx.quick else 10000)
    messages = messages or (50 if ctx.quick else 200)
    out = []
    for subject, start, kind, pub_kind, extra, channel, pub_port in fanout_subjects(ctx):
        v, note = fanout_one(subject, start, kind, pub_kind, subscribers, messages, extra, channel,
                             pub_port, burst=True)
        out.append(Result("burst", f"deliveries per server CPU-second, {messages} msgs in one burst "
                          f"({subscribers:,} subs)", subject, v, "/CPU-s", "higher", note=note))
    return out


# ---------------------------------------------------------------- logins

def logins_one(subject, start_peer, kind, seconds, **extra):
    say(f"logins: {subject}")
    try:
        peer = start_peer()
    except peers.PeerError as e:
        return [Result("logins", "logins per second (wall)", subject, None, "/s", "higher",
                       note=str(e).splitlines()[0][:80])]
    try:
        try:
            spec = _spec_for(kind, peer, user_pool=1000, **extra)
        except peers.PeerError as e:
            return [Result("logins", "logins per second (wall)", subject, None, "/s", "higher",
                           note=str(e)[:80])]
        pids = peer.pids()
        with lg.Fleet(spec, processes=2, deadline=120) as fleet:
            cpu0 = peers.cpu_seconds(pids)
            ok, failed, wall = fleet.logins(64, seconds)
            cpu = peers.cpu_seconds(pids) - cpu0
            errors = fleet.errors()[:1] if failed else []
        note = f"{ok:,} logins in {wall:.1f}s, {failed} failed" + (f" {errors}" if errors else "")
        say(f"logins: {subject}: {note}, server CPU {cpu:.2f}s")
        if not ok:
            return [Result("logins", "logins per second (wall)", subject, None, "/s", "higher",
                           note=note[:120])]
        return [Result("logins", "logins per second (wall)", subject, ok / wall, "/s", "higher",
                       note=note),
                Result("logins", "logins per server CPU-second", subject, ok / max(cpu, 0.01),
                       "/CPU-s", "higher")]
    finally:
        peer.stop()


def part_logins(ctx, seconds=None):
    seconds = seconds or (3 if ctx.quick else 8)
    accounts = {f"u{i}": "pw" for i in list(range(1000)) + list(range(lg.MAX_PER_PROCESS, lg.MAX_PER_PROCESS + 1000))}
    out = (logins_one(ctx.name("imd tcp"), ctx.imd, "tcp", seconds)
           + logins_one(ctx.name("imd xmpp"), ctx.imd, "xmpp", seconds, password="pw"))
    if ctx.imd_only:
        return out
    return out + (logins_one("prosody xmpp", peers.Prosody(accounts).start, "xmpp", seconds,
                         password="pw", domain="localhost")
            + logins_one("mosquitto", peers.Mosquitto().start, "mqtt", seconds))


# ---------------------------------------------------------------- chat and xmpp (1:1 traffic)

# chat: issue 9's sustained 10,000/s and issue 5's half of 30,000 (15,000/s) are steps of their own
RATES = [250, 500, 1000, 1500, 2000, 3000, 4000, 6000, 8000, 10000, 12000, 15000, 16000, 20000, 24000,
         32000, 48000]
# xmpp: steps of at most 25 % from 1,000/s up (12.5 % from 8,000/s to 12,000/s), so that both the
# held rate and the peer's saturation (the 5x target compares them) are known to within a step of
# that size: Prosody with its package's modules saturates near 2,000/s, imd near 10,000/s
XMPP_RATES = [250, 500, 750, 1000, 1250, 1500, 1750, 2000, 2500, 3000, 3500, 4000, 5000, 6000, 7000,
              8000, 9000, 10000, 11000, 12000, 14000, 16000, 20000, 24000, 28000, 32000, 40000, 48000]


def sweep(label, fleet, pids, rates, step_seconds, limit_ms, db_pids=()):
    """Offer each rate in turn (open loop) and find two rates:
    - held: the highest rate up to which every step had p99 within limit_ms (latency target);
    - saturation: the highest rate at which everything was answered with p50 within limit_ms
      (the server keeps up, whatever its tail).
    A step that misses is tried once more (one stall of a shared machine is not saturation); the
    sweep ends at the first rate that saturates twice. Server CPU is that of `pids` plus the
    database backends `db_pids` (those still alive).
    Returns (held, held_note, saturation, [(rate, p99 ms)])."""
    held, held_note, saturation, series = None, "", None, []
    p99_streak = True
    for rate in rates:
        for attempt in (1, 2):
            cpu0 = peers.cpu_seconds(pids) + _db_cpu(db_pids)
            sent, got, wall, lat = fleet.traffic(rate, 0, step_seconds)
            cpu = peers.cpu_seconds(pids) + _db_cpu(db_pids) - cpu0
            lat = sorted(lat)
            p50, p99 = lg.quantile(lat, .5) / 1000, lg.quantile(lat, .99) / 1000
            keeps_up = got >= sent and sent >= 0.9 * rate * step_seconds and p50 <= limit_ms
            in_limit = keeps_up and p99 <= limit_ms
            say(f"{label}: offered {rate:,}/s: {got:,}/{sent:,} answered, p50 {p50:.1f} ms "
                f"p99 {p99:.1f} ms, server CPU {cpu / wall:.0%} (CPU-s per 1k answered "
                f"{_per_1k(cpu, got)}), busiest load-generator process "
                f"{fleet.client_load:.0%}" + ("" if in_limit else
                                              f" -> {'p99 over' if keeps_up else 'saturated'} (try {attempt})"))
            time.sleep(0.5)
            if in_limit or (keeps_up and not p99_streak):
                break
        series.append((rate, p99))
        if p99_streak and in_limit:
            held = rate
            held_note = (f"p50 {p50:.1f} ms, p99 {p99:.1f} ms at {rate:,}/s, server CPU {cpu / wall:.0%}, "
                         f"CPU-s per 1k {_per_1k(cpu, got)}")
        else:
            p99_streak = False
        if not keeps_up:
            break
        saturation = rate
    return held, held_note, saturation, series


def part_chat(ctx, pairs=None, seconds=None, window=8):
    """imd raw TCP with the SQLite store as configured by default (synchronous = full), and again
    with synchronous = normal to show what the fsync per commit costs."""
    return (chat_one(ctx, ctx.name("imd tcp"), {"synchronous": "full"}, pairs, seconds, window)
            + chat_one(ctx, ctx.name("imd tcp sqlite-normal"), {"synchronous": "normal"}, pairs,
                       seconds, window))


PG_SERVER = "host=127.0.0.1 port=5432 user=postgres"
PG_DATABASE = "imd_bench_chat"
PG_XMPP_DATABASE = "imd_bench_xmpp"


def pg_store(database, writers=2):
    """A fresh, empty `database` on PG_SERVER and imd's [store] settings for it, or raises (no
    psycopg, no server); pg_drop(database) removes it."""
    import psycopg
    with psycopg.connect(PG_SERVER + " dbname=postgres", autocommit=True, connect_timeout=5) as con:
        con.execute(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")
        con.execute(f"CREATE DATABASE {database}")
    return {"backend": "postgresql", "dsn": f"{PG_SERVER} dbname={database}", "writers": writers}


def pg_drop(database):
    import psycopg
    with psycopg.connect(PG_SERVER + " dbname=postgres", autocommit=True) as con:
        con.execute(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")


def part_chat_pg(ctx, pairs=None, seconds=None, window=8, writers=2):
    """The chat part with store = PostgreSQL (127.0.0.1:5432, a fresh database imd_bench_chat,
    dropped after), `writers` writer connections; issue 5's latency limit is 50 ms."""
    try:
        store = pg_store(PG_DATABASE, writers)
    except Exception as e:          # no psycopg, no server: the part is n/a
        return [Result("chat-pg", "acked messages per second", ctx.name("imd tcp postgresql"), None,
                       "/s", "higher", note=f"postgresql unavailable: {str(e).splitlines()[0][:60]}")]
    try:
        return chat_one(ctx, ctx.name("imd tcp postgresql"), store, pairs, seconds, window,
                        part="chat-pg", limit_ms=50, pg_database=PG_DATABASE)
    finally:
        pg_drop(PG_DATABASE)


def pg_backend_pids(database):
    """The PostgreSQL server processes serving `database` (imd's writer and reader connections)."""
    import psycopg
    with psycopg.connect(PG_SERVER + " dbname=postgres", autocommit=True) as con:
        return [r[0] for r in con.execute("SELECT pid FROM pg_stat_activity WHERE datname = %s",
                                          (database,))]


def _db_cpu(pids):
    """CPU seconds of the database backends still alive (a backend that ended is skipped)."""
    total = 0.0
    for pid in pids:
        try:
            total += peers.cpu_seconds([pid])
        except FileNotFoundError:
            pass
    return total


def _per_1k(cpu, n):
    return f"{1000 * cpu / max(n, 1):.3f}"


def chat_one(ctx, subject, store, pairs=None, seconds=None, window=8, part="chat", limit_ms=20,
             pg_database=None):
    """imd raw TCP, pairs of users sending `msg` to each other: the closed-loop maximum (window
    unacked per connection), ack latency at half of it, and the highest open-loop rate whose ack
    p99 stays within `limit_ms`. Notes give server CPU-seconds per 1,000 acked messages (imd and,
    with `pg_database`, the PostgreSQL backends serving it) and the load generator's schedule slip."""
    pairs = pairs or (100 if ctx.quick else 500)
    seconds = seconds or (3 if ctx.quick else 10)
    say(f"{part}: {subject}: {pairs} pairs")
    try:
        peer = ctx.imd(store=store)
    except peers.PeerError as e:
        note = str(e).splitlines()[0][:80]
        return [Result(part, "acked messages per second", subject, None, "/s", "higher", note=note)]
    try:
        spec = _spec_for("tcp", peer, pairs=True)
        pids = peer.pids()
        with lg.Fleet(spec, processes=2, deadline=600) as fleet:
            ok, failed, _ = fleet.connect(2 * pairs, timeout=60)
            if failed:
                raise peers.PeerError(f"{failed} chat clients failed: {fleet.errors()[:1]}")
            # one message per pair first, so that the database connections exist when counted
            fleet.traffic(0, 1, 0.5)
            db_pids = pg_backend_pids(pg_database) if pg_database else []
            cpu0, db0 = peers.cpu_seconds(pids), _db_cpu(db_pids)
            sent, acked, wall, lat = fleet.traffic(0, window, seconds)
            cpu, db = peers.cpu_seconds(pids) - cpu0, _db_cpu(db_pids) - db0
            rate = acked / wall
            lat = sorted(lat)
            cost = f"imd {_per_1k(cpu, acked)}" + (f" + postgres {_per_1k(db, acked)}" if db_pids else "")
            load = open("/proc/loadavg").read().split()[0]
            say(f"{part}: {subject}: closed loop window {window}: {acked:,}/{sent:,} acked, {rate:,.0f}/s, "
                f"p50 {lg.quantile(lat, .5) / 1000:.1f} ms p99 {lg.quantile(lat, .99) / 1000:.1f} ms, "
                f"server CPU-s per 1k acked {cost}, busiest load-generator process "
                f"{fleet.client_load:.0%}, load average {load}")
            time.sleep(1)
            half = rate / 2
            cpu0, db0 = peers.cpu_seconds(pids), _db_cpu(db_pids)
            sent2, acked2, wall2, lat2 = fleet.traffic(half, 0, seconds)
            cpu2, db2 = peers.cpu_seconds(pids) - cpu0, _db_cpu(db_pids) - db0
            lat2 = sorted(lat2)
            p50, p99 = lg.quantile(lat2, .5) / 1000, lg.quantile(lat2, .99) / 1000
            slip = fleet.client_slip
            cost2 = f"imd {_per_1k(cpu2, acked2)}" + (f" + postgres {_per_1k(db2, acked2)}" if db_pids else "")
            say(f"{part}: {subject}: at {half:,.0f}/s: {acked2:,}/{sent2:,} acked, p50 {p50:.1f} ms "
                f"p99 {p99:.1f} ms, CPU-s per 1k {cost2}, busiest load-generator process "
                f"{fleet.client_load:.0%}, its schedule slip up to {1000 * slip:.0f} ms")
            time.sleep(1)
            best, note, _, series = sweep(f"{part}: {subject}", fleet, pids, RATES,
                                          3 if ctx.quick else 5, limit_ms, db_pids)
        return [Result(part, "acked messages per second (closed loop)", subject, rate, "/s",
                       "higher", note=f"{pairs} pairs, window {window}; server CPU-s per 1k acked: "
                       f"{cost}; load avg {load}"),
                Result(part, "ack latency p50 at half that rate", subject, p50, "ms", "lower",
                       note=f"{acked2:,}/{sent2:,} acked at {half:,.0f}/s; CPU-s per 1k: {cost2}"),
                Result(part, "ack latency p99 at half that rate", subject, p99, "ms", "lower",
                       note=f"load-generator schedule slip up to {1000 * slip:.0f} ms"),
                Result(part, f"sustained acked msgs/s with p99 <= {limit_ms} ms (open loop)", subject,
                       best, "/s", "higher", note=note, series=series)]
    except peers.PeerError as e:
        return [Result(part, "acked messages per second", subject, None, "/s", "higher",
                       note=str(e)[:80])]
    finally:
        peer.stop()


def xmpp_one(subject, start_peer, clients, step_seconds, pg_database=None):
    """Returns (held, note, saturation, series) of the sweep, or Nones and the reason. With
    `pg_database`, server CPU includes the PostgreSQL backends serving it."""
    say(f"xmpp: {subject}: {clients} clients")
    try:
        peer = start_peer()
    except peers.PeerError as e:
        return None, str(e).splitlines()[0][:80], None, []
    try:
        spec = _spec_for("xmpp", peer, pairs=True, password="pw", domain="localhost", roster=True)
        with lg.Fleet(spec, processes=2, deadline=900) as fleet:
            ok, failed, _ = fleet.connect(clients, timeout=180)
            if failed:
                return None, f"{failed} clients failed: {fleet.errors()[:1]}", None, []
            time.sleep(1)
            db_pids = ()
            if pg_database:     # a little traffic first, so that the store's connections exist
                fleet.traffic(250, 0, 1)
                db_pids = pg_backend_pids(pg_database)
            return sweep(f"xmpp: {subject}", fleet, peer.pids(), XMPP_RATES, step_seconds, 100, db_pids)
    except peers.PeerError as e:
        return None, str(e)[:80], None, []
    finally:
        peer.stop()


def part_xmpp(ctx, clients=None, step_seconds=None):
    """XMPP 1:1 chat in pairs (roster = the partner), open loop at rising rates: the highest rate
    whose delivery p99 stays within 100 ms, and the rate at which the server stops keeping up.
    imd runs with its default store (SQLite) and with PostgreSQL (a fresh database
    imd_bench_xmpp, dropped after; skipped when there is no server). Prosody runs with the modules
    this traffic uses, then also with Lua's generational GC, and with the modules of the prosody
    package's own config (peers.Prosody's `modules`)."""
    clients = clients or (200 if ctx.quick else 2000)
    step_seconds = step_seconds or (2 if ctx.quick else 5)
    users = range(clients + lg.MAX_PER_PROCESS)   # the second worker starts at MAX_PER_PROCESS
    accounts = {f"u{i}": "pw" for i in users}
    rosters = {f"u{i}": [f"u{i ^ 1}"] for i in users}
    subjects = [(ctx.name("imd xmpp"), ctx.imd, None)]     # (subject, start, its database)
    try:
        store = pg_store(PG_XMPP_DATABASE)
        subjects.append((ctx.name("imd xmpp postgresql"), lambda: ctx.imd(store=store), PG_XMPP_DATABASE))
    except Exception as e:          # no psycopg, no server: that subject is n/a
        say(f"xmpp: no PostgreSQL subject: {str(e).splitlines()[0][:60]}")
        store = None
    if not ctx.imd_only:
        subjects += [("prosody xmpp", peers.Prosody(accounts, rosters).start, None),
                     ("prosody-gengc xmpp", peers.Prosody(accounts, rosters, generational_gc=True).start, None),
                     ("prosody-debian xmpp", peers.Prosody(accounts, rosters, modules="package").start, None)]
    out = []
    try:
        for subject, start, database in subjects:
            held, note, saturation, series = xmpp_one(subject, start, clients, step_seconds, database)
            out.append(Result("xmpp", f"sustained 1:1 msgs/s with p99 <= 100 ms ({clients:,} clients)",
                              subject, held, "/s", "higher", note=note, series=series))
            out.append(Result("xmpp", f"saturation: highest rate fully delivered with p50 <= 100 ms "
                              f"({clients:,} clients)", subject, saturation, "/s", "higher"))
    finally:
        if store is not None:
            pg_drop(PG_XMPP_DATABASE)
    return out


PARTS = {"idle": part_idle, "fanout": part_fanout, "burst": part_burst, "logins": part_logins,
         "chat": part_chat, "chat-pg": part_chat_pg,
         "xmpp": part_xmpp}
