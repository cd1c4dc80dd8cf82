"""The ``imd-admin`` console script: talk to a running imd over its control socket.

    imd-admin [-s SOCKET | -c CONFIG] [--json] COMMAND
      status                   version, uptime, connections by protocol and client source,
                               store queue, engine state, fast path in use
      sessions [--user U] [--limit N]
      kick USER                close every session of USER (on every node)
      reload                   re-read the config file; show what changed and what needs a restart
      drain [--wait]           tell every client to reconnect elsewhere, flush, exit (like SIGTERM)
      log-level LEVEL          debug | info | warning | error (until the next restart or reload)
      metrics                  the Prometheus text of /metrics, without the admin port

The socket is found from ``-s``, else ``listen.control`` of ``-c CONFIG`` (a
relative path there is relative to the current directory), else of
``etc/imd.toml`` if that file exists, else ``/run/imd/imd.sock`` if it exists,
else ``./var/imd.sock``. Tables by default; ``--json`` prints the daemon's
answer as JSON for scripts.

Exit codes: 0 done, 1 the daemon refused the command, 2 usage or config error,
3 the daemon cannot be reached (not running, wrong socket, no permission).
Plain blocking sockets; imports no gevent.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from typing import Any

import orjson

DEFAULT_CONFIG = "etc/imd.toml"
SYSTEMD_SOCKET = "/run/imd/imd.sock"
FALLBACK_SOCKET = "./var/imd.sock"


class Unreachable(Exception):
    """The control socket cannot be reached."""


class Refused(Exception):
    """The daemon answered with an error."""


# -- talking to the daemon -----------------------------------------------------------
def request(path: str, req: dict, timeout: float = 30.0) -> Any:
    """Send one request, return its ``result``; raises Unreachable or Refused."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(path)
        except FileNotFoundError:
            raise Unreachable(f"no control socket at {path}: is imd running? (choose the socket with -s or -c)") from None
        except ConnectionRefusedError:
            raise Unreachable(f"nothing listens on {path}: imd is not running (stale socket)") from None
        except PermissionError:
            raise Unreachable(f"permission denied on {path}: the socket is mode 0600, "
                              "run imd-admin as the user imd runs as (or root)") from None
        except OSError as e:
            raise Unreachable(f"cannot connect to {path}: {e.strerror or e}") from None
        try:
            sock.sendall(orjson.dumps(req) + b"\n")
            line = sock.makefile("rb").readline()
        except socket.timeout:
            raise Unreachable(f"no answer from imd on {path} within {timeout:g}s") from None
        except OSError as e:
            raise Unreachable(f"connection to {path} failed: {e.strerror or e}") from None
    finally:
        sock.close()
    if not line:
        raise Unreachable(f"imd closed the control connection on {path} without answering")
    try:
        resp = orjson.loads(line)
    except orjson.JSONDecodeError:
        raise Unreachable(f"unreadable answer on {path}: {line[:80]!r}") from None
    if not resp.get("ok"):
        raise Refused(resp.get("error") or "unknown error")
    return resp.get("result")


def find_socket(sock: str | None, config: str | None) -> str:
    """The control socket path chosen by the rules in the module docstring."""
    if sock:
        return sock
    if config is None and os.path.exists(DEFAULT_CONFIG):
        config = DEFAULT_CONFIG
    if config is not None:
        from imd.config import load
        cfg = load(config)
        if not cfg.listen.control:
            from imd.config import ConfigError
            raise ConfigError("listen.control", f'is "" in {config}: the control socket is disabled')
        return cfg.path(cfg.listen.control)
    if os.path.exists(SYSTEMD_SOCKET):
        return SYSTEMD_SOCKET
    return FALLBACK_SOCKET


# -- human output ---------------------------------------------------------------------
def _duration(seconds: float) -> str:
    s = int(seconds)
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    return (f"{d}d" if d else "") + (f"{h}h" if d or h else "") + f"{m:02d}m{s:02d}s"


def _counts(d: dict) -> str:
    return "  ".join(f"{k} {v}" for k, v in sorted(d.items(), key=lambda kv: (-kv[1], kv[0]))) or "-"


