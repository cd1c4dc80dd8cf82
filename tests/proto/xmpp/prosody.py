"""Debian's prosody 0.12 as a reference server for the same suite (IMD_XMPP_SERVER=prosody).

Tests that rely on imd's own behaviour (tokens, app-managed contacts, the raw-TCP
bridge, exact byte layouts) carry ``@pytest.mark.imd_only`` with the reason; the rest
must pass on both servers, which checks the tests themselves against an
established implementation.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time

from tests.daemon import spawn  # a failing test leaks no server (tests/conftest.py)

LUA = """
daemonize = false
run_as_root = true
certificates = "{dir}"
pidfile = "{dir}/prosody.pid"
data_path = "{dir}/data"
log = {{ {{ levels = {{ min = "info" }}, to = "console" }} }}
interfaces = {{ "127.0.0.1" }}
c2s_ports = {{ {port} }}
s2s_ports = {{ }}
http_ports = {{ }}
https_ports = {{ }}
c2s_require_encryption = false
allow_unencrypted_plain_auth = true
authentication = "internal_hashed"
modules_enabled = {{ "roster", "saslauth", "disco", "ping", "offline", "carbons", "mam", "smacks",
                    "csi_simple", "posix" }}
modules_disabled = {{ "s2s", "tls" }}
archive_expires_after = "never"
default_archive_policy = true
VirtualHost "localhost"
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Prosody:
    """Same surface as harness.Imd for the XMPP tests: start, stop, port, addr, errors."""

    def __init__(self, tmp_path, seed: dict | None = None, **_ignored) -> None:
        self.dir = str(tmp_path)
        os.makedirs(os.path.join(self.dir, "data"), exist_ok=True)
        self.addr = {"xmpp": ("127.0.0.1", free_port())}
        self.config = os.path.join(self.dir, "prosody.cfg.lua")
        with open(self.config, "w") as f:
            f.write(LUA.format(dir=self.dir, port=self.port))
        self.seed = seed or {}
        self.lines: list = []
        self.proc = None
        self.registered: set = set()

    @property
    def port(self) -> int:
        return self.addr["xmpp"][1]

    def register(self, user: str, password: str) -> None:
        if user in self.registered:
            return
        subprocess.run(["prosodyctl", "--config", self.config, "register", user, "localhost", password],
                       check=True, capture_output=True, timeout=30)
        self.registered.add(user)

    def start(self) -> "Prosody":
        for user, password in self.seed.get("passwords", {}).items():
            self.register(user, password)
        self.proc = spawn(["prosody", "--config", self.config], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
        threading.Thread(target=lambda: [self.lines.append(ln.rstrip()) for ln in self.proc.stdout],
                         daemon=True).start()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("prosody did not start:\n" + "\n".join(self.lines[-30:]))

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def errors(self) -> list:
        return [ln for ln in self.lines if "\terror\t" in ln]
