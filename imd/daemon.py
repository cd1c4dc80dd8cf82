"""The daemon: boot order, listeners, signals and drain.

Boot order: logging → store (migrations) → engine and node → router →
listeners (one log line each with the address actually bound). Signal
handlers only enqueue the signal; the main greenlet's loop dispatches
``handle_<name>`` (gunicorn's arbiter style):

  TERM  drain: stop accepting, tell every session to reconnect elsewhere
        (``close`` with reconnect=true), flush the store queue, exit 0
  INT, QUIT  stop fast (the store queue is still flushed: acked means stored)
  HUP   reload the configuration (validated first; the old one stays on error)
  USR1  reopen the log file

Must run with gevent's monkey patching already applied (imd.cli does it).
"""

from __future__ import annotations

import logging
import os
import signal
from collections import deque

import gevent
from gevent.event import Event

from . import __version__, config as config_mod, log as log_mod
from .engine.memory import MemoryEngine
from .fastpath import IMPL
from .metrics import Metrics
from .net.listener import Listener, bind_socket
from .node import Node
from .proto.tcp import TcpProtocol
from .router import Router

log = logging.getLogger("imd.daemon")

SIGNALS = {signal.SIGTERM: "term", signal.SIGINT: "int", signal.SIGQUIT: "quit",
           signal.SIGHUP: "hup", signal.SIGUSR1: "usr1"}
DRAIN_TIMEOUT = 30.0


def make_store(cfg):
    backend = cfg.store.backend
    if backend == "sqlite":
        from .store.sqlite import SqliteStore
        path = os.path.join(cfg.path(cfg.node.data_dir), "imd.sqlite3")
        return SqliteStore(path, queue_size=cfg.store.queue_size, batch_max=cfg.store.batch_max,
                           synchronous=cfg.store.synchronous)
    if backend == "postgresql":
        from .store.postgresql import PostgresStore
        return PostgresStore(cfg.store.dsn, queue_size=cfg.store.queue_size, batch_max=cfg.store.batch_max,
                             writers=cfg.store.writers, retention_days=cfg.store.retention_days)
    raise ValueError(f"unknown store backend {backend}")


def make_engine(cfg):
    if cfg.engine.backend == "memory":
        return MemoryEngine()
    from .engine.redis import RedisEngine
    return RedisEngine(cfg.engine.url, presence_ttl=cfg.engine.presence_ttl)


class Daemon:
    """One imd process: owns the store, engine, node, router and listeners."""

    def __init__(self, cfg) -> None:
        self.cfg = cfg
        self.metrics = Metrics()
        self.listeners: list[Listener] = []
        self.store = None
        self.node = None
        self.router = None
        self._signals: deque = deque()
        self._wake = Event()
        self._stopping = False
        self.log_handler = None

    # -- boot -------------------------------------------------------------------
    def start(self) -> None:
        cfg = self.cfg
        os.makedirs(cfg.path(cfg.node.data_dir), exist_ok=True)
        log.info("starting imd %s node=%s fastpath=%s pid=%d", __version__, cfg.node.id, IMPL, os.getpid())
        self.store = make_store(cfg)
        self.store.open()
        self.node = Node(cfg.node.id, make_engine(cfg), self.store, cfg.presence.grace)
        self.node.start()
        self.router = Router(cfg, self.node, self.store, self.metrics)
        self.router.start()
        self._register_gauges()
        for name, proto in self.protocols().items():
            addr = cfg.addr("listen." + name)
            if addr is None:
                continue
            sock = bind_socket(addr[0], addr[1], reuse_port=cfg.node.workers > 1)
            listener = Listener(name, sock, proto.handle)
            listener.start()
            self.listeners.append(listener)
            host, port = listener.address
            log.info("listening name=%s addr=%s:%d", name, host, port)
        for signum in SIGNALS:
            gevent.signal_handler(signum, self._enqueue, signum)
        log.info("ready node=%s", cfg.node.id)

    def protocols(self) -> dict:
        """Listener name → protocol object with a ``handle(sock, addr)`` hook."""
        return {"tcp": TcpProtocol(self.router, self.cfg.node.id)}

    def _register_gauges(self) -> None:
        def connections():
            counts: dict = {}
            for s in self.node.all_sessions():
                key = (("protocol", s.protocol), ("source", s.source))
                counts[key] = counts.get(key, 0) + 1
            return counts
        self.metrics.gauge("imd_connections", "authenticated sessions by protocol and client source", connections)
        self.metrics.gauge("imd_store_queue", "store operations waiting to be committed",
                           lambda: {(): self.store.stats().get("queue", 0)})

    # -- signals -----------------------------------------------------------------
    def _enqueue(self, signum: int) -> None:
        self._signals.append(signum)
        self._wake.set()

    def run(self) -> int:
        """The main loop: wait for signals and dispatch them until stopped."""
        while not self._stopping:
            self._wake.wait()
            self._wake.clear()
            while self._signals:
                name = SIGNALS[self._signals.popleft()]
                log.info("signal %s", name.upper())
                try:
                    getattr(self, "handle_" + name)()
                except Exception:
                    log.exception("signal handler %s failed", name)
        return 0

    def handle_term(self) -> None:
        self.drain(DRAIN_TIMEOUT)

    def handle_int(self) -> None:
        self.stop(reconnect=True, timeout=5.0)

    handle_quit = handle_int

    def handle_hup(self) -> None:
        self.reload()

    def handle_usr1(self) -> None:
        if self.cfg.log.file:
            self.log_handler = log_mod.setup(self.cfg.log.level, self.cfg.log.format, self.cfg.log.file)
            log.info("log file reopened")

    # -- reload, drain, stop ----------------------------------------------------
    def reload(self) -> list:
        """Load the config file again; apply what can change live; return the changes."""
        try:
            new = config_mod.load(self.cfg.source)
        except config_mod.ConfigError as e:
            log.error("reload refused, keeping the running config: %s", e)
            raise
        changes = config_mod.changes(self.cfg, new)
        for key, old, value, live in changes:
            if live:
                section, name = key.split(".", 1)
                setattr(getattr(self.cfg, section), name, value)
                log.info("reload applied %s=%r", key, value)
            else:
                log.warning("reload: %s changed but needs a restart", key)
        if any(k.startswith("log.") and live for k, _, _, live in changes):
            self.log_handler = log_mod.setup(self.cfg.log.level, self.cfg.log.format, self.cfg.log.file)
        return changes

    def drain(self, timeout: float) -> None:
        """Stop accepting, send every session ``close`` with reconnect, flush, stop."""
        self.stop(reconnect=True, timeout=timeout)

    def stop(self, reconnect: bool, timeout: float) -> None:
        if self._stopping:
            return
        self._stopping = True
        for listener in self.listeners:
            listener.stop()
        for s in list(self.node.all_sessions()):
            s.close(1001, "server shutting down", reconnect=reconnect)
        gevent.sleep(0.05)          # let the flusher write the close envelopes
        flushed = self.store.flush(timeout)
        self.router.stop()
        self.node.stop()
        self.store.close(timeout)
        log.info("stopped node=%s store_flushed=%s", self.cfg.node.id, flushed)
        self._wake.set()


def run(cfg) -> int:
    """Entry point used by imd.cli: start, serve until a stop signal, exit code."""
    handler = log_mod.setup(cfg.log.level, cfg.log.format, cfg.log.file)
    d = Daemon(cfg)
    d.log_handler = handler
    try:
        d.start()
    except OSError as e:
        log.error("cannot start: %s", e)
        return 1
    return d.run()
