"""``imd --daemon``: detaches, holds the pidfile, refuses a second start, releases it on SIGTERM
(also on one that arrives while the pidfile is being written or the daemon is still importing:
held until the daemon's handlers exist, imd.signals).

Runs the real daemon (imd/daemon.py) on loopback port-0 listeners.
"""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from tests.daemon import alive

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def imd(*args):
    return subprocess.run([sys.executable, "-m", "imd", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": ROOT}, timeout=60)


# `imd --daemon` with a signal sent to itself at a chosen point of its boot, its pid recorded
# first: "write" right after python-daemon has written the pidfile (inside
# DaemonContext.open()); "orjson" inside orjson's module init (as it imports json), where an
# exception crashes the interpreter
SIGNAL_AT = textwrap.dedent("""
    import os, sys
    point, signum, pid_file = sys.argv[1], int(sys.argv[2]), sys.argv[3]

    def send():
        with open(pid_file, "w") as f:
            f.write(str(os.getpid()))
        os.kill(os.getpid(), signum)

    if point == "write":
        import lockfile.pidlockfile as lf
        write = lf.write_pid_to_pidfile
        def write_then_signal(path):
            write(path)
            send()
        lf.write_pid_to_pidfile = write_then_signal
    else:
        class SignalInOrjsonInit:
            def find_spec(self, name, path=None, target=None):
                if name == "json" and "orjson.orjson" in sys.modules:
                    sys.meta_path.remove(self)
                    send()
        sys.meta_path.insert(0, SignalInOrjsonInit())
    from imd.cli import main
    sys.exit(main(sys.argv[4:]))
""")


def loopback_config(tmp_path):
    f = tmp_path / "imd.toml"
    f.write_text(f'[node]\ndata_dir = "{tmp_path}/var"\n[listen]\nxmpp = "127.0.0.1:0"\ncomet = "127.0.0.1:0"\n'
                 f'tcp = "127.0.0.1:0"\nadmin = "127.0.0.1:0"\ncontrol = "{tmp_path}/imd.sock"\n'
                 f'[log]\nfile = "{tmp_path}/imd.log"\n')
    return str(f)


def wait_for(predicate, seconds=20.0):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_refuses_to_start_when_the_pidfile_is_held(tmp_path):
    pidfile = tmp_path / "imd.pid"
    pidfile.write_text(f"{os.getpid()}\n")           # held by this (live) test process
    out = imd("--daemon", "--pidfile", str(pidfile), "-c", loopback_config(tmp_path))
    assert out.returncode == 1
    assert f"pidfile {pidfile} is held by running process {os.getpid()}" in out.stderr
    assert pidfile.read_text() == f"{os.getpid()}\n"


def test_daemon_start_second_start_and_stop(tmp_path):
    pidfile = tmp_path / "imd.pid"
    pidfile.write_text("999999999\n")                # stale: no such process
    cfg = loopback_config(tmp_path)
    out = imd("--daemon", "--pidfile", str(pidfile), "-c", cfg)
    assert out.returncode == 0, out.stderr
    assert wait_for(lambda: pidfile.exists() and pidfile.read_text().strip() not in ("", "999999999"))
    pid = int(pidfile.read_text())
    try:
        assert alive(pid)
        again = imd("--daemon", "--pidfile", str(pidfile), "-c", cfg)
        assert again.returncode == 1 and "is held by running process" in again.stderr
        # the node is up (its control socket listens) before the signal: this test is about
        # the running daemon; a signal during boot: test_a_stop_signal_during_boot_...
        assert wait_for(lambda: (tmp_path / "imd.sock").exists())
    finally:
        os.kill(pid, signal.SIGTERM)
    assert wait_for(lambda: not alive(pid))
    assert wait_for(lambda: not pidfile.exists()), (tmp_path / "imd.log").read_text()[-4000:]


def start_with_signal_at(tmp_path, point, signum):
    """Start ``imd --daemon`` with ``signum`` sent at ``point`` (SIGNAL_AT); the daemon's pid."""
    daemon_pid = tmp_path / "daemon-pid"
    out = subprocess.run([sys.executable, "-c", SIGNAL_AT, point, str(int(signum)), str(daemon_pid),
                          "--daemon", "--pidfile", str(tmp_path / "imd.pid"), "-c", loopback_config(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT},
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert wait_for(lambda: daemon_pid.exists() and daemon_pid.read_text()), \
        f"no signal sent at {point!r} (did the boot's import order change?)"
    return int(daemon_pid.read_text())


def log_text(tmp_path):
    f = tmp_path / "imd.log"
    return f.read_text() if f.exists() else ""


@pytest.mark.parametrize("point,signum", [("write", signal.SIGTERM), ("write", signal.SIGINT),
                                          ("orjson", signal.SIGTERM)])
def test_a_stop_signal_during_boot_is_handled_after_it(tmp_path, point, signum):
    """A TERM or INT that arrives while python-daemon writes the pidfile, or while the
    daemon imports its modules, is held until the daemon's handlers exist: it stops the
    node right after its boot and the pidfile is released."""
    pid = start_with_signal_at(tmp_path, point, signum)
    assert wait_for(lambda: not alive(pid))
    assert not (tmp_path / "imd.pid").exists(), sorted(p.name for p in tmp_path.iterdir())
    name = signal.Signals(signum).name[3:]
    assert f"signal {name}" in log_text(tmp_path), log_text(tmp_path)[-4000:]


def test_a_hup_during_boot_reloads_after_it(tmp_path):
    """A HUP while the pidfile is being written is not fatal (its default action): the
    node boots, then reloads."""
    pid = start_with_signal_at(tmp_path, "write", signal.SIGHUP)
    try:
        assert wait_for(lambda: "reload done" in log_text(tmp_path)), log_text(tmp_path)[-4000:]
        assert alive(pid) and (tmp_path / "imd.sock").exists()
    finally:
        if alive(pid):
            os.kill(pid, signal.SIGTERM)
    assert wait_for(lambda: not alive(pid))
    assert wait_for(lambda: not (tmp_path / "imd.pid").exists())


# `imd` (foreground) with node.workers = 2, the first worker sending TERM to itself as its boot
# begins (once the master's handlers are gone from it, before its own exist)
WORKER_SIGNAL_AT_BOOT = textwrap.dedent("""
    import importlib.util, os, signal, sys
    flag = sys.argv[1]

    def signalled(run_worker):
        def run_worker_signalled(cfg, overrides):
            try:
                fd = os.open(flag, os.O_CREAT | os.O_EXCL | os.O_WRONLY)    # the first worker only
            except FileExistsError:
                return run_worker(cfg, overrides)
            os.write(fd, str(os.getpid()).encode())
            os.close(fd)
            os.kill(os.getpid(), signal.SIGTERM)
            return run_worker(cfg, overrides)
        return run_worker_signalled

    class WrapRunWorker:
        def find_spec(self, name, path=None, target=None):
            if name != "imd.daemon":
                return None
            sys.meta_path.remove(self)
            spec = importlib.util.find_spec(name)
            exec_module = spec.loader.exec_module
            def exec_and_wrap(module):
                exec_module(module)
                module.run_worker = signalled(module.run_worker)
            spec.loader.exec_module = exec_and_wrap
            return spec
    sys.meta_path.insert(0, WrapRunWorker())
    from imd.cli import main
    sys.exit(main(sys.argv[2:]))
""")


def test_a_worker_handles_a_term_that_arrives_during_its_boot(tmp_path):
    """node.workers > 1: a worker's TERM between the fork and its own handlers is held
    (the master holds the signals across the fork): the worker drains and exits (code 0,
    the master starts it again), instead of dying of the signal's default action."""
    import uuid
    cfg = tmp_path / "imd.toml"
    cfg.write_text(f'[node]\nworkers = 2\ndata_dir = "{tmp_path}/var"\n'
                   f'[engine]\nbackend = "redis"\nurl = "redis://127.0.0.1:6379/13"\n'
                   f'prefix = "imdsig:{uuid.uuid4().hex[:8]}:"\n'
                   f'[listen]\nxmpp = "127.0.0.1:0"\ncomet = "127.0.0.1:0"\ntcp = "127.0.0.1:0"\n'
                   f'admin = "127.0.0.1:0"\ncontrol = "{tmp_path}/imd.sock"\n'
                   f'[log]\nfile = "{tmp_path}/imd.log"\n')
    flag = tmp_path / "signalled-worker"
    master = subprocess.Popen([sys.executable, "-c", WORKER_SIGNAL_AT_BOOT, str(flag), "-c", str(cfg)],
                              cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT},
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        assert wait_for(lambda: flag.exists() and flag.read_text(), 60), log_text(tmp_path)[-4000:]
        ended = f"pid={flag.read_text()} "

        def died():         # the master's line on the signalled worker's end
            return next((line for line in log_text(tmp_path).splitlines()
                         if "worker died" in line and ended in line), None)
        assert wait_for(died, 60), log_text(tmp_path)[-4000:]
        assert f"{ended}code 0" in died(), log_text(tmp_path)[-4000:]      # not "signal 15"
        assert "imd.daemon signal TERM" in log_text(tmp_path)
    finally:
        master.terminate()
        assert master.wait(60) == 0, master.stderr.read().decode()[-4000:]
