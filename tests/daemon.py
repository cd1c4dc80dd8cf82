"""Start imd as a real subprocess for tests (``python -m imd -c <tmp config>``).

    d = start_daemon(tmp_path, {"limits": {"heartbeat": 20}})
    host, port = d.addrs["tcp"]          # read from the "listening name=tcp addr=H:P" log lines
    d.admin("status", "--json")          # runs imd-admin against d.control
    d.stop()                             # SIGTERM, wait; returns the exit code

By default only the raw-TCP listener is on (127.0.0.1:0, a free port); the
other listeners are "" (disabled) unless ``overrides`` sets them. The control
socket lives in a short temporary directory (unix socket paths are limited to
108 bytes). The daemon's stdout+stderr go to ``d.log_path``.
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

ROOT = Path(__file__).resolve().parent.parent
SECRET = "imd-test-secret-0123456789abcdefghij"
START_TIMEOUT = 20.0
_LISTENING = re.compile(r"listening name=(\w+) addr=([^\s\"]+)")


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} as TOML")


def toml_text(config: dict) -> str:
    out = []
    for section, table in config.items():
        out.append(f"[{section}]")
        out.extend(f"{k} = {toml_value(v)}" for k, v in table.items())
        out.append("")
    return "\n".join(out)


def merge(base: dict, overrides: dict | None) -> dict:
    merged = {s: dict(t) for s, t in base.items()}
    for section, table in (overrides or {}).items():
        merged.setdefault(section, {}).update(table)
    return merged


def env_for_imd(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    for key in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        env.pop(key, None)
    env.update(extra or {})
    return env


class DaemonProcess:
    """A running imd subprocess and what it printed."""

    def __init__(self, workdir: Path, config: dict, env: dict | None = None) -> None:
        self.workdir = Path(workdir)
        self.sockdir = tempfile.mkdtemp(prefix="imd-", dir="/tmp")
        self.control = os.path.join(self.sockdir, "imd.sock")
        self.config_path = self.workdir / "imd.toml"
        self.log_path = self.workdir / "imd.log"
        self.base = merge({
            "node": {"data_dir": str(self.workdir / "var")},
            "auth": {"secret": SECRET},
            "listen": {"xmpp": "", "comet": "", "admin": "", "tcp": "127.0.0.1:0", "control": self.control},
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
        self.proc = subprocess.Popen([sys.executable, "-m", "imd", "-c", str(self.config_path)],
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
        from imd.auth import issue
        from imd.client import Client
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
