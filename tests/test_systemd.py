"""systemd integration: the unit verifies, sd_notify datagrams reach a test NOTIFY_SOCKET,
the sysv script runs imd in --daemon mode, logrotate's postrotate reopens the log.

This container has no systemd as PID 1, so the unit is checked with
``systemd-analyze verify`` (Debian's systemd package) and imd is run with the
environment systemd would give it (NOTIFY_SOCKET, WATCHDOG_USEC).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from imd import sdnotify
from tests.daemon import ROOT, Imd, SECRET, env_for_imd, toml_text

UNIT = Path(ROOT, "init", "imd.service")
SYSV = Path(ROOT, "init", "imd.sysv")
LOGROTATE = Path(ROOT, "init", "imd.logrotate")


def unit_settings() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


# -- the unit --------------------------------------------------------------------------
@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="apt-get install systemd")
def test_unit_passes_systemd_analyze_verify(tmp_path):
    # verify checks that ExecStart's binary exists: point /opt/imd/bin/imd at a shim
    # that runs this checkout; every other line is verified as shipped.
    shim = tmp_path / "imd"
    shim.write_text(f"#!/bin/sh\nexec {sys.executable} -m imd \"$@\"\n")
    shim.chmod(0o755)
    unit = tmp_path / "imd.service"
    unit.write_text(UNIT.read_text().replace("/opt/imd/bin/imd", str(shim)))
    r = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stderr.strip() == "", r.stderr                # no warnings either


def test_unit_settings():
    s = unit_settings()
    one = {k: v[-1] for k, v in s.items()}
    assert one["Type"] == "notify"
    assert int(one["WatchdogSec"]) > 0
    assert one["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert int(one["LimitNOFILE"]) >= 65536
    assert one["RuntimeDirectory"] == "imd"                 # /run/imd/imd.sock
    assert one["KillSignal"] == "SIGTERM"
    from imd.daemon import DRAIN_TIMEOUT
    assert int(one["TimeoutStopSec"]) > DRAIN_TIMEOUT       # the drain finishes before SIGKILL
    for key in ("NoNewPrivileges", "PrivateTmp", "ProtectHome", "PrivateDevices"):
        assert one[key] == "yes", key
    assert one["ProtectSystem"] == "strict"
    assert "/var/lib/imd" in one["ReadWritePaths"].split()
    assert one["ExecStart"].startswith("/opt/imd/bin/imd -c /etc/imd/imd.toml")


# -- sd_notify ------------------------------------------------------------------------------
class NotifySocket:
    """A unix datagram socket like systemd's notify socket."""

    def __init__(self, abstract: bool = False) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.dir = None
        if abstract:
            name = "imd-test-notify-%d-%d" % (os.getpid(), time.monotonic_ns())
            self.sock.bind("\0" + name)
            self.env = "@" + name
        else:
            self.dir = tempfile.mkdtemp(prefix="imd-n-", dir="/tmp")
            path = os.path.join(self.dir, "notify")
            self.sock.bind(path)
            self.env = path
        self.fields: list[str] = []

    def wait_for(self, field: str, timeout: float = 20.0, count: int = 1) -> list[str]:
        """Receive datagrams until ``field`` has been seen ``count`` times in all."""
        deadline = time.monotonic() + timeout
        while self.fields.count(field) < count:
            left = deadline - time.monotonic()
            assert left > 0, f"no {field!r} x{count} from imd; got {self.fields}"
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(4096)
            except socket.timeout:
                continue
            self.fields.extend(data.decode().split("\n"))
        return self.fields

    def close(self) -> None:
        self.sock.close()
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_ready_status_watchdog_datagrams(tmp_path, abstract):
    ns = NotifySocket(abstract)
    d = Imd(tmp_path, {}, env={"NOTIFY_SOCKET": ns.env, "WATCHDOG_USEC": "200000"})
    try:
        d.start()
        fields = ns.wait_for("READY=1")
        assert fields[0].startswith("STATUS=starting")
        ready = fields.index("READY=1")
        assert any(f.startswith("STATUS=running: 0 sessions") for f in fields[ready:])
        assert "listening name=tcp" in d.log()          # READY came after the listeners
        ns.wait_for("WATCHDOG=1", count=3)                # every WATCHDOG_USEC/2
        c = d.login("someone")
        deadline = time.monotonic() + 20
        while not any(f.startswith("STATUS=running: 1 sessions") for f in ns.fields):
            ns.wait_for("WATCHDOG=1", count=ns.fields.count("WATCHDOG=1") + 1)
            assert time.monotonic() < deadline
        d.kill(signal.SIGHUP)
        ns.wait_for("RELOADING=1")
        ns.wait_for("READY=1", count=2)
        d.kill(signal.SIGTERM)
        ns.wait_for("STOPPING=1")
        assert d.wait(30) == 0
        c.close()
    finally:
        d.stop()
        d.cleanup()
        ns.close()


