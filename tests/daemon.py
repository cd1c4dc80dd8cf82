"""Start imd as a real subprocess for tests: :class:`Imd`.

    d = Imd(tmp_path, {"presence": {"grace": 0.3}})   # overrides of the test config
    d.start()                  # waits for the "ready" line; d.addr["tcp"] = (host, port)
    c = d.login("alice")       # an authenticated imd.client.Client (d.connect(): not logged in)
    d.kill()                   # SIGKILL and wait; d.start() again reuses the same data_dir
    d.kill(signal.SIGHUP)      # any other signal is only sent (d.wait() for an exit)
    d.admin("status", "--json")    # imd-admin on the daemon's control socket
    d.stop()                   # SIGTERM and wait (kills and raises if it hangs)

Only the raw-TCP listener (127.0.0.1:0) and the control socket are on unless the
overrides say otherwise; the bound addresses are read from the daemon's
``listening name=X addr=H:P`` log lines. Everything the daemon prints goes to
``imd.log`` in the work directory: ``log()`` is this run's part, ``log_text()`` and
``lines`` every run's. ``write_config()`` rewrites the config for reloads; ``env``
adds environment variables (NOTIFY_SOCKET and the like). The control socket lives
in a short temporary directory (unix socket paths are limited to 108 bytes),
removed by ``stop()`` and ``cleanup()``.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
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


def alive(pid) -> bool:
    """Running (a zombie left for a non-reaping pid 1 counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def kill_leftovers() -> None:
    for proc in list(RUNNING):
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        RUNNING.discard(proc)

SECRET = "test-secret-of-at-least-32-bytes!!"
START_TIMEOUT = 20.0
_LISTENING = re.compile(r"listening name=(\w+) addr=([^\s\"]+)")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


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


def token(user: str, role: str = "guest", ttl: int = 3600, **kw) -> str:
    return issue(SECRET, user, role, ttl, **kw)


class Imd:
    """A daemon subprocess of this work directory and what it printed (see the module doc)."""

    def __init__(self, workdir, overrides: dict | None = None, env: dict | None = None) -> None:
        self.workdir = Path(workdir)
        self.data_dir = str(self.workdir / "var")
        self.sockdir = tempfile.mkdtemp(prefix="imd-", dir="/tmp")
        self.control = os.path.join(self.sockdir, "imd.sock")
        self.config_path = self.workdir / "imd.toml"
        self.log_path = self.workdir / "imd.log"
        base = {
            "node": {"data_dir": self.data_dir},
            "auth": {"secret": SECRET},
            "listen": {"tcp": "127.0.0.1:0", "comet": "", "xmpp": "", "admin": "", "control": self.control},
            "presence": {"grace": 0.3},
            "limits": {"msg_rate": 0},        # tests send as fast as they can; test_limits sets it
            "log": {"level": "info"},
        }
        if os.environ.get("IMD_TEST_ENGINE") == "redis":     # the same tests over the cluster bus
            base["engine"] = {"backend": "redis", "prefix": "t%d:" % os.getpid(),
                              "url": os.environ.get("IMD_TEST_REDIS", "redis://127.0.0.1:6379/13")}
        self.base = merge(base, overrides)
        self.write_config()
        self.env = env_for_imd(env)
        self.proc = None
        self.addr: dict[str, tuple[str, int]] = {}
        self._log_offset = 0

    # -- lifecycle ---------------------------------------------------------------
    def write_config(self, overrides: dict | None = None, text: str | None = None) -> None:
        """Rewrite the config file (the base config plus ``overrides``, or raw ``text``)."""
        self.config_path.write_text(text if text is not None else toml_text(merge(self.base, overrides)))

    def start(self, timeout: float = START_TIMEOUT, wait_ready: bool = True) -> "Imd":
        os.makedirs(self.sockdir, exist_ok=True)
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        self.addr = {}
        with open(self.log_path, "ab") as logf:
            self.proc = spawn([sys.executable, "-m", "imd", "-c", str(self.config_path)],
                              cwd=self.workdir, stdout=logf, stderr=subprocess.STDOUT, env=self.env)
        if wait_ready:
            self.wait_log(r"ready node=", timeout)
            for name, addr in _LISTENING.findall(self.log()):
                if name != "control":
                    host, _, port = addr.rpartition(":")
                    self.addr[name] = (host.strip("[]"), int(port))
        return self

    def log(self) -> str:
        """What this run of the daemon printed so far."""
        return self.log_path.read_bytes()[self._log_offset:].decode("utf-8", "replace")

    def log_text(self) -> str:
        """What every run of the daemon in this work directory printed."""
        return self.log_path.read_bytes().decode("utf-8", "replace") if self.log_path.exists() else ""

    @property
    def lines(self) -> list:
        return self.log_text().splitlines()

    def wait_log(self, pattern: str, timeout: float = 10.0, after: int = 0) -> re.Match:
        """Wait for ``pattern`` (a regex) in this run's log, from character ``after`` on."""
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

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig``; for SIGKILL also wait until the process is gone."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(sig)
        if sig == signal.SIGKILL:
            self.proc.wait(10)

    def wait(self, timeout: float = 30.0) -> int:
        return self.proc.wait(timeout)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Signal the daemon (TERM by default) and wait for it; kill it and raise if it hangs."""
        try:
            if self.proc is None or self.proc.poll() is not None:
                return self.proc.returncode if self.proc else 0
            self.proc.send_signal(sig)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise
        finally:
            shutil.rmtree(self.sockdir, ignore_errors=True)

    def cleanup(self) -> None:
        """Kill the daemon if it still runs and remove its control socket directory."""
        self.kill()
        shutil.rmtree(self.sockdir, ignore_errors=True)

    # -- clients -----------------------------------------------------------------
    def admin(self, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess:
        """Run ``imd-admin -s <control> ARGS`` and return the finished process."""
        return run_admin("-s", self.control, *args, timeout=timeout)

    def connect(self, proto: str = "tcp") -> Client:
        """An imd.client.Client on the ``proto`` listener, not logged in."""
        return Client(*self.addr[proto])

    def login(self, user: str, role: str = "guest", platform: str = "android", device: str = "d1",
              since: int | None = None, secret: str = SECRET) -> Client:
        """A connected and authenticated imd.client.Client on the tcp listener."""
        c = self.connect()
        c.auth(issue(secret, user, role), platform=platform, device=device, since=since)
        return c


def run_admin(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess:
    """Run ``imd-admin ARGS`` (as ``python -m imd.admin_cli``) and return the finished process."""
    return subprocess.run([sys.executable, "-m", "imd.admin_cli", *args],
                          capture_output=True, text=True, timeout=timeout, env=env_for_imd())


def start_daemon(workdir, overrides: dict | None = None, env: dict | None = None) -> Imd:
    """Write a config from ``overrides`` into ``workdir`` and start imd; waits until ready."""
    return Imd(workdir, overrides, env).start()
