"""The benchmark's peers, each run as a child process with a config generated into a temp dir.

A Peer starts with `start()` (blocks until its port accepts connections or raises PeerError with the
tail of its log), exposes `port` (and `ports` by name), `pids()` (the processes whose RSS and CPU the
bench measures: for nginx the worker processes, not the master) and stops with `stop()` (SIGTERM,
then SIGKILL after a grace period; the temp dir is removed). Every peer binds 127.0.0.1 on a free
port chosen here, never a system service's default port; nothing here touches system services.

Peers: nginx + nchan (pub/sub locations: EventSource, long-poll and WebSocket subscribers),
mosquitto (anonymous listener; optional allow_duplicate_messages), prosody (c2s without TLS, PLAIN
allowed, accounts and rosters written straight into its data files) and imd itself.
"""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

NCHAN_MODULE = "/usr/lib/nginx/modules/ngx_nchan_module.so"
FD_LIMIT = 20000


class PeerError(RuntimeError):
    """A peer did not start or is missing; the message carries the reason and its log tail."""


def free_port(host="127.0.0.1"):
    """A TCP port that was free on `host` a moment ago."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_port(port, host="127.0.0.1", timeout=10.0, proc=None):
    """Block until host:port accepts a TCP connection; False on timeout or if `proc` exited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.05)
    return False


def child_pids(pid):
    """Direct children of `pid` (from /proc/<pid>/task/*/children)."""
    kids = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                kids.extend(int(x) for x in f.read().split())
    except FileNotFoundError:
        pass
    return kids


class Peer:
    """One server under test, run as a child process; subclasses write the config and the command."""

    name = "peer"

    def __init__(self):
        self.tmp = None
        self.proc = None
        self.ports = {}
        self.log_path = None

    @property
    def port(self):
        return next(iter(self.ports.values()))

    def _command(self):
        raise NotImplementedError

    def _prepare(self):
        """Write config files into self.tmp and choose ports."""
        raise NotImplementedError

    def _wait_ready(self):
        return all(wait_port(p, proc=self.proc) for p in self.ports.values())

    def start(self):
        self.tmp = tempfile.mkdtemp(prefix=f"imdbench-{self.name}-")
        os.chmod(self.tmp, 0o755)
        self._prepare()
        self.log_path = os.path.join(self.tmp, "stdout.log")
        with open(self.log_path, "wb") as log:
            try:
                self.proc = subprocess.Popen(self._command(), stdout=log, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL, cwd=self.tmp,
                                             preexec_fn=_raise_fd_limit, start_new_session=True)
            except OSError as e:
                shutil.rmtree(self.tmp, ignore_errors=True)
                raise PeerError(f"{self.name} could not run: {e}") from e
        if not self._wait_ready():
            tail = self.log_tail()
            self.stop()
            raise PeerError(f"{self.name} did not start: {tail}")
        return self

    def pids(self):
        return [self.proc.pid]

    def log_tail(self, n=2000):
        out = []
        for name in sorted(os.listdir(self.tmp)) if self.tmp and os.path.isdir(self.tmp) else []:
            if name.endswith(".log"):
                with open(os.path.join(self.tmp, name), "rb") as f:
                    out.append(f"[{name}] " + f.read()[-n:].decode("utf-8", "replace"))
        return "\n".join(out)

    def stop(self, grace=5.0):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if self.tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def _raise_fd_limit():
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class Nchan(Peer):
    """nginx with the nchan module, one worker process.

    POST /pub?id=CHANNEL publishes; GET /sub?id=CHANNEL subscribes with EventSource (Accept:
    text/event-stream), WebSocket (Upgrade) or long-poll (anything else).
    """

    name = "nchan"

    def _prepare(self):
        self.ports = {"http": free_port()}
        for d in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
            os.mkdir(os.path.join(self.tmp, d))
        t = self.tmp
        conf = f"""
load_module {NCHAN_MODULE};
worker_processes 1;
worker_rlimit_nofile {FD_LIMIT};
pid {t}/nginx.pid;
error_log {t}/error.log warn;
events {{ worker_connections {FD_LIMIT - 200}; use epoll; multi_accept on; }}
http {{
    access_log off;
    client_body_temp_path {t}/body; proxy_temp_path {t}/proxy; fastcgi_temp_path {t}/fastcgi;
    uwsgi_temp_path {t}/uwsgi; scgi_temp_path {t}/scgi;
    keepalive_requests 1000000;
    server {{
        listen 127.0.0.1:{self.port} backlog=4096;
        location = /pub {{
            nchan_publisher;
            nchan_channel_id $arg_id;
            nchan_message_buffer_length 10;
        }}
        location = /sub {{
            nchan_subscriber websocket eventsource longpoll;
            nchan_channel_id $arg_id;
            nchan_subscriber_timeout 0;
            nchan_subscriber_first_message newest;
        }}
    }}
}}
"""
        self.conf = os.path.join(t, "nginx.conf")
        with open(self.conf, "w") as f:
            f.write(conf)

    def _command(self):
        if not os.path.exists(NCHAN_MODULE):
            raise PeerError("nchan module missing: run bench/setup.sh")
        return ["nginx", "-p", self.tmp, "-c", self.conf, "-g", "daemon off; master_process on;"]

    def _wait_ready(self):
        return super()._wait_ready() and _wait_for(lambda: child_pids(self.proc.pid))

    def pids(self):
        """The worker processes (the master holds no connections)."""
        return child_pids(self.proc.pid)


