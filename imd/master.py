"""The master of ``node.workers = N`` (DESIGN.md §7): N worker processes on one machine.

The master reserves every TCP listener's address (bound with SO_REUSEPORT,
never listening, so that port 0 resolves once and no connection ever queues
on the master), then forks N workers. Each worker is a full imd node
(:class:`imd.daemon.Daemon`) with its own node id ``<node.id>.w<i>`` and its
own control socket ``<listen.control>.w<i>``; it binds its own listening
sockets on the reserved addresses with SO_REUSEPORT, so the kernel spreads
new connections over the workers, and each worker stays below the
per-process descriptor limit. Workers talk to each other only through the
redis engine, which the configuration requires when N > 1.

Signals follow gunicorn's arbiter: handlers only enqueue; the main loop
dispatches them and reaps workers:

  TERM        forward TERM (each worker drains), wait, exit 0
  INT, QUIT   forward, wait for the workers' fast stop, exit 0
  HUP         validate the config file, then forward HUP (workers reload)
  USR1        forward (reopen log files)

A worker whose master is gone (killed with SIGKILL) drains itself within
a second. A worker that dies while the master is not stopping is started again with
the same index (and node id), after a delay that grows while it keeps dying
young. Must run under gevent's monkey patching (``os.fork`` re-initialises
the hub in the child).

systemd (``Type=notify``): the workers' ``NOTIFY_SOCKET`` is a datagram
socket of the master; when every worker has said ``READY=1`` the master logs
``all workers ready`` and tells systemd ``READY=1`` itself (systemd listens
to the main process only). The master sends ``STOPPING=1``, ``RELOADING=1``
and the watchdog pings.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import struct
import time
from collections import deque

import gevent
from gevent.event import Event

from . import config as config_mod, sdnotify
from .config import Config
from .signals import SIGNALS, hold as hold_signals, release as release_signals

log = logging.getLogger("imd.master")

TCP_LISTENERS = ("xmpp", "xmpps", "comet", "tcp", "admin")
REAP_INTERVAL = 0.5
STOP_TIMEOUT = 45.0          # a draining worker gets this long before SIGKILL
YOUNG = 5.0                  # a worker that dies younger than this is restarted later
RESTART_DELAY_MAX = 30.0
PARENT_CHECK = 1.0           # seconds between a worker's checks that its master lives


def reserve(host: str, port: int) -> socket.socket:
    """Bind (host, port) with SO_REUSEPORT without listening: the port is held
    for the workers and no connection can queue on this socket."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


