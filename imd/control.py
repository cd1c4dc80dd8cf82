"""The control socket: a unix socket (``listen.control``, mode 0600) for imd-admin.

Protocol: line-oriented JSON. The client sends one request per line and gets
one response line per request, in order::

    → {"cmd": "status"}
    ← {"ok": true, "result": {...}}
    → {"cmd": "kick", "user": "alice"}
    ← {"ok": true, "result": {"user": "alice", "closed": 2}}
    → {"cmd": "nope"}
    ← {"ok": false, "error": "unknown command \"nope\" (commands: ...)"}

Commands: ``status``; ``sessions`` with optional ``user`` and ``limit``;
``kick`` with ``user``; ``reload``; ``drain``; ``log-level`` with ``level``;
``metrics`` (the Prometheus text the admin port serves at /metrics).
A malformed request gets an error and the connection stays usable; a line
longer than ``MAX_LINE`` bytes gets an error and the connection is closed.

One greenlet accepts and one greenlet serves each control connection (there
are few); they block only themselves, never the hub. Whoever can open the
socket controls the daemon: its mode is 0600 and its directory should be
private too (``RuntimeDirectory=imd`` under systemd).
"""

from __future__ import annotations

import logging
import os
import socket
import stat
import time

import gevent
import orjson

from . import __version__, config as config_mod, log as log_mod
from .fastpath import IMPL
from .metrics import max_fds, open_fds, rss_bytes

log = logging.getLogger("imd.control")

MAX_LINE = 65536
MAX_PATH = 107                  # sun_path is 108 bytes with the terminating NUL
IDLE_TIMEOUT = 300.0
SESSIONS_LIMIT = 1000
READ_ONLY = frozenset({"status", "sessions", "metrics"})     # logged at debug: monitoring polls them


class CommandError(Exception):
    """A request that cannot be carried out; the message goes back to the client."""