class Mosquitto(Peer):
    """mosquitto with one anonymous listener; `duplicates=True` sets allow_duplicate_messages."""

    name = "mosquitto"

    def __init__(self, duplicates=False):
        super().__init__()
        self.duplicates = duplicates
        if duplicates:
            self.name = "mosquitto-dup"

    def _prepare(self):
        self.ports = {"mqtt": free_port()}
        self.conf = os.path.join(self.tmp, "mosquitto.conf")
        with open(self.conf, "w") as f:
            f.write(f"listener {self.port} 127.0.0.1\n"
                    "allow_anonymous true\n"
                    "persistence false\n"
                    "max_connections -1\n"
                    "max_queued_messages 1000\n"
                    "log_dest stderr\n"
                    "log_type error\nlog_type warning\n"
                    "user root\n"
                    f"allow_duplicate_messages {'true' if self.duplicates else 'false'}\n")

    def _command(self):
        return ["mosquitto", "-c", self.conf]


PROSODY_PACKAGE_CONFIG = "/etc/prosody/prosody.cfg.lua"
PROSODY_MINIMAL_MODULES = ("roster", "saslauth", "disco", "presence", "message", "offline", "ping", "posix")


def prosody_package_settings(path):
    """The modules and the c2s rate limit that the prosody package's config file at `path`
    (PROSODY_PACKAGE_CONFIG) enables: (modules, c2s_rate or None). Raises PeerError when the file
    is missing or has no module list."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError as e:
        raise PeerError(f"prosody's package config is not readable: {e}") from None
    text = re.sub(r"--[^\n]*", "", text)
    block = re.search(r"^modules_enabled\s*=\s*\{(.*?)\}", text, re.S | re.M)
    if block is None:
        raise PeerError(f"no modules_enabled in {path}")
    rate = re.search(r"\bc2s\s*=\s*\{\s*rate\s*=\s*\"([^\"]+)\"", text)
    return tuple(re.findall(r'"([^"]+)"', block.group(1))), rate.group(1) if rate else None


class Prosody(Peer):
    """prosody serving one virtual host, c2s on a chosen port: no TLS, SASL PLAIN, internal_plain
    accounts. `accounts` maps user -> password; `rosters` maps user -> list of contacts (mutual
    subscriptions are written for both sides). Both are written as Prosody data files before start.

    `modules="minimal"` loads only what the bench's traffic uses (the strongest Prosody for it);
    `modules="package"` loads the modules, and the c2s rate limit, of the prosody package's own
    /etc/prosody/prosody.cfg.lua (carbons, smacks, blocklist, limits, csi_simple, pep, ...), as a
    server installed from Debian runs them; s2s stays off and accounts stay internal_plain in both.
    """

    name = "prosody"
    domain = "localhost"

    def __init__(self, accounts=(), rosters=None, generational_gc=False, modules="minimal"):
        super().__init__()
        if modules not in ("minimal", "package"):
            raise ValueError(f"modules must be 'minimal' or 'package', not {modules!r}")
        self.accounts = dict(accounts)
        self.rosters = rosters or {}
        self.generational_gc = generational_gc
        self.modules = modules

    def _module_config(self):
        """The config lines that choose the modules (and limits) of this Prosody."""
        if self.modules == "minimal":
            enabled, disabled, rate = PROSODY_MINIMAL_MODULES, ("s2s", "tls", "limits"), None
        else:
            enabled, rate = prosody_package_settings(PROSODY_PACKAGE_CONFIG)
            disabled = ("s2s", "dialback")
        lines = [f"modules_enabled = {_lua_list(enabled)}", f"modules_disabled = {_lua_list(disabled)}"]
        if rate:
            lines.append(f"limits = {{ c2s = {{ rate = {_lua_string(rate)} }} }}")
        return "\n".join(lines) + "\n"

    def _prepare(self):
        self.ports = {"c2s": free_port()}
        t = self.tmp
        data = os.path.join(t, "data")
        os.mkdir(os.path.join(t, "certs"))
        gc = 'gc = { mode = "generational" }\n' if self.generational_gc else ""
        conf = f"""
