"""The ``imd`` console script: parse arguments, load the config, start the daemon.

    imd [-c FILE]                       run in the foreground (default FILE: etc/imd.toml)
    imd --check-config [-c FILE]        validate FILE: "config OK: FILE" and exit 0, or the error and exit 2
    imd --version                       "imd <version> (fastpath: cython|python)"
    imd --daemon [--pidfile PATH]       detach (python-daemon), holding PATH (default <node.data_dir>/imd.pid)

--version and --check-config stay light: they never import gevent. For a run,
the process detaches first (when --daemon), then gevent monkey-patches (so the
hub is created after the fork), and only then is imd.daemon imported. The signals
imd handles are held from before the fork until imd.daemon has installed its
handlers (imd.signals): one that arrives during boot is handled right after it.
Exit codes: 0 clean stop, 1 could not start (pidfile held, ...), 2 bad config or usage.
"""

from __future__ import annotations

import argparse
import os
import sys

from imd import __version__, signals

DEFAULT_CONFIG = "etc/imd.toml"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="imd", description="imd instant-messaging daemon")
    p.add_argument("-c", "--config", default=DEFAULT_CONFIG, metavar="FILE",
                   help=f"TOML configuration file (default: {DEFAULT_CONFIG})")
    p.add_argument("--check-config", action="store_true", help="validate the configuration and exit")
    p.add_argument("--version", action="store_true", help="print the version and the fast-path implementation")
    p.add_argument("--daemon", action="store_true", help="detach from the terminal and run in the background")
    p.add_argument("--pidfile", metavar="PATH",
                   help="with --daemon: pid file to hold (default: <node.data_dir>/imd.pid)")
    return p


def _version() -> str:
    from imd.fastpath import IMPL
    return f"imd {__version__} (fastpath: {IMPL})"


def _pidfile_holder(path: str) -> int | None:
    """The pid of a live process holding ``path``, or None (a stale file is removed)."""
    from daemon.pidfile import TimeoutPIDLockFile
    lock = TimeoutPIDLockFile(path)
    pid = lock.read_pid()
    if pid is None:
        if lock.is_locked():          # unreadable or garbage content
            lock.break_lock()
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        lock.break_lock()
        return None
    except PermissionError:
        pass                          # alive, owned by someone else
    return pid


def _daemon_context(pidfile: str):
    """A DaemonContext holding ``pidfile`` (acquired without waiting) and keeping the
    working directory (relative config paths stay valid). Its SIGTERM handler is
    never reached: TERM is held until imd.daemon has installed its own."""
    import daemon
    from daemon.pidfile import TimeoutPIDLockFile
    return daemon.DaemonContext(working_directory=os.getcwd(), umask=0o022,
                                pidfile=TimeoutPIDLockFile(pidfile, acquire_timeout=0))


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.version:
        print(_version())
        return 0
    if args.pidfile and not args.daemon:
        _parser().error("--pidfile needs --daemon")

    from imd.config import ConfigError, load
    try:
        cfg = load(args.config)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 2
    if args.check_config:
        print(f"config OK: {args.config}")
        return 0

    signals.hold()            # until imd.daemon's handlers exist (it releases them)
    context = None
    if args.daemon:
        pidfile = os.path.abspath(args.pidfile or os.path.join(cfg.node.data_dir, "imd.pid"))
        os.makedirs(os.path.dirname(pidfile), exist_ok=True)
        holder = _pidfile_holder(pidfile)
        if holder is not None:
            print(f"imd: not starting: pidfile {pidfile} is held by running process {holder}", file=sys.stderr)
            return 1
        context = _daemon_context(pidfile)
        context.open()        # forks and detaches; from here on stdio is /dev/null

    try:
        from gevent import monkey
        monkey.patch_all()
        from imd.daemon import run
        return run(cfg)
    finally:
        if context is not None:
            context.close()


if __name__ == "__main__":
    sys.exit(main())