def test_watchdog_interval(monkeypatch):
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    assert sdnotify.watchdog_interval() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert sdnotify.watchdog_interval() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", "1")                # meant for another process
    assert sdnotify.watchdog_interval() is None
    monkeypatch.delenv("WATCHDOG_PID")
    for bad in ("0", "", "abc", "-5"):
        monkeypatch.setenv("WATCHDOG_USEC", bad)
        assert sdnotify.watchdog_interval() is None


def test_notify_without_socket_is_a_no_op(monkeypatch, tmp_path):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sdnotify.notify("READY=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    assert sdnotify.notify("READY=1") is False


# -- --daemon mode: the sysv script and logrotate -------------------------------------------------
def test_sysv_script_and_logrotate(tmp_path):
    sockdir = tempfile.mkdtemp(prefix="imd-sv-", dir="/tmp")
    logdir = tmp_path / "log"
    logdir.mkdir()
    config = tmp_path / "imd.toml"
    config.write_text(toml_text({
        "node": {"data_dir": "data"},
        "auth": {"secret": SECRET},
        "listen": {"xmpp": "", "comet": "", "admin": "", "tcp": "127.0.0.1:0",
                   "control": os.path.join(sockdir, "imd.sock")},
        "log": {"file": str(logdir / "imd.log")},
    }))
    py = sys.executable
    env = env_for_imd({
        "IMD_BIN": f"{py} -m imd", "IMD_ADMIN": f"{py} -m imd.admin_cli", "IMD_CONFIG": str(config),
        "IMD_DIR": str(tmp_path), "IMD_RUNDIR": sockdir, "IMD_USER": "",
    })
    pidfile = os.path.join(sockdir, "imd.pid")

    def sysv(action):
        return subprocess.run(["sh", str(SYSV), action], capture_output=True, text=True, env=env, timeout=120)

    try:
        r = sysv("start")
        assert r.returncode == 0, r.stdout + r.stderr
        pid = int(Path(pidfile).read_text())
        assert r.stdout.strip() == f"Starting imd: imd (pid {pid})."
        st = sysv("status")
        assert st.returncode == 0 and f"imd is running (pid {pid})" in st.stdout and f"pid {pid}  running" in st.stdout
        assert sysv("start").stdout.strip() == f"imd is already running (pid {pid})"
        assert (tmp_path / "data" / "imd.sqlite3").exists()        # relative to IMD_DIR

        r = sysv("reload")
        assert r.returncode == 0 and "reloading" in r.stdout
        log = logdir / "imd.log"
        deadline = time.monotonic() + 20
        while "reload done" not in log.read_text():
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)

        if shutil.which("logrotate"):
            conf = tmp_path / "logrotate.conf"
            conf.write_text(LOGROTATE.read_text().replace("/var/log/imd", str(logdir))
                            .replace("/run/imd/imd.pid", pidfile).replace("su imd imd", "su root root"))
            r = subprocess.run(["logrotate", "-f", "-s", str(tmp_path / "lr.state"), str(conf)],
                               capture_output=True, text=True, timeout=60)
            assert r.returncode == 0, r.stdout + r.stderr
            assert (logdir / "imd.log.1").exists()
            deadline = time.monotonic() + 20
            while not (log.exists() and "log file reopened" in log.read_text()):
                assert time.monotonic() < deadline
                time.sleep(0.05)

        r = sysv("stop")
        assert r.returncode == 0 and r.stdout.strip() == "Stopping imd (draining): done."
        assert not os.path.exists(pidfile)
        assert sysv("status").returncode == 3
        assert sysv("stop").stdout.strip() == "imd is not running"
    finally:
        if os.path.exists(pidfile):
            try:
                os.kill(int(Path(pidfile).read_text()), signal.SIGKILL)
            except (OSError, ValueError):
                pass
        shutil.rmtree(sockdir, ignore_errors=True)


def test_sysv_start_fails_cleanly_on_a_bad_config(tmp_path):
    config = tmp_path / "imd.toml"
    config.write_text("[limits]\nheartbeat = 0\n")
    env = env_for_imd({"IMD_BIN": f"{sys.executable} -m imd", "IMD_ADMIN": f"{sys.executable} -m imd.admin_cli",
                       "IMD_CONFIG": str(config), "IMD_DIR": str(tmp_path), "IMD_RUNDIR": str(tmp_path / "run"),
                       "IMD_USER": ""})
    r = subprocess.run(["sh", str(SYSV), "start"], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode != 0
    assert "limits.heartbeat" in r.stderr