pidfile = "{t}/prosody.pid"
data_path = "{data}"
run_as_root = true
daemonize = false
{gc}log = {{ {{ levels = {{ min = "error" }}, to = "file", filename = "{t}/prosody.log" }} }}
network_backend = "epoll"
{self._module_config()}authentication = "internal_plain"
storage = "internal"
certificates = "{t}/certs"
c2s_require_encryption = false
allow_unencrypted_plain_auth = true
c2s_ports = {{ {self.port} }}
c2s_interfaces = {{ "127.0.0.1" }}
s2s_ports = {{ }}
http_ports = {{ }}
https_ports = {{ }}
c2s_direct_tls_ports = {{ }}
VirtualHost "{self.domain}"
"""
        self.conf = os.path.join(t, "prosody.cfg.lua")
        with open(self.conf, "w") as f:
            f.write(conf)
        write_prosody_accounts(data, self.domain, self.accounts, self.rosters)

    def _command(self):
        return ["prosody", "--config", self.conf, "-F"]


def _lua_string(s):
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _lua_list(names):
    return "{ " + ", ".join(_lua_string(n) for n in names) + " }"


def _prosody_encode(node):
    """Prosody's datamanager path encoding: every byte outside [A-Za-z0-9_-] becomes %xx."""
    return re.sub(r"[^a-zA-Z0-9_-]", lambda m: "%%%02x" % ord(m.group(0)), node)


def write_prosody_accounts(data_path, domain, accounts, rosters):
    """Write accounts (user -> password) and rosters (user -> contacts) as Prosody's internal data
    files: DATA/<host>/accounts/<user>.dat and DATA/<host>/roster/<user>.dat."""
    host = os.path.join(data_path, _prosody_encode(domain))
    acc_dir = os.path.join(host, "accounts")
    roster_dir = os.path.join(host, "roster")
    os.makedirs(acc_dir, exist_ok=True)
    os.makedirs(roster_dir, exist_ok=True)
    for user, password in accounts.items():
        with open(os.path.join(acc_dir, _prosody_encode(user) + ".dat"), "w") as f:
            f.write(f"return {{\n\t[\"password\"] = {_lua_string(password)};\n}};\n")
    for user, contacts in rosters.items():
        items = "".join(
            f"\t[{_lua_string(c + '@' + domain)}] = {{ [\"subscription\"] = \"both\"; "
            f"[\"groups\"] = {{}}; }};\n" for c in contacts)
        with open(os.path.join(roster_dir, _prosody_encode(user) + ".dat"), "w") as f:
            f.write(f"return {{\n\t[false] = {{ [\"version\"] = 1; }};\n{items}}};\n")