def table(rows: list[list], header: list[str]) -> str:
    """Left-aligned columns separated by two spaces."""
    cells = [header] + [["-" if v is None else str(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells)


def show_status(r: dict) -> str:
    conns, store, engine, proc = r["connections"], r["store"], r["engine"], r.get("process", {})
    lines = [
        f"imd {r['version']}  node {r['node']}  pid {r['pid']}  {r['state']}  up {_duration(r['uptime'])}"
        f"  fastpath {r['fastpath']}",
        f"config      {r['config'] or '(defaults)'}  log level {r['log_level']}",
        "listeners   " + ("  ".join(f"{n} {a} (accepted {r['accepted'].get(n, 0)})"
                                    for n, a in sorted(r["listeners"].items())) or "-"),
        f"sessions    {conns['total']} of {r['users']} users",
        f"  protocol  {_counts(conns['by_protocol'])}",
        f"  source    {_counts(conns['by_source'])}",
        f"store       {store.get('backend')}  queue {store.get('queue', 0)}  committed {store.get('committed', 0)}"
        f" in {store.get('batches', 0)} batches  retries {store.get('retries', 0)}  failed {store.get('failed', 0)}",
        "engine      " + "  ".join(f"{k} {v}" for k, v in engine.items()),
    ]
    if proc:
        lines.append(f"process     rss {proc.get('rss_bytes', 0) / 1e6:.1f} MB  fds {proc.get('fds', '?')}"
                     f" of {proc.get('max_fds', '?')}")
    return "\n".join(lines)


def show_sessions(r: dict) -> str:
    now = time.time()
    rows = [[s["session"], s["user"], s["role"], s["platform"], s["device"], s["protocol"], s["status"],
             s["state"], s["seq"], _duration(max(0, now - s["since"]))] for s in r["sessions"]]
    out = table(rows, ["SESSION", "USER", "ROLE", "PLATFORM", "DEVICE", "PROTO", "STATUS", "STATE", "SEQ", "AGE"])
    shown = len(r["sessions"])
    footer = f"{r['total']} session(s)" + (f", {shown} shown (--limit)" if shown < r["total"] else "")
    return out + "\n" + footer if rows else footer


def show_reload(r: dict) -> str:
    if not r["applied"] and not r["restart_needed"]:
        return f"reloaded {r['config']}: no changes"
    lines = [f"reloaded {r['config']}"]
    for title, items in (("applied", r["applied"]), ("needs a restart", r["restart_needed"])):
        if items:
            lines.append(f"{title}:")
            lines.extend(f"  {c['key']}: {c['old']!r} -> {c['new']!r}" for c in items)
    return "\n".join(lines)


SHOW = {
    "status": show_status,
    "sessions": show_sessions,
    "kick": lambda r: f"kicked {r['user']}: {r['closed']} session(s) closed (all nodes)",
    "reload": show_reload,
    "drain": lambda r: f"draining: {r['sessions']} session(s) told to reconnect; imd exits when done",
    "log-level": lambda r: f"log level {r['old']} -> {r['level']}",
    "metrics": lambda r: r["text"].rstrip("\n"),
}


# -- command line -------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="print the answer as JSON")
    p = argparse.ArgumentParser(prog="imd-admin", parents=[common],
                                description="control a running imd through its control socket")
    where = p.add_mutually_exclusive_group()
    where.add_argument("-s", "--socket", metavar="SOCKET", help="control socket path")
    where.add_argument("-c", "--config", metavar="CONFIG", help="imd config file (its listen.control)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for an answer (default 30)")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    sub.add_parser("status", parents=[common], help="uptime, connections, store, engine, fast path")
    sp = sub.add_parser("sessions", parents=[common], help="list sessions (Session.describe())")
    sp.add_argument("--user", metavar="U", help="only the sessions of user U")
    sp.add_argument("--limit", type=int, default=1000, help="most sessions listed (default 1000)")
    kp = sub.add_parser("kick", parents=[common], help="close every session of a user")
    kp.add_argument("user", metavar="USER")
    sub.add_parser("reload", parents=[common], help="re-read the config file (like SIGHUP)")
    dp = sub.add_parser("drain", parents=[common], help="send clients away, flush and exit (like SIGTERM)")
    dp.add_argument("--wait", type=float, nargs="?", const=60.0, default=None, metavar="SECONDS",
                    help="wait until imd has exited (default up to 60 s)")
    lp = sub.add_parser("log-level", parents=[common], help="change the log level")
    lp.add_argument("level", choices=["debug", "info", "warning", "error"])
    sub.add_parser("metrics", parents=[common], help="print the Prometheus metrics")
    return p


def _request_of(args) -> dict:
    req: dict = {"cmd": args.cmd}
    if args.cmd == "sessions":
        req["limit"] = args.limit
        if args.user:
            req["user"] = args.user
    elif args.cmd == "kick":
        req["user"] = args.user
    elif args.cmd == "log-level":
        req["level"] = args.level
    return req


def _wait_gone(path: str, timeout: float) -> bool:
    """Poll until nothing listens on ``path`` (the daemon exited)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            request(path, {"cmd": "status"}, timeout=2.0)
        except Unreachable:
            return True
        except Refused:
            pass
        time.sleep(0.2)
    return False


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    as_json = getattr(args, "json", False)
    try:
        path = find_socket(args.socket, args.config)
    except Exception as e:             # ConfigError: a bad or missing config file
        print(f"imd-admin: {e}", file=sys.stderr)
        return 2
    try:
        result = request(path, _request_of(args), args.timeout)
    except Unreachable as e:
        print(f"imd-admin: {e}", file=sys.stderr)
        return 3
    except Refused as e:
        print(f"imd-admin: {args.cmd}: {e}", file=sys.stderr)
        return 1
    if as_json:
        sys.stdout.write(orjson.dumps(result, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS).decode() + "\n")
    else:
        print(SHOW[args.cmd](result))
    if args.cmd == "drain" and args.wait is not None:
        if not _wait_gone(path, args.wait):
            print(f"imd-admin: imd still running after {args.wait:g}s", file=sys.stderr)
            return 1
        if not as_json:
            print("imd has exited")
    return 0


if __name__ == "__main__":
    sys.exit(main())
