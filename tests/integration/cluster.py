"""Helpers of the cluster integration tests: imd nodes as real processes
(``python -m imd -c FILE``, with TCP, XMPP, comet and admin listeners), a PostgreSQL database per test, private Redis
servers, user tokens and raw-TCP clients.

Every process is started here, remembered by pid and stopped by pid.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid

import jwt
import psycopg
import redis

from imd.client import Client

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SECRET = "integration-secret-of-32-bytes-at-least!"
PG_SERVER = "host=127.0.0.1 port=5432 user=postgres"
LISTEN_RE = re.compile(r"listening name=(\w+) addr=([\d.]+):(\d+)")


def token(user: str, role: str = "guest", ttl: int = 600) -> str:
    return jwt.encode({"sub": user, "role": role, "exp": int(time.time()) + ttl}, SECRET, algorithm="HS256")


def wait_until(pred, timeout: float = 10.0, interval: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Database:
    """A PostgreSQL database made for one test and dropped after it."""

    def __init__(self) -> None:
        self.name = "imd_it_" + uuid.uuid4().hex[:12]
        with psycopg.connect(PG_SERVER + " dbname=postgres", autocommit=True) as con:
            con.execute(f'CREATE DATABASE "{self.name}"')
        self.dsn = f"postgresql://postgres@127.0.0.1:5432/{self.name}"

    def execute(self, sql: str, params=()):
        with psycopg.connect(self.dsn, autocommit=True) as con:
            cur = con.execute(sql, params)
            return cur.fetchall() if cur.description else None

    def add_contacts(self, a: str, b: str) -> None:
        """A mutual contact, written before either user's node loads the lists."""
        self.execute("INSERT INTO contacts (user_id, contact) VALUES (%s, %s), (%s, %s) "
                     "ON CONFLICT DO NOTHING", (a, b, b, a))

    def drop(self) -> None:
        with psycopg.connect(PG_SERVER + " dbname=postgres", autocommit=True) as con:
            con.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')


class RedisServer:
    """A private redis-server on a free port (no persistence): tests may kill it."""

    def __init__(self, workdir: str) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.proc = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self.workdir],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        r = redis.Redis(port=self.port)
        wait_until(lambda: self._ping(r), 10, what="redis-server to answer")
        r.close()

    @staticmethod
    def _ping(r) -> bool:
        try:
            return r.ping()
        except redis.ConnectionError:
            return False

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        self.kill()


class Node:
    """One imd process."""

    def __init__(self, workdir: str, node_id: str, dsn: str, redis_url: str, prefix: str,
                 presence_ttl: int = 3, grace: float = 0.5, extra: str = "") -> None:
        self.id = node_id
        self.dir = os.path.join(workdir, node_id)
        os.makedirs(self.dir, exist_ok=True)
        self.config = os.path.join(self.dir, "imd.toml")
        self.log_path = os.path.join(self.dir, "imd.log")
        with open(self.config, "w") as f:
            f.write(f"""
[node]
id = "{node_id}"
data_dir = "{self.dir}/var"
{extra}
[auth]
secret = "{SECRET}"
[listen]
xmpp = "127.0.0.1:0"
comet = "127.0.0.1:0"
admin = "127.0.0.1:0"
control = ""
tcp = "127.0.0.1:0"
[store]
backend = "postgresql"
dsn = "{dsn}"
[engine]
backend = "redis"
url = "{redis_url}"
prefix = "{prefix}"
presence_ttl = {presence_ttl}
[presence]
grace = {grace}
[xmpp]
domain = "localhost"
tls = "disabled"
[limits]
heartbeat = 30
idle_timeout = 90
""")
        self.proc = None
        self.port = None

    def start(self, ready_lines: int = 1, timeout: float = 20.0, env: dict | None = None) -> "Node":
        self._log = open(self.log_path, "ab")
        env = dict(os.environ, PYTHONPATH=ROOT, **(env or {}))
        self.proc = subprocess.Popen([sys.executable, "-m", "imd", "-c", self.config], cwd=ROOT, env=env,
                                     stdout=self._log, stderr=subprocess.STDOUT)
        self._offset = self._log.tell()
        wait_until(lambda: self.log().count("ready node=") >= ready_lines or self.proc.poll() is not None,
                   timeout, what=f"node {self.id} to be ready")
        if self.proc.poll() is not None:
            raise AssertionError(f"node {self.id} exited:\n{self.log()}")
        self.addr = {}
        for name, host, port in LISTEN_RE.findall(self.log()):
            self.addr.setdefault(name, (host, int(port)))
        self.port = self.addr["tcp"][1]
        return self

    def log(self) -> str:
        with open(self.log_path, "rb") as f:
            f.seek(self._offset)
            return f.read().decode(errors="replace")

    def client(self, user: str, role: str = "guest", device: str = "d1", since=None, platform="android"):
        c = Client("127.0.0.1", self.port, timeout=10)
        c.auth(token(user, role), platform=platform, device=device, since=since)
        return c

    def signal(self, signum) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signum)

    def kill9(self) -> None:
        self.signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            self.proc.wait(10)
        self._log.close()


def wait_msg(c: Client, pred=lambda e: True, timeout: float = 10.0, kinds=("msg",)) -> dict:
    return c.wait_for(lambda e: e.get("type") in kinds and pred(e), timeout=timeout)


def presence_of(c: Client, user: str, status: str, timeout: float = 10.0) -> dict:
    return c.wait_for(lambda e: e.get("type") == "presence" and e.get("user") == user
                      and e.get("status") == status, timeout=timeout)


def admin(node: "Node", method: str, path: str, body: dict | None = None):
    """(status, JSON answer) of an admin-port request to ``node``."""
    import http.client
    import orjson
    host, port = node.addr["admin"]
    con = http.client.HTTPConnection(host, port, timeout=10)
    try:
        con.request(method, path, body=orjson.dumps(body) if body is not None else None,
                    headers={"Content-Type": "application/json"})
        r = con.getresponse()
        data = r.read()
        return r.status, (orjson.loads(data) if data else None)
    finally:
        con.close()
