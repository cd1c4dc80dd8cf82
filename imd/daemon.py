"""The daemon: boot order, listeners, signals and drain.

Boot order: logging → store (migrations) → engine and node → router →
listeners (one log line each with the address actually bound) → control
socket → ``READY=1`` to systemd (imd.sdnotify; a no-op outside systemd).
Signal handlers only enqueue the signal; the main greenlet's loop dispatches
``handle_<name>`` (gunicorn's arbiter style); imd-admin's ``drain`` posts to
the same queue:

  TERM  drain: stop accepting, tell every session to reconnect elsewhere
        (``close`` with reconnect=true), flush the store queue, exit 0;
        gives up waiting after DRAIN_TIMEOUT seconds
  INT, QUIT  stop fast (the store queue is still flushed: acked means stored)
  HUP   reload the configuration (validated first; the old one stays on error)
        and re-read the TLS certificates (imd.net.tls; the old ones stay on error)
  USR1  reopen the log file (after logrotate moved it)

Under systemd with ``WatchdogSec=``, a greenlet sends ``WATCHDOG=1`` every half
period, so a hub that stops turning gets the process restarted, and a
``STATUS=`` line with the connection count.

Must run with gevent's monkey patching already applied (imd.cli does it).
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque

import gevent
from gevent.event import Event

from . import __version__, config as config_mod, gcpolicy, log as log_mod, sdnotify
from .control import ControlServer
from .engine.memory import MemoryEngine
from .fastpath import IMPL
from .metrics import Metrics, max_fds, open_fds, rss_bytes
from .net.admission import Admission
from .net.listener import Listener, bind_socket
from .net.tls import TlsServer, cert_pair
from .node import Node
from .proto.admin import AdminProtocol
from .proto.comet.front import CometProtocol
from .proto.tcp import TcpProtocol
from .proto.xmpp.listener import XmppProtocol
from .router import Router
from .signals import SIGNALS, release as release_signals

log = logging.getLogger("imd.daemon")

DRAIN_TIMEOUT = 30.0           # keep below TimeoutStopSec in init/imd.service
STOP_TIMEOUT = 5.0
TLS_SWITCHES = ("tcp", "comet", "admin")     # listeners that speak TLS when tls.<name> = true
TLS_KEYS = ("tls.cert", "tls.key", "xmpp.cert", "xmpp.key")
STATUS_EVERY = 10.0            # seconds between STATUS= updates when no watchdog is asked for


def make_store(cfg):
    backend = cfg.store.backend
    if backend == "sqlite":
        from .store.sqlite import SqliteStore
        return SqliteStore(cfg.path(cfg.node.data_dir), queue_size=cfg.store.queue_size, batch_max=cfg.store.batch_max,
                           synchronous=cfg.store.synchronous, retention_days=cfg.store.retention_days,
                           batch_wait=cfg.store.batch_wait, writer=cfg.store.sqlite_writer)
    if backend == "postgresql":
        from .store.postgresql import PostgresStore
        return PostgresStore(cfg.store.dsn, queue_size=cfg.store.queue_size, batch_max=cfg.store.batch_max,
                             writers=cfg.store.writers, retention_days=cfg.store.retention_days)
    raise ValueError(f"unknown store backend {backend}")


def make_engine(cfg):
    if cfg.engine.backend == "memory":
        return MemoryEngine()
    from .engine.redis import RedisEngine
    return RedisEngine(cfg.engine.url, presence_ttl=cfg.engine.presence_ttl, prefix=cfg.engine.prefix)


class Daemon:
    """One imd process: owns the store, engine, node, router, listeners and control socket.

    ``state`` is "starting", "running", "draining" or "stopped". Everything runs
    in the hub thread; ``run`` blocks the main greenlet until the daemon stops.
    """

    def __init__(self, cfg) -> None:
        self.cfg = cfg
        self.metrics = Metrics()
        self.listeners: list[Listener] = []
        self._protocols: dict = {}
        self.control: ControlServer | None = None
        self.store = None
        self.node = None
        self.router = None
        self.state = "starting"
        self.started = time.time()
        self._signals: deque = deque()
        self._wake = Event()
        self._stopping = False
        self._deadline = 0.0
        self._notifier = None
        self.log_handler = None
        self.overrides = None       # a worker's own settings (imd/master.py), kept across reloads
        self.tls: dict = {}         # listener name → imd.net.tls.TlsServer (xmpp = STARTTLS)
        self.tls_reload_failures = 0

    # -- boot -------------------------------------------------------------------
    def start(self) -> None:
        cfg = self.cfg
        os.makedirs(cfg.path(cfg.node.data_dir), exist_ok=True)
        log.info("starting imd %s node=%s fastpath=%s pid=%d", __version__, cfg.node.id, IMPL, os.getpid())
        sdnotify.notify("STATUS=starting: opening the store")
        self.store = make_store(cfg)
        self.store.open()
        self.node = Node(cfg.node.id, make_engine(cfg), self.store, cfg.presence.grace)
        self.node.start()
        self.router = Router(cfg, self.node, self.store, self.metrics)
        self.router.start()
        self._register_gauges()
        self.admission = Admission(cfg.limits, self.metrics)
        self._protocols = self.protocols()
        xmpp_starttls = self._protocols["xmpp"].tls
        if xmpp_starttls is not None:
            self.tls["xmpp"] = xmpp_starttls
        for name, proto in self.listener_protocols():
            addr = cfg.addr("listen." + name)
            if addr is None:
                continue
            handle, refuse = proto.handle, getattr(proto, "refuse", None)
            mode = "starttls" if name == "xmpp" and xmpp_starttls is not None else "no"
            if name == "xmpps" or (name in TLS_SWITCHES and cfg.get("tls." + name)):
                tls = self.tls[name] = TlsServer(name, proto.plaintext_refusal)
                tls.load(*cert_pair(cfg, name))
                # a refused connection on a TLS port is just closed: a plaintext error
                # would be garbage to a TLS client, and a handshake costs what a flood wants
                handle, refuse = tls.handle(proto.handle), None
                mode = "yes"
            sock = bind_socket(addr[0], addr[1], reuse_port=cfg.node.workers > 1)
            listener = Listener(name, sock, handle, self.admission, refuse)
            listener.start()
            self.listeners.append(listener)
            host, port = listener.address
            log.info("listening name=%s addr=%s:%d tls=%s", name, host, port, mode)
        if cfg.listen.control:
            self.control = ControlServer(self, cfg.path(cfg.listen.control))
            self.control.start()
        self.state = "running"
        if sdnotify.notify("READY=1", "STATUS=" + self.status_line()):
            self._notifier = gevent.spawn(self._notify_loop, sdnotify.watchdog_interval())
        log.info("ready node=%s", cfg.node.id)

    def protocols(self) -> dict:
        """Listener name → protocol object with a ``handle(sock, addr)`` hook (and,
        optionally, ``refuse(sock, code, reason)`` and ``stop()``)."""
        front = CometProtocol(self.router)
        return {"tcp": TcpProtocol(self.router), "comet": front,
                "admin": AdminProtocol(self.router, self.node, front),
                "xmpp": XmppProtocol(self.router, self.cfg)}

    def listener_protocols(self) -> list:
        """(listener name, protocol) for every ``listen.*`` key; the direct-TLS XMPP
        port (``listen.xmpps``) is served by the XMPP protocol."""
        p = self._protocols
        return [("tcp", p["tcp"]), ("comet", p["comet"]), ("admin", p["admin"]),
                ("xmpp", p["xmpp"]), ("xmpps", p["xmpp"])]

    def _register_gauges(self) -> None:
        """Metrics read at scrape time (docs/operations.md lists them with alerts)."""
        m = self.metrics

        def connections():
            counts: dict = {}
            for s in self.node.all_sessions():
                key = (("protocol", s.protocol), ("source", s.source))
                counts[key] = counts.get(key, 0) + 1
            return counts

        def store_stat(key):
            return lambda: {(): self.store.stats().get(key, 0)}

        m.gauge("imd_connections", "authenticated sessions by protocol and client source", connections)
        m.gauge("imd_users", "users with at least one session on this node", lambda: {(): len(self.node.sessions)})
        m.gauge("imd_store_queue", "store operations waiting to be committed", store_stat("queue"))
        m.gauge("imd_store_queue_limit", "store.queue_size: at this queue length senders get 503",
                lambda: {(): self.cfg.store.queue_size})
        m.counter_fn("imd_store_committed_total", "store operations committed", store_stat("committed"))
        m.counter_fn("imd_store_batches_total", "store transactions committed", store_stat("batches"))
        m.counter_fn("imd_store_retries_total", "store transactions retried after a transient error",
                     store_stat("retries"))
        m.counter_fn("imd_store_failed_total", "store operations that failed for good", store_stat("failed"))
        m.counter_fn("imd_store_commit_seconds_total", "time spent in store transactions (sum)",
                     store_stat("commit_seconds_sum"))
        m.gauge("imd_store_last_batch", "operations in the last committed store transaction",
                store_stat("last_batch"))
        attach = self.router.attach_reads
        m.counter_fn("imd_attach_reads_total", "logins whose store reads were served by a batch",
                     lambda: {(): attach.requests})
        m.counter_fn("imd_attach_batches_total", "batched store reads for logins (one store call each)",
                     lambda: {(): attach.batches})
        m.gauge("imd_engine_connected", "1 while the engine (bus) is connected",
                lambda: {(): int(bool(self.node.engine.state().get("connected")))})
        m.gauge("imd_engine_channels", "bus channels this node subscribes to",
                lambda: {(): self.node.engine.state().get("channels", 0)})
        m.counter_fn("imd_accepted_total", "connections accepted by listener",
                     lambda: {(("listener", l.name),): l.accepted for l in self.listeners})
        m.gauge("imd_info", "version, node and fast path of this process",
                lambda: {(("version", __version__), ("node", self.cfg.node.id), ("fastpath", IMPL)): 1})
        m.gauge("imd_draining", "1 while the daemon drains or stops", lambda: {(): int(self.state != "running")})
        m.gauge("imd_uptime_seconds", "seconds since this process started",
                lambda: {(): round(time.time() - self.started, 3)})
        m.counter_fn("imd_tls_handshakes_total", "TLS handshakes completed by listener (xmpp = STARTTLS)",
                     lambda: {(("listener", n),): t.handshakes for n, t in self.tls.items()})
        m.counter_fn("imd_tls_handshake_failures_total",
                     "TLS connections that never completed a handshake: plaintext (not TLS), "
                     "protocol (e.g. TLS < 1.2, no shared cipher, garbage), incomplete (closed or timed out)",
                     lambda: {(("listener", n), ("reason", r)): c
                              for n, t in self.tls.items() for r, c in t.failures.items()})
        m.counter_fn("imd_tls_reload_failures_total", "certificate reloads refused (the old one stays)",
                     lambda: {(): self.tls_reload_failures})
        m.counter_fn("python_gc_collections_total", "collections of the cyclic garbage collector by generation",
                     lambda: {(("generation", str(g)),): n for g, n in enumerate(gcpolicy.PAUSES.collections)})
        m.histogram("imd_gc_pause_seconds", "how long each collection held the process (seconds)",
                    gcpolicy.PAUSES.histogram)
        m.gauge("process_open_fds", "open file descriptors", lambda: {(): open_fds()})
        m.gauge("process_max_fds", "file descriptor limit (RLIMIT_NOFILE)", lambda: {(): max_fds()})
        m.gauge("process_resident_memory_bytes", "resident memory", lambda: {(): rss_bytes()})

    # -- systemd -----------------------------------------------------------------
    def status_line(self) -> str:
        """One line for systemd's STATUS= (shown by ``systemctl status imd``)."""
        q = self.store.stats().get("queue", 0) if self.store is not None else 0
        n = self.node.count() if self.node is not None else 0
        return f"{self.state}: {n} sessions, store queue {q}"

    def _notify_loop(self, watchdog: float | None) -> None:
        """WATCHDOG=1 every ``watchdog`` seconds (if set) and a fresh STATUS= line.
        Runs as a greenlet: a blocked hub stops the pings, and systemd restarts us."""
        every = watchdog if watchdog is not None else STATUS_EVERY
        while True:
            gevent.sleep(every)
            fields = ["STATUS=" + self.status_line()]
            if watchdog is not None:
                fields.append("WATCHDOG=1")
            sdnotify.notify(*fields)

    # -- signals -----------------------------------------------------------------
    def install_signals(self) -> None:
        """Route the signals to the main loop's queue (call before :meth:`start`:
        a TERM during boot then waits in the queue and drains right after it), then
        release those imd.cli held since the process started (imd.signals)."""
        for signum in SIGNALS:
            gevent.signal_handler(signum, self._enqueue, signum)
        release_signals()

    def _enqueue(self, signum: int) -> None:
        name = SIGNALS[signum]
        if self._stopping and name in ("int", "quit"):
            self._hurry()           # the main greenlet is busy draining: act now
            return
        self.post(name)

    def post(self, action: str) -> None:
        """Ask the main loop to run ``handle_<action>`` (e.g. "term", "hup"); never blocks."""
        self._signals.append(action)
        self._wake.set()

    def run(self) -> int:
        """The main loop: wait for signals and dispatch them until stopped."""
        while not self._stopping:
            self._wake.wait()
            self._wake.clear()
            while self._signals and not self._stopping:
                name = self._signals.popleft()
                log.info("signal %s", name.upper())
                try:
                    getattr(self, "handle_" + name)()
                except Exception:
                    log.exception("signal handler %s failed", name)
        return 0

    def handle_term(self) -> None:
        self.drain(DRAIN_TIMEOUT)

    def handle_int(self) -> None:
        self.stop(reconnect=True, timeout=STOP_TIMEOUT)

    handle_quit = handle_int

    def handle_hup(self) -> None:
        try:
            self.reload()
        except config_mod.ConfigError:
            pass                # logged by reload; the running config stays

    def handle_usr1(self) -> None:
        if log_mod.reopen(self.log_handler):
            log.info("log file reopened path=%s", self.cfg.log.file)

    # -- reload, drain, stop ----------------------------------------------------
    def reload(self) -> list:
        """Load the config file again; apply what can change live; return the changes
        ``(key, old, new, live)``. Raises ConfigError (and changes nothing) when the
        file is invalid or its new log file cannot be opened. systemd hears
        RELOADING=1 first and READY=1 after, whatever happens."""
        sdnotify.notify("RELOADING=1", "MONOTONIC_USEC=%d" % (time.monotonic_ns() // 1000),
                        "STATUS=reloading the configuration")
        status = "reload failed"
        try:
            try:
                new = config_mod.load(self.cfg.source)
                if self.overrides:
                    from .master import apply_overrides
                    new = apply_overrides(new, self.overrides)
                _check_log_file(self.cfg, new)
            except config_mod.ConfigError as e:
                log.error("reload refused, keeping the running config: %s", e)
                if e.key in TLS_KEYS:
                    self.tls_reload_failures += 1
                status = "reload refused (bad config)"
                raise
            diff = self._apply(new)
            restart = sum(1 for c in diff if not c[3])
            log.info("reload done changed=%d restart_needed=%d", len(diff), restart)
            status = f"reloaded, {restart} setting(s) need a restart" if restart else "reloaded"
            return diff
        finally:
            sdnotify.notify("READY=1", f"STATUS={self.status_line()} ({status})")

    def _apply(self, new) -> list:
        old_log = (self.cfg.log.format, self.cfg.log.file)
        diff = config_mod.changes(self.cfg, new)
        config_mod.apply_live(self.cfg, diff)
        for key, old, value, live in diff:
            shown = "<hidden>" if key in config_mod.SECRET_KEYS else repr(value)
            if live:
                log.info("reload applied key=%s value=%s", key, shown)
            else:
                log.warning("reload needs a restart key=%s value=%s", key, shown)
        self._apply_components(diff)
        self.reload_tls()
        if (self.cfg.log.format, self.cfg.log.file) != old_log:
            self.log_handler = log_mod.setup(self.cfg.log.level, self.cfg.log.format, self.cfg.log.file)
        elif any(k == "log.level" for k, *_ in diff):
            log_mod.set_level(self.cfg.log.level)
        return diff

    def _apply_components(self, diff: list) -> None:
        """Push live values that components copied at boot."""
        for key, _old, value, live in diff:
            if key == "presence.grace":
                self.node.presence.grace = value
            elif key == "store.retention_days" and hasattr(self.store, "retention_days"):
                self.store.retention_days = value

    def reload_tls(self) -> bool:
        """Re-read every TLS listener's certificate and key (on each HUP: files renewed
        in place count). All or nothing: if one pair fails to load, an error is logged
        and every listener keeps the certificate it had. New handshakes use the new
        one; established connections keep theirs."""
        if not self.tls:
            return True
        loaded = {}
        for name, tls in self.tls.items():
            pair = cert_pair(self.cfg, name)
            if pair is None:
                log.warning("tls reload: listener=%s has no certificate set any more; it keeps "
                            "its old one until a restart", name)
                continue
            try:
                loaded[name] = (tls.context_for(*pair), pair)
            except (OSError, ValueError) as e:        # ssl.SSLError is an OSError
                self.tls_reload_failures += 1
                log.error("tls reload refused, keeping the old certificate listener=%s cert=%s: %s",
                          name, pair[0], e)
                return False
        for name, (ctx, pair) in loaded.items():
            self.tls[name].use(ctx, pair)
        log.info("tls certificates reloaded listeners=%s", ",".join(sorted(loaded)))
        return True

    def drain(self, timeout: float) -> None:
        """Stop accepting, send every session ``close`` with reconnect, flush, stop."""
        self.stop(reconnect=True, timeout=timeout)

    def stop(self, reconnect: bool, timeout: float) -> None:
        """Stop within ``timeout`` seconds (blocks the calling greenlet):

        1. stop accepting;
        2. wait for the store to commit what it already holds, so that the acks of
           messages received before the signal still reach their senders;
        3. send every session ``close`` (with ``reconnect``) and end it;
        4. wait for the store queue to empty and the sessions' output to drain;
        5. close the router, node, store and control socket.

        A message that gets no ack is resent by its client after it reconnects
        (same client id: stored once). An INT or QUIT during a drain shortens the
        remaining wait to STOP_TIMEOUT. systemd keeps getting WATCHDOG=1 meanwhile.
        """
        if self._stopping:
            return
        self._stopping = True
        self.state = "draining"
        self._deadline = time.monotonic() + timeout
        sdnotify.notify("STOPPING=1", "STATUS=" + self.status_line())
        for listener in self.listeners:
            listener.stop()
        for proto in self._protocols.values():
            if hasattr(proto, "stop"):
                proto.stop()
        self._flush_store(min(STOP_TIMEOUT, timeout / 2))
        sessions = list(self.node.all_sessions())
        log.info("closing sessions count=%d reconnect=%s", len(sessions), reconnect)
        for s in sessions:
            s.close(1001, "server shutting down", reconnect=reconnect)
        flushed = self._flush_store(None)
        while self.node.count() and self._left() > 0:
            gevent.sleep(0.05)          # the flusher writes the close envelopes, then the sockets close
        left = self.node.count()
        queued = self.store.stats().get("queue", 0)
        self.router.stop()
        self.node.stop()
        self.store.close(max(1.0, self._left()))
        if self.control is not None:
            self.control.stop()
        if self._notifier is not None:
            self._notifier.kill(block=False)
        self.state = "stopped"
        if not flushed:
            log.warning("store queue not flushed before the timeout ops_not_stored=%d "
                        "(never acked: their clients resend them)", queued)
        log.info("stopped node=%s store_flushed=%s sessions_left=%d", self.cfg.node.id, flushed, left)
        self._wake.set()

    def _left(self) -> float:
        return self._deadline - time.monotonic()

    def _flush_store(self, limit: float | None) -> bool:
        """Wait for the store queue to commit, up to ``limit`` seconds or the deadline
        (rechecked often: an INT may move it)."""
        until = time.monotonic() + (limit if limit is not None else self._left())
        while True:
            step = min(0.5, until - time.monotonic(), self._left())
            if step <= 0:
                return self.store.flush(0)
            if self.store.flush(step):
                return True

    def _hurry(self) -> None:
        """INT or QUIT during a drain: finish within STOP_TIMEOUT from now."""
        self._deadline = min(self._deadline, time.monotonic() + STOP_TIMEOUT)
        log.info("stop hurried left=%.1fs", max(0.0, self._left()))


def _check_log_file(old, new) -> None:
    """A reload that moves the log file must be able to open the new one."""
    path = new.log.file
    if path and path != old.log.file:
        try:
            open(path, "a").close()
        except OSError as e:
            raise config_mod.ConfigError("log.file", f"cannot open for writing: {e.strerror}", path) from None


def run(cfg) -> int:
    """Entry point used by imd.cli: start, serve until a stop signal, exit code.
    With ``node.workers`` > 1 this process becomes the master (imd/master.py)."""
    handler = log_mod.setup(cfg.log.level, cfg.log.format, cfg.log.file)
    if cfg.node.workers > 1:
        if cfg.engine.backend != "redis":
            log.error('cannot start: node.workers = %d needs engine.backend = "redis" '
                      "(workers talk to each other only through the redis engine)", cfg.node.workers)
            return 2
        from .master import run_master
        return run_master(cfg)
    return serve(cfg, handler)


def run_worker(cfg, overrides: dict) -> int:
    """Entry point of a worker forked by the master (logging is already set up);
    ``overrides`` are the worker's own settings, applied again on every reload."""
    handlers = logging.getLogger().handlers
    return serve(cfg, handlers[0] if handlers else None, overrides)


def serve(cfg, handler, overrides=None) -> int:
    """Run one node in this process until a stop signal; the exit code."""
    d = Daemon(cfg)
    d.log_handler = handler
    d.overrides = overrides
    d.install_signals()           # before start: a TERM during boot waits in the queue
    try:
        d.start()
    except Exception as e:         # bind failure, store unreachable, migration error, ...
        log.error("cannot start: %s", e, exc_info=not isinstance(e, OSError))
        sdnotify.notify("STATUS=cannot start: %s" % e)
        return 1
    gcpolicy.apply()              # the process's collector settings, once the node is up
    return d.run()