class ControlServer:
    """Serves the control protocol for ``daemon`` (an :class:`imd.daemon.Daemon`) at ``path``."""

    def __init__(self, daemon, path: str) -> None:
        self.daemon = daemon
        self.path = path
        self.sock = None
        self._inode = None
        self._acceptor = None
        self._conns: set = set()

    # -- lifecycle ---------------------------------------------------------------
    def start(self) -> None:
        """Bind the socket (refusing to steal a live daemon's), mode 0600, start accepting.
        Raises OSError when it cannot bind."""
        if len(os.fsencode(self.path)) > MAX_PATH:
            raise OSError(f"control socket path too long for a unix socket "
                          f"({len(os.fsencode(self.path))} bytes, at most {MAX_PATH}): {self.path}")
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        self._remove_stale()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)           # created 0600: no window where others may connect
        try:
            sock.bind(self.path)
        except OSError:
            sock.close()
            raise
        finally:
            os.umask(old_umask)
        sock.listen(16)
        self.sock = sock
        self._inode = os.stat(self.path).st_ino
        self._acceptor = gevent.spawn(self._accept_loop)
        log.info("listening name=control addr=%s", self.path)

    def _remove_stale(self) -> None:
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise OSError(f"control socket path {self.path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.settimeout(1.0)
            probe.connect(self.path)
        except OSError:
            os.unlink(self.path)               # nobody listens: left over by a crash
            log.info("removed stale control socket path=%s", self.path)
            return
        finally:
            probe.close()
        raise OSError(f"control socket {self.path} is in use: is another imd running?")

    def stop(self) -> None:
        """Stop accepting, end the control connections, remove the socket file (if ours)."""
        if self._acceptor is not None:
            self._acceptor.kill(block=False)
            self._acceptor = None
        if self.sock is not None:
            self.sock.close()
            self.sock = None
            try:
                if os.stat(self.path).st_ino == self._inode:
                    os.unlink(self.path)
            except FileNotFoundError:
                pass
        for g in list(self._conns):
            if g is not gevent.getcurrent():
                g.kill(block=False)

    def _accept_loop(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError as e:
                log.warning("control accept failed error=%s", e)
                gevent.sleep(0.1)
                continue
            g = gevent.spawn(self._serve, conn)
            self._conns.add(g)
            g.link(self._conns.discard)

    # -- one connection ------------------------------------------------------------
    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(IDLE_TIMEOUT)
        rfile = conn.makefile("rb")
        try:
            while True:
                line = rfile.readline(MAX_LINE + 1)
                if not line:
                    return
                if len(line) > MAX_LINE and not line.endswith(b"\n"):
                    conn.sendall(_error(f"request longer than {MAX_LINE} bytes; closing"))
                    return
                if not line.strip():
                    continue
                conn.sendall(self.handle_line(line))
        except (OSError, socket.timeout):
            pass
        finally:
            rfile.close()
            conn.close()

    def handle_line(self, line: bytes) -> bytes:
        """One request line → one response line (both JSON)."""
        try:
            req = orjson.loads(line)
        except orjson.JSONDecodeError:
            return _error("request is not valid JSON")
        if not isinstance(req, dict) or not isinstance(req.get("cmd"), str):
            return _error('request must be an object with a "cmd" string')
        cmd = req["cmd"]
        handler = COMMANDS.get(cmd)
        if handler is None:
            return _error(f'unknown command "{cmd[:40]}" (commands: {", ".join(sorted(COMMANDS))})')
        log.log(logging.DEBUG if cmd in READ_ONLY else logging.INFO, "control command cmd=%s", cmd)
        try:
            result = handler(self, req)
        except CommandError as e:
            return _error(str(e))
        except Exception as e:
            log.exception("control command failed cmd=%s", cmd)
            return _error(f"internal error: {e}")
        return orjson.dumps({"ok": True, "result": result}) + b"\n"

    # -- commands -----------------------------------------------------------------
    def cmd_status(self, req: dict) -> dict:
        d = self.daemon
        by_protocol: dict = {}
        by_source: dict = {}
        total = 0
        for s in d.node.all_sessions():
            total += 1
            by_protocol[s.protocol] = by_protocol.get(s.protocol, 0) + 1
            by_source[s.source] = by_source.get(s.source, 0) + 1
        store = dict(d.store.stats())
        store["backend"] = d.cfg.store.backend
        return {
            "version": __version__, "pid": os.getpid(), "node": d.cfg.node.id,
            "state": d.state, "uptime": round(time.time() - d.started, 3), "started": int(d.started),
            "fastpath": IMPL, "config": d.cfg.source, "log_level": log_mod.level(),
            "listeners": {l.name: "%s:%d" % l.address[:2] for l in d.listeners},
            "accepted": {l.name: l.accepted for l in d.listeners},
            "connections": {"total": total, "by_protocol": by_protocol, "by_source": by_source},
            "users": len(d.node.sessions),
            "store": store, "engine": d.node.engine.state(),
            "process": _process_stats(),
        }

    def cmd_sessions(self, req: dict) -> dict:
        user = req.get("user")
        limit = req.get("limit", SESSIONS_LIMIT)
        if user is not None and not isinstance(user, str):
            raise CommandError('"user" must be a string')
        if not isinstance(limit, int) or limit < 0:
            raise CommandError('"limit" must be a non-negative integer')
        node = self.daemon.node
        pool = node.sessions_of(user) if user is not None else node.all_sessions()
        out, total = [], 0
        for s in pool:
            total += 1
            if len(out) < limit:
                out.append(s.describe())
        return {"total": total, "sessions": out}

    def cmd_kick(self, req: dict) -> dict:
        user = req.get("user")
        if not isinstance(user, str) or not user:
            raise CommandError('kick needs "user"')
        closed = self.daemon.router.kick(user, "kicked by the operator")
        log.info("kicked user=%s sessions=%d", user, closed)
        return {"user": user, "closed": closed}

    def cmd_reload(self, req: dict) -> dict:
        try:
            diff = self.daemon.reload()
        except config_mod.ConfigError as e:
            raise CommandError(f"reload refused, the running configuration is kept: {e}") from None
        applied = [_change(c) for c in diff if c[3]]
        restart = [_change(c) for c in diff if not c[3]]
        return {"config": self.daemon.cfg.source, "applied": applied, "restart_needed": restart}

    def cmd_drain(self, req: dict) -> dict:
        if self.daemon.state != "running":
            raise CommandError(f"cannot drain: the daemon is {self.daemon.state}")
        self.daemon.post("term")
        return {"draining": True, "sessions": self.daemon.node.count()}

    def cmd_metrics(self, req: dict) -> dict:
        return {"text": self.daemon.metrics.render()}

    def cmd_log_level(self, req: dict) -> dict:
        level = req.get("level")
        if not isinstance(level, str):
            raise CommandError('log-level needs "level"')
        old = log_mod.level()
        try:
            log_mod.set_level(level)
        except ValueError as e:
            raise CommandError(str(e)) from None
        log.warning("log level changed old=%s new=%s", old, level)
        return {"old": old, "level": level}


COMMANDS = {"status": ControlServer.cmd_status, "sessions": ControlServer.cmd_sessions,
            "kick": ControlServer.cmd_kick, "reload": ControlServer.cmd_reload,
            "drain": ControlServer.cmd_drain, "log-level": ControlServer.cmd_log_level,
            "metrics": ControlServer.cmd_metrics}


def _error(reason: str) -> bytes:
    return orjson.dumps({"ok": False, "error": reason}) + b"\n"


def _change(c: tuple) -> dict:
    key, old, new, _live = c
    if key in config_mod.SECRET_KEYS:
        old = new = "<hidden>"
    return {"key": key, "old": old, "new": new}


def _process_stats() -> dict:
    """Resident memory and open descriptors (from /proc; 0 where unavailable)."""
    return {"rss_bytes": rss_bytes(), "fds": open_fds(), "max_fds": max_fds()}
