"""Start imd as a real subprocess for integration tests.

Two helpers: :class:`Imd` (integration tests) and :class:`DaemonProcess` (the
operations tests: log file, control socket, signals, reloads; see below).

    d = Imd(tmp_path, {"presence": {"grace": 0.3}})   # overrides of the test config
    d.start()                  # waits for the "ready" line; d.addr["tcp"] = (host, port)
    c = d.client()             # imd.client.Client on the raw-TCP listener
    d.kill()                   # SIGKILL; d.start() again reuses the same data_dir
    d.stop()                   # SIGTERM and wait

Every listener binds 127.0.0.1:0 unless the overrides say otherwise; the bound
addresses are read from the daemon's ``listening name=X addr=H:P`` log lines.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from imd.auth import issue
from imd.client import Client

RUNNING: set = set()      # every daemon process started here; tests/conftest.py kills leftovers


def spawn(args, **kw) -> subprocess.Popen:
    """Start a daemon subprocess and remember it, so a failing test cannot leak it."""
    proc = subprocess.Popen(args, **kw)
    RUNNING.add(proc)
    return proc


def kill_leftovers() -> None:
    for proc in list(RUNNING):
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        RUNNING.discard(proc)

SECRET = "test-secret-of-at-least-32-bytes!!"
LISTEN_RE = re.compile(r"listening name=(\w+) addr=(\S+):(\d+)")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_config(path: str, data_dir: str, overrides: dict | None = None) -> str:
    cfg = {
        "node": {"id": "t1", "data_dir": data_dir},
        "auth": {"secret": SECRET},
        "listen": {"tcp": "127.0.0.1:0", "comet": "", "xmpp": "", "admin": "", "control": ""},
        "presence": {"grace": 0.3},
        "limits": {"msg_rate": 0},        # tests send as fast as they can; test_limits sets it
        "log": {"level": "info"},
    }
    if os.environ.get("IMD_TEST_ENGINE") == "redis":     # the same tests over the cluster bus
        cfg["engine"] = {"backend": "redis", "url": os.environ.get("IMD_TEST_REDIS", "redis://127.0.0.1:6379/13"),
                         "prefix": "t%d:" % os.getpid()}
    for sec, vals in (overrides or {}).items():
        cfg.setdefault(sec, {}).update(vals)
    with open(path, "w") as f:
        for sec, vals in cfg.items():
            f.write(f"[{sec}]\n")
            for k, v in vals.items():
                f.write(f"{k} = {_toml_value(v)}\n")
    return path


def token(user: str, role: str = "guest", ttl: int = 3600, **kw) -> str:
    return issue(SECRET, user, role, ttl, **kw)


class Imd:
    def __init__(self, tmp_path, overrides: dict | None = None, env: dict | None = None) -> None:
        self.dir = str(tmp_path)
        self.data_dir = os.path.join(self.dir, "var")
        self.config = write_config(os.path.join(self.dir, "imd.toml"), self.data_dir, overrides)
        self.env = dict(os.environ, PYTHONPATH=ROOT, **(env or {}))
        self.proc = None
        self.addr: dict = {}
        self.lines: list = []
        self._reader = None

    def start(self, timeout: float = 20.0) -> "Imd":
        self.addr = {}
        ready = threading.Event()
        self.proc = spawn([sys.executable, "-m", "imd", "-c", self.config], cwd=self.dir,
                                     env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

        def read(proc=self.proc):
            for line in proc.stdout:
                self.lines.append(line.rstrip("\n"))
                m = LISTEN_RE.search(line)
                if m:
                    self.addr[m.group(1)] = (m.group(2), int(m.group(3)))
                if " ready " in line or line.rstrip().endswith("ready") or "ready node=" in line:
                    ready.set()
            ready.set()

        self._reader = threading.Thread(target=read, daemon=True)
        self._reader.start()
        if not ready.wait(timeout) or self.proc.poll() is not None:
            raise RuntimeError("imd did not start:\n" + "\n".join(self.lines[-30:]))
        return self

    def client(self, proto: str = "tcp") -> Client:
        host, port = self.addr[proto]
        return Client(host, port)

    def login(self, user: str, role: str = "guest", platform: str = "android", device: str = "d1",
              since: int | None = None) -> Client:
        c = self.client()
        c.auth(token(user, role), platform, device, since)
        return c

    def log_text(self) -> str:
        return "\n".join(self.lines)

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self._join()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._join()
        return self.proc.returncode

    def _join(self) -> None:
        if self._reader is not None:
            self._reader.join(5)
            self._reader = None


# -- the operations tests' helper (tests/test_control.py, test_signals.py, test_systemd.py) --
# DaemonProcess keeps the daemon's output in a file (``log()``, ``wait_log()``), runs
# imd-admin on its control socket (``admin()``), sends any signal (``kill(sig)``),
# rewrites its config for reloads (``write_config``) and can pass NOTIFY_SOCKET and the
# like (``env``):
#
#     d = start_daemon(tmp_path, {"limits": {"heartbeat": 20}})
#     host, port = d.addrs["tcp"]
#     d.admin("status", "--json")
#     d.stop()
#
# Only the raw-TCP listener is on by default; the control socket lives in a short
# temporary directory (unix socket paths are limited to 108 bytes).

START_TIMEOUT = 20.0
_LISTENING = re.compile(r"listening name=(\w+) addr=([^\s\"]+)")


def toml_text(config: dict) -> str:
    out = []
    for section, table in config.items():
        out.append(f"[{section}]")
        out.extend(f"{k} = {_toml_value(v)}" for k, v in table.items())
        out.append("")
    return "\n".join(out)


def merge(base: dict, overrides: dict | None) -> dict:
    merged = {s: dict(t) for s, t in base.items()}
    for section, table in (overrides or {}).items():
        merged.setdefault(section, {}).update(table)
    return merged


def env_for_imd(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    for key in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        env.pop(key, None)
    env.update(extra or {})
    return env


class DaemonProcess:
    """A running imd subprocess and what it printed."""

    def __init__(self, workdir, config: dict, env: dict | None = None) -> None:
        self.workdir = Path(workdir)
        self.sockdir = tempfile.mkdtemp(prefix="imd-", dir="/tmp")
        self.control = os.path.join(self.sockdir, "imd.sock")
        self.config_path = self.workdir / "imd.toml"
        self.log_path = self.workdir / "imd.log"
        self.base = merge({
            "node": {"data_dir": str(self.workdir / "var")},
            "auth": {"secret": SECRET},
            "listen": {"xmpp": "", "comet": "", "admin": "", "tcp": "127.0.0.1:0", "control": self.control},
            "limits": {"msg_rate": 0},
        }, config)
        self.write_config()
        self.env = env
        self.proc = None
        self.addrs: dict[str, tuple[str, int]] = {}

    # -- lifecycle ---------------------------------------------------------------
    def write_config(self, overrides: dict | None = None, text: str | None = None) -> None:
        """Rewrite the config file (the base config plus ``overrides``, or raw ``text``)."""
        self.config_path.write_text(text if text is not None else toml_text(merge(self.base, overrides)))

    def start(self, timeout: float = START_TIMEOUT, wait_ready: bool = True) -> "DaemonProcess":
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        logf = open(self.log_path, "ab")
        self.proc = spawn([sys.executable, "-m", "imd", "-c", str(self.config_path)],
                                     cwd=self.workdir, stdout=logf, stderr=subprocess.STDOUT,
                                     env=env_for_imd(self.env))
        logf.close()
        if wait_ready:
            self.wait_log(r"ready node=", timeout)
            self.addrs = {}
            for name, addr in _LISTENING.findall(self.log()):
                if name != "control":
                    host, _, port = addr.rpartition(":")
                    self.addrs[name] = (host.strip("[]"), int(port))
        return self

    def log(self) -> str:
        """What this run of the daemon printed so far."""
        data = self.log_path.read_bytes()[self._log_offset:]
        return data.decode("utf-8", "replace")

    def wait_log(self, pattern: str, timeout: float = 10.0, after: int = 0) -> re.Match:
        """Wait for ``pattern`` (a regex) in the log, from character ``after`` on."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            m = rx.search(self.log(), after)
            if m:
                return m
            if self.proc.poll() is not None:
                raise RuntimeError(f"imd exited ({self.proc.returncode}) before {pattern!r}:\n{self.log()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {pattern!r} in the imd log within {timeout}s:\n{self.log()}")
            time.sleep(0.02)

    def kill(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 30.0) -> int:
        return self.proc.wait(timeout)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Signal the daemon (TERM by default) and wait for it; kill it if it hangs."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.sockdir, ignore_errors=True)

    # -- helpers --------------------------------------------------------------------
    def admin(self, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess:
        """Run ``imd-admin -s <control> ARGS`` and return the finished process."""
        return run_admin("-s", self.control, *args, timeout=timeout)

    def client(self, user: str, role: str = "guest", platform: str = "android", device: str = "d1",
               since: int | None = None, secret: str = SECRET):
        """A connected and authenticated imd.client.Client on the tcp listener."""
        host, port = self.addrs["tcp"]
        c = Client(host, port)
        c.auth(issue(secret, user, role), platform=platform, device=device, since=since)
        return c


def run_admin(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess:
    """Run ``imd-admin ARGS`` (as ``python -m imd.admin_cli``) and return the finished process."""
    return subprocess.run([sys.executable, "-m", "imd.admin_cli", *args],
                          capture_output=True, text=True, timeout=timeout, env=env_for_imd())


def start_daemon(workdir, overrides: dict | None = None, env: dict | None = None) -> DaemonProcess:
    """Write a config from ``overrides`` into ``workdir`` and start imd; waits until ready."""
    return DaemonProcess(workdir, overrides or {}, env).start()