def worker_overrides(cfg: Config, index: int, addrs: dict) -> dict:
    """The settings of worker ``index`` that differ from the file: its node id,
    the resolved listening addresses, its own control socket."""
    listen = {name: (f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
              for name, (host, port) in addrs.items()}
    if cfg.listen.control:
        listen["control"] = f"{cfg.listen.control}.w{index}"
    return {"node": {"id": f"{cfg.node.id}.w{index}"}, "listen": listen}


def apply_overrides(cfg: Config, overrides: dict) -> Config:
    """``cfg`` with a worker's own settings put over it (at start and on every reload)."""
    values = cfg.as_dict()
    for section, settings in overrides.items():
        values[section].update(settings)
    return Config(values, cfg.source)


def watch_parent(ppid: int) -> None:
    """In a worker: drain (SIGTERM to itself) when the master is gone, so that no
    orphaned worker keeps serving unsupervised."""
    while os.getppid() == ppid:
        gevent.sleep(PARENT_CHECK)
    log.warning("master pid=%d is gone: draining this worker", ppid)
    os.kill(os.getpid(), signal.SIGTERM)


class Worker:
    __slots__ = ("index", "pid", "started", "fails")

    def __init__(self, index: int) -> None:
        self.index = index
        self.pid = 0
        self.started = 0.0
        self.fails = 0


class Master:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.workers = [Worker(i) for i in range(cfg.node.workers)]
        self.reserved: list[socket.socket] = []
        self.addrs: dict[str, tuple] = {}
        self._signals: deque = deque()
        self._wake = Event()
        self._watchers: list = []
        self._stopping = False
        self._stop_deadline = 0.0
        self._restart_at: dict[int, float] = {}
        self._notify_sock = None
        self._notify_addr = ""
        self._ready = set()            # worker indexes that said READY=1 since they were started
        self._all_ready = False

    # -- boot -------------------------------------------------------------------------
    def start(self) -> None:
        cfg = self.cfg
        if cfg.store.backend == "sqlite":
            log.warning("workers=%d share one SQLite file: use store.backend = \"postgresql\" in production",
                        cfg.node.workers)
        log.info("master starting node=%s workers=%d pid=%d", cfg.node.id, cfg.node.workers, os.getpid())
        for name in TCP_LISTENERS:
            try:
                addr = cfg.addr("listen." + name)
            except KeyError:
                continue
            if addr is None:
                continue
            sock = reserve(addr[0], addr[1])
            self.reserved.append(sock)
            self.addrs[name] = sock.getsockname()[:2]
            host, port = self.addrs[name]
            log.info("listening name=%s addr=%s:%d", name, host, port)
        for signum in SIGNALS:
            self._watchers.append(gevent.signal_handler(signum, self._enqueue, signum))
        release_signals()             # held by imd.cli since the start (imd.signals)
        self._open_notify_socket()
        for w in self.workers:
            self.spawn(w)

    def spawn(self, w: Worker) -> None:
        overrides = worker_overrides(self.cfg, w.index, self.addrs)
        wcfg = apply_overrides(self.cfg, overrides)
        hold_signals()        # across the fork: the worker's wait for its own handlers (imd.signals)
        try:
            pid = os.fork()
        except BaseException:
            release_signals()
            raise
        if pid == 0:                    # the worker
            code = 1
            try:
                for watcher in self._watchers:
                    watcher.cancel()
                for sock in self.reserved:
                    sock.close()
                if self._notify_sock is not None:
                    self._notify_sock.close()
                for name in ("WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID"):
                    os.environ.pop(name, None)
                os.environ["NOTIFY_SOCKET"] = self._notify_addr
                gevent.spawn(watch_parent, os.getppid())
                from .daemon import run_worker
                code = run_worker(wcfg, overrides)
            except BaseException:
                log.exception("worker %d failed", w.index)
            finally:
                logging.shutdown()
                os._exit(code)
        release_signals()             # the master's own: held only across the fork
        w.pid = pid
        w.started = time.monotonic()
        self._ready.discard(w.index)
        log.info("worker started index=%d node=%s pid=%d", w.index, wcfg.node.id, pid)

    # -- readiness (the workers' sd_notify) -------------------------------------------------
    def _open_notify_socket(self) -> None:
        """A datagram socket in the abstract namespace where workers send their
        sd_notify messages, read by a greenlet."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)      # the sender's pid
        name = f"imd-master-{os.getpid()}-{os.urandom(4).hex()}"
        sock.bind("\0" + name)
        self._notify_sock = sock
        self._notify_addr = "@" + name
        gevent.spawn(self._read_notify)

    def _read_notify(self) -> None:
        creds = struct.Struct("iII")                   # struct ucred: pid, uid, gid
        while True:
            try:
                data, ancdata, _, _ = self._notify_sock.recvmsg(4096, socket.CMSG_SPACE(creds.size))
            except OSError:
                return
            pid = next((creds.unpack(d[:creds.size])[0] for level, kind, d in ancdata
                        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS), 0)
            w = next((w for w in self.workers if w.pid == pid and pid), None)
            if w is None or "READY=1" not in data.decode(errors="replace").split("\n"):
                continue
            self._ready.add(w.index)
            if not self._all_ready and len(self._ready) == len(self.workers):
                self._all_ready = True
                log.info("all workers ready workers=%d node=%s", len(self.workers), self.cfg.node.id)
                sdnotify.notify("READY=1", f"STATUS=serving with {len(self.workers)} workers")

    # -- the loop -------------------------------------------------------------------------
    def _enqueue(self, signum: int) -> None:
        self._signals.append(signum)
        self._wake.set()

    def run(self) -> int:
        watchdog = sdnotify.watchdog_interval()
        next_ping = 0.0
        while True:
            if watchdog and time.monotonic() >= next_ping:
                sdnotify.notify("WATCHDOG=1")
                next_ping = time.monotonic() + watchdog
            self._wake.wait(REAP_INTERVAL)
            self._wake.clear()
            while self._signals:
                name = SIGNALS[self._signals.popleft()]
                log.info("master signal %s", name.upper())
                try:
                    getattr(self, "handle_" + name)()
                except Exception:
                    log.exception("master signal handler %s failed", name)
            self.reap()
            if self._stopping:
                if not any(w.pid for w in self.workers):
                    break
                if time.monotonic() > self._stop_deadline:
                    self.signal_workers(signal.SIGKILL)
            else:
                self.restart_due()
        for sock in self.reserved:
            sock.close()
        log.info("master stopped node=%s", self.cfg.node.id)
        return 0

    def reap(self) -> None:
        """Collect exited workers; schedule a restart for each unless stopping."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            w = next((w for w in self.workers if w.pid == pid), None)
            if w is None:
                continue
            w.pid = 0
            how = (f"signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status)
                   else f"code {os.WEXITSTATUS(status)}")
            if self._stopping:
                log.info("worker exited index=%d pid=%d %s", w.index, pid, how)
                continue
            lived = time.monotonic() - w.started
            w.fails = w.fails + 1 if lived < YOUNG else 0
            delay = min(2.0 ** w.fails - 1, RESTART_DELAY_MAX)
            log.warning("worker died index=%d pid=%d %s after %.1fs; restart in %.1fs",
                        w.index, pid, how, lived, delay)
            self._restart_at[w.index] = time.monotonic() + delay

    def restart_due(self) -> None:
        now = time.monotonic()
        for index, at in list(self._restart_at.items()):
            if at <= now:
                del self._restart_at[index]
                self.spawn(self.workers[index])

    def signal_workers(self, signum: int) -> None:
        for w in self.workers:
            if w.pid:
                try:
                    os.kill(w.pid, signum)
                except ProcessLookupError:
                    pass

    # -- signals ------------------------------------------------------------------------------
    def stop(self, signum: int, timeout: float) -> None:
        sdnotify.notify("STOPPING=1", "STATUS=stopping the workers")
        self._stopping = True
        self._restart_at.clear()
        self._stop_deadline = time.monotonic() + timeout
        self.signal_workers(signum)

    def handle_term(self) -> None:
        self.stop(signal.SIGTERM, STOP_TIMEOUT)

    def handle_int(self) -> None:
        self.stop(signal.SIGINT, 15.0)

    def handle_quit(self) -> None:
        self.stop(signal.SIGQUIT, 15.0)

    def handle_hup(self) -> None:
        sdnotify.notify("RELOADING=1", "MONOTONIC_USEC=%d" % (time.monotonic_ns() // 1000))
        try:
            new = config_mod.load(self.cfg.source)
        except config_mod.ConfigError as e:
            log.error("reload refused, workers keep the running config: %s", e)
            return
        finally:
            sdnotify.notify("READY=1")
        for key, _old, _value, live in config_mod.changes(self.cfg, new):
            if not live:
                log.warning("reload: %s changed but needs a restart of the master", key)
        self.signal_workers(signal.SIGHUP)

    def handle_usr1(self) -> None:
        self.signal_workers(signal.SIGUSR1)


def run_master(cfg: Config) -> int:
    """Entry point for workers > 1: start the workers, supervise them until stopped."""
    master = Master(cfg)
    try:
        master.start()
    except OSError as e:
        log.error("cannot start: %s", e)
        master.signal_workers(signal.SIGTERM)
        return 1
    return master.run()