class PrivateRedis:
    """redis-server on a free port in its own process group, no persistence; the pub/sub output
    buffer limit is raised so that a broadcast to a million users cannot cut a node's subscriber
    connection off (the default soft limit is 8 MB for 60 s)."""

    def __init__(self, tmp):
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", tmp, "--maxclients", "4000",
             "--client-output-buffer-limit", "pubsub 512mb 256mb 60", "--logfile", os.path.join(tmp, "redis.log")],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
            start_new_session=True, preexec_fn=_raise_fd_limit)
        if not wait_port(self.port, proc=self.proc):
            self.stop()
            raise PeerError("private redis-server did not start")

    def info(self):
        import redis
        r = redis.Redis(port=self.port)
        try:
            mem, cpu = r.info("memory"), r.info("cpu")
            return mem["used_memory"], mem["used_memory_rss"], cpu["used_cpu_sys"] + cpu["used_cpu_user"]
        finally:
            r.close()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class Imd(Peer):
    """imd itself: `python -m imd -c CONFIG` with the given interpreter and a generated TOML config.

    Every listener asks for port 0; the bound addresses are read from the log line each listener
    writes at start (`listening name=tcp addr=127.0.0.1:PORT`, or any line naming the listener and an
    address). `repo` is the source tree put on PYTHONPATH.
    """

    name = "imd"
    LISTENERS = ("tcp", "comet", "xmpp", "admin")
    _listen_re = re.compile(r"listen\w*\b.*?\b(?:name=)?(tcp|comet|xmpp|admin)\b.*?"
                            r"(?:addr=)?(127\.0\.0\.1|0\.0\.0\.0|localhost):(\d+)")

    def __init__(self, repo, python=None, secret="bench-secret", extra="", engine="memory",
                 workers=1, synchronous="full", profile=None, store=None, engine_url=None, limits=None):
        super().__init__()
        self.store = dict(store or {})
        self.engine_url = engine_url        # redis URL (None: imd's default)
        self.limits = limits or {}          # extra [limits] settings
        self.profile = profile
        self.synchronous = synchronous
        self.repo = repo
        self.python = python or sys.executable
        self.secret = secret
        self.extra = extra
        self.engine = engine
        self.workers = workers

    def _prepare(self):
        t = self.tmp
        self.conf = os.path.join(t, "imd.toml")
        listen = "\n".join(f'{n} = "127.0.0.1:0"' for n in self.LISTENERS)
        engine_url = f'url = "{self.engine_url}"' if self.engine_url else ""
        limits = "\n".join(f"{k} = {v!r}" for k, v in self.limits.items())
        with open(self.conf, "w") as f:
            f.write(f"""[node]
id = "bench-{os.path.basename(t)[-8:]}"
data_dir = "{t}/var"
workers = {self.workers}

[auth]
secret = "{self.secret}"

[listen]
{listen}
control = "{t}/var/imd.sock"

[store]
{self._store_toml()}

[engine]
backend = "{self.engine}"
{engine_url}

[comet]
max_subscribers_per_channel = 100000

[limits]
msg_rate = 0                   # the bench measures capacity, not the per-session policy
{limits}

[xmpp]
tls = "disabled"

[admin]
allow = ["127.0.0.1"]
dev_tokens = true
{self.extra}
""")

    def _store_toml(self):
        """The [store] section: SQLite with `synchronous` unless `store` says otherwise."""
        store = dict({"backend": "sqlite", "synchronous": self.synchronous}, **self.store)
        return "\n".join(f"{k} = {json.dumps(v)}" for k, v in store.items())

    def _command(self):
        prof = ["-m", "cProfile", "-o", self.profile] if self.profile else []
        return [self.python, *prof, "-m", "imd", "-c", self.conf]

    def stop(self, grace=15.0):
        """Stop imd; with `profile`, also write the top of the profile beside it (PROFILE.txt)."""
        super().stop(grace)
        if self.profile and os.path.exists(self.profile):
            import io
            import pstats
            out = io.StringIO()
            stats = pstats.Stats(self.profile, stream=out)
            stats.sort_stats("tottime").print_stats(25)
            stats.sort_stats("cumulative").print_stats(25)
            with open(self.profile + ".txt", "w") as f:
                f.write(out.getvalue())

    def start(self):
        os.environ.setdefault("PYTHONPATH", "")
        env_path = self.repo + (os.pathsep + os.environ["PYTHONPATH"] if os.environ["PYTHONPATH"] else "")
        old = os.environ["PYTHONPATH"]
        os.environ["PYTHONPATH"] = env_path
        try:
            return super().start()
        finally:
            os.environ["PYTHONPATH"] = old

    def pids(self, writers=True):
        """The process itself, or its workers when it runs several, and (``writers``) the
        SQLite writer process each of them runs (store.sqlite_writer = "process"): imd's
        CPU and memory are theirs together."""
        tops = (child_pids(self.proc.pid) or [self.proc.pid]) if self.workers > 1 else [self.proc.pid]
        return tops + [kid for pid in tops for kid in child_pids(pid)] if writers else tops

    def _wait_ready(self):
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and self.proc.poll() is None:
            with open(self.log_path, "rb") as f:
                text = f.read().decode("utf-8", "replace")
            for m in self._listen_re.finditer(text):
                self.ports[m.group(1)] = int(m.group(3))
            if "tcp" in self.ports and all(wait_port(p, timeout=2) for p in self.ports.values()):
                time.sleep(0.3)   # let the other listeners' lines arrive
                with open(self.log_path, "rb") as f:
                    for m in self._listen_re.finditer(f.read().decode("utf-8", "replace")):
                        self.ports[m.group(1)] = int(m.group(3))
                return True
            time.sleep(0.1)
        return False


def _wait_for(pred, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return False


def rss_bytes(pids):
    """Sum of VmRSS over `pids`, in bytes."""
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
                    break
    return total


def cpu_seconds(pids, main_thread=False):
    """Sum of utime+stime over `pids`, in seconds (from /proc/<pid>/stat); with `main_thread`,
    of their main threads only (/proc/<pid>/task/<pid>/stat: imd's gevent loop, without the
    store's and other threads)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/task/{pid}/stat" if main_thread else f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / tick


def slab_bytes():
    """Slab from /proc/meminfo, in bytes (kernel memory, including every socket)."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("Slab:"):
                return int(line.split()[1]) * 1024
    return 0
