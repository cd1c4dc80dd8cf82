"""Start imd as a real subprocess for integration tests.

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
import signal
import subprocess
import sys
import threading
import time

from imd.auth import issue
from imd.client import Client

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
        "log": {"level": "info"},
    }
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
        self.proc = subprocess.Popen([sys.executable, "-m", "imd", "-c", self.config], cwd=self.dir,
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
