"""Signals against a real imd subprocess: HUP reload, TERM drain under load, INT/QUIT, USR1."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from imd.client import ClientError
from tests.daemon import Imd, start_daemon

SENDERS = 8
LOAD_ACKS = 3000           # acks seen before SIGTERM
BURST = 20


def heartbeat_of(d) -> float:
    c = d.login("probe%d" % time.monotonic_ns())
    try:
        return c.hello["heartbeat"]
    finally:
        c.close()


# -- HUP -----------------------------------------------------------------------------
def test_hup_good_config_applies_live_and_reports_restart(tmp_path):
    d = start_daemon(tmp_path)
    try:
        assert heartbeat_of(d) == 30
        d.write_config({"limits": {"heartbeat": 15}, "engine": {"presence_ttl": 60}})
        mark = len(d.log())
        d.kill(signal.SIGHUP)
        d.wait_log(r"reload done changed=2 restart_needed=1", after=mark)
        log = d.log()[mark:]
        assert "reload applied key=limits.heartbeat value=15" in log
        assert "reload needs a restart key=engine.presence_ttl value=60" in log
        assert heartbeat_of(d) == 15
        assert d.proc.poll() is None
    finally:
        d.stop()
        d.cleanup()


@pytest.mark.parametrize("bad", ["[limits\nheartbeat = 1\n", "[limits]\nheartbeat = \"often\"\n",
                                 "[nosuch]\nx = 1\n", None])
def test_hup_bad_config_keeps_the_running_one(tmp_path, bad):
    d = start_daemon(tmp_path, {"limits": {"heartbeat": 25}})
    try:
        if bad is None:
            d.config_path.unlink()
        else:
            d.write_config(text=bad)
        mark = len(d.log())
        d.kill(signal.SIGHUP)
        d.wait_log(r"reload refused, keeping the running config: config error", after=mark)
        assert heartbeat_of(d) == 25
        assert d.proc.poll() is None
        d.write_config({"limits": {"heartbeat": 12}})         # a good file is picked up again
        d.kill(signal.SIGHUP)
        d.wait_log(r"reload done changed=1", after=mark)
        assert heartbeat_of(d) == 12
    finally:
        d.stop()
        d.cleanup()


def test_hup_log_level(tmp_path):
    d = start_daemon(tmp_path)
    try:
        d.write_config({"log": {"level": "debug"}})
        d.kill(signal.SIGHUP)
        d.wait_log(r"reload done changed=1")
        c = d.login("dbg")
        c.close()
        d.wait_log(r"debug imd\.router session closed conn=n1\.[0-9a-f]+ user=dbg reason=eof")
    finally:
        d.stop()
        d.cleanup()


# -- TERM under load -----------------------------------------------------------------------
class Sender(threading.Thread):
    """Pipelines bursts of messages and records every ack until the server closes."""

    def __init__(self, d, i: int) -> None:
        super().__init__(daemon=True)
        self.user, self.peer = f"sender{i}", f"recipient{i}"
        self.client = d.login(self.user, role="guest", device="load")
        self.acked: dict[str, dict] = {}
        self.errors = 0
        self.close_env = None
        self.failure = None
        self.n = 0

    def run(self) -> None:
        c = self.client
        try:
            while True:
                ids = set()
                for _ in range(BURST):
                    self.n += 1
                    cid = f"{self.user}-{self.n}"
                    ids.add(cid)
                    c.msg(self.peer, {"n": self.n}, id=cid, wait=False)
                while ids:
                    env = c.recv(timeout=20)
                    if env["type"] == "ack":
                        self.acked[env["id"]] = env
                        ids.discard(env["id"])
                    elif env["type"] == "error":
                        self.errors += 1
                        ids.discard(env.get("id"))
                    elif env["type"] == "close":
                        self.close_env = env
        except (ClientError, OSError):
            pass                     # the server closed the connection: drained
        except Exception as e:       # noqa: BLE001 - reported by the test
            self.failure = e
        finally:
            c.close()


def inbox_mids(d, user: str) -> set:
    c = d.login(user, device="checker")
    mids, since = set(), 0
    try:
        while True:
            page = c.sync(since, limit=500)
            if not page:
                return mids
            mids.update(e["mid"] for e in page)
            since = page[-1]["seq"]
    finally:
        c.close()


def test_term_under_load_loses_nothing_acked(tmp_path):
    d = start_daemon(tmp_path)
    try:
        senders = [Sender(d, i) for i in range(SENDERS)]
        idle = d.login("idle-user", role="host", platform="ios")
        for s in senders:
            s.start()
        deadline = time.monotonic() + 30
        while sum(len(s.acked) for s in senders) < LOAD_ACKS and time.monotonic() < deadline:
            time.sleep(0.01)
        d.kill(signal.SIGTERM)               # while every sender has a burst in flight
        assert d.wait(60) == 0
        for s in senders:
            s.join(30)
            assert not s.is_alive() and s.failure is None
        log = d.log()
        assert "signal TERM" in log and "store_flushed=True" in log
        close = idle.wait_for(lambda e: e["type"] == "close")
        assert close["reconnect"] is True and close["code"] == 1001
        idle.close()
        # (a busy sender may see its connection end before it reads the close envelope:
        # the idle client above is the one that checks it)
        acked_total = sum(len(s.acked) for s in senders)
        sent_total = sum(s.n for s in senders)
        assert acked_total >= LOAD_ACKS
        assert sent_total > acked_total          # TERM came with messages in flight
        print(f"TERM under load: {sent_total} sent, {acked_total} acked before the drain")

        d.start()                            # same data directory
        for s in senders:
            want = {a["mid"] for a in s.acked.values()}
            got_recipient = inbox_mids(d, s.peer)
            got_sender = inbox_mids(d, s.user)
            assert want <= got_recipient, f"{len(want - got_recipient)} acked messages missing for {s.peer}"
            assert want <= got_sender
    finally:
        d.stop()
        d.cleanup()


def test_term_waits_for_the_store_queue(tmp_path):
    d = start_daemon(tmp_path, {"store": {"batch_max": 1}})
    try:
        c = d.login("flush-sender")
        c.ping()            # the session is live
        for i in range(200):
            c.msg("flush-recipient", "x", id=f"f{i}", wait=False)
        first = c.wait_for(lambda e: e["type"] == "ack")
        d.kill(signal.SIGTERM)
        acked = {first["id"]: first["mid"]}
        try:
            while True:
                env = c.recv(timeout=20)
                if env["type"] == "ack":
                    acked[env["id"]] = env["mid"]
        except ClientError:
            pass
        c.close()
        assert d.wait(60) == 0
        assert "store_flushed=True" in d.log()
        d.start()
        assert set(acked.values()) <= inbox_mids(d, "flush-recipient")
    finally:
        d.stop()
        d.cleanup()


# -- INT, QUIT, USR1 ---------------------------------------------------------------------------
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGQUIT])
def test_int_and_quit_stop_fast(tmp_path, sig):
    d = start_daemon(tmp_path)
    try:
        c = d.login("fast-stop")
        ack = c.msg("someone", "hello")
        d.kill(sig)
        assert d.wait(20) == 0
        assert f"signal {signal.Signals(sig).name[3:]}" in d.log()
        assert c.wait_for(lambda e: e["type"] == "close")["reconnect"] is True
        c.close()
        assert not os.path.exists(d.control)
        d.start()
        assert ack["mid"] in inbox_mids(d, "someone")
    finally:
        d.stop()
        d.cleanup()


def test_usr1_reopens_the_log_file(tmp_path):
    logfile = tmp_path / "imd-file.log"
    d = Imd(tmp_path, {"log": {"file": str(logfile)}}).start(wait_ready=False)
    try:
        deadline = time.monotonic() + 10
        while "ready node=" not in (logfile.read_text() if logfile.exists() else ""):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        rotated = tmp_path / "imd-file.log.1"
        os.rename(logfile, rotated)              # what logrotate does
        d.kill(signal.SIGUSR1)
        deadline = time.monotonic() + 10
        while not (logfile.exists() and "log file reopened" in logfile.read_text()):
            assert time.monotonic() < deadline, rotated.read_text()
            time.sleep(0.05)
        assert "signal USR1" in rotated.read_text()
        assert d.proc.poll() is None
    finally:
        d.stop()
        d.cleanup()


def test_hup_to_an_unwritable_log_file_is_refused(tmp_path):
    d = start_daemon(tmp_path)
    try:
        d.write_config({"log": {"file": "/nonexistent-dir/imd.log"}, "limits": {"heartbeat": 9}})
        d.kill(signal.SIGHUP)
        d.wait_log(r"reload refused, keeping the running config: config error: log\.file: cannot open")
        assert heartbeat_of(d) == 30            # nothing of that file was applied
    finally:
        d.stop()
        d.cleanup()


# -- a drain while the store is down --------------------------------------------------------
PG = "host=127.0.0.1 port=5432 user=postgres dbname=test"


@pytest.fixture
def pg_schema():
    psycopg = pytest.importorskip("psycopg")
    name = "imd_ops_%d_%d" % (os.getpid(), time.monotonic_ns() % 10**9)
    try:
        with psycopg.connect(PG, autocommit=True, connect_timeout=5) as con:
            con.execute("CREATE SCHEMA %s" % name)
    except psycopg.OperationalError as e:
        pytest.skip(f"PostgreSQL not reachable: {e}")
    yield name
    with psycopg.connect(PG, autocommit=True) as con:
        con.execute("DROP SCHEMA %s CASCADE" % name)


def test_drain_with_the_store_down_then_int_hurries(tmp_path, pg_schema):
    from tests.store.tcp_proxy import TcpProxy
    proxy = TcpProxy(("127.0.0.1", 5432)).start()
    dsn = f"{proxy.server} user=postgres dbname=test options='-c search_path={pg_schema}'"
    d = start_daemon(tmp_path, {"store": {"backend": "postgresql", "dsn": dsn}})
    try:
        c = d.login("pg-sender")
        acked = c.msg("pg-recipient", "stored before the outage")
        proxy.cut()                                   # the database vanishes
        for i in range(5):
            c.msg("pg-recipient", "during the outage", id=f"lost{i}", wait=False)
        d.kill(signal.SIGTERM)
        d.wait_log(r"closing sessions count=1")       # after the first (bounded) flush
        assert c.wait_for(lambda e: e["type"] == "close")["reconnect"] is True
        assert d.proc.poll() is None                  # still waiting for the store
        d.kill(signal.SIGINT)
        d.wait_log(r"stop hurried")
        assert d.wait(30) == 0
        log = d.log()
        assert "store queue not flushed before the timeout ops_not_stored=5" in log
        assert "store_flushed=False" in log
        c.close()

        proxy.restore()
        d.start()
        assert acked["mid"] in inbox_mids(d, "pg-recipient")
    finally:
        d.stop()
        d.cleanup()
        proxy.stop()
