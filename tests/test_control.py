"""imd-admin and the control socket against a real imd subprocess."""

from __future__ import annotations

import json
import os
import socket
import stat

import pytest

from tests.daemon import Imd, run_admin, start_daemon


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    d = start_daemon(tmp_path_factory.mktemp("control"))
    yield d
    d.stop()
    d.cleanup()


@pytest.fixture
def two_clients(daemon):
    host = daemon.login("hostA", role="host", platform="android", device="phone")
    guest = daemon.login("guestB", role="guest", platform="ios", device="iphone")
    yield host, guest
    host.close()
    guest.close()


def admin_json(d, *args):
    r = d.admin(*args, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def raw(d, *lines: bytes) -> list[dict]:
    """Send raw request lines on one control connection, return the answers."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(d.control)
        f = s.makefile("rb")
        out = []
        for line in lines:
            s.sendall(line)
            answer = f.readline()
            if not answer:
                break
            out.append(json.loads(answer))
        return out


def test_socket_is_private(daemon):
    mode = os.stat(daemon.control).st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o600


def test_status_json(daemon, two_clients):
    st = admin_json(daemon, "status")
    assert st["pid"] == daemon.proc.pid
    assert st["node"] == "n1"
    assert st["state"] == "running"
    assert st["fastpath"] in ("cython", "python")
    assert st["uptime"] >= 0
    assert st["listeners"]["tcp"] == "%s:%d" % daemon.addr["tcp"]
    conns = st["connections"]
    assert conns["total"] == 2
    assert conns["by_protocol"] == {"tcp": 2}
    assert conns["by_source"] == {"android-host": 1, "ios-guest": 1}
    assert st["store"]["backend"] == "sqlite" and st["store"]["queue"] == 0
    assert st["engine"]["backend"] == "memory"
    assert st["process"]["fds"] > 0


def test_status_table(daemon, two_clients):
    r = daemon.admin("status")
    assert r.returncode == 0, r.stderr
    assert f"pid {daemon.proc.pid}" in r.stdout
    assert "sessions    2 of 2 users" in r.stdout
    assert "tcp 2" in r.stdout
    assert "android-host 1" in r.stdout and "ios-guest 1" in r.stdout
    assert "store       sqlite  queue 0" in r.stdout
    assert "fastpath " in r.stdout


def test_sessions(daemon, two_clients):
    all_ = admin_json(daemon, "sessions")
    assert all_["total"] == 2
    assert {s["user"] for s in all_["sessions"]} == {"hostA", "guestB"}
    one = admin_json(daemon, "sessions", "--user", "guestB")
    assert one["total"] == 1
    s = one["sessions"][0]
    assert (s["user"], s["role"], s["platform"], s["device"], s["protocol"]) == \
        ("guestB", "guest", "ios", "iphone", "tcp")
    assert s["session"].startswith("n1.")
    assert admin_json(daemon, "sessions", "--user", "nobody") == {"total": 0, "sessions": []}
    assert admin_json(daemon, "sessions", "--limit", "1")["total"] == 2
    assert len(admin_json(daemon, "sessions", "--limit", "1")["sessions"]) == 1

    table = daemon.admin("sessions")
    assert table.returncode == 0
    lines = table.stdout.splitlines()
    assert lines[0].split()[:6] == ["SESSION", "USER", "ROLE", "PLATFORM", "DEVICE", "PROTO"]
    assert any("guestB" in l and "iphone" in l for l in lines)
    assert lines[-1] == "2 session(s)"


def test_kick(daemon):
    c1 = daemon.login("kicked", device="a")
    c2 = daemon.login("kicked", device="b")
    other = daemon.login("bystander")
    try:
        r = daemon.admin("kick", "kicked")
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == "kicked kicked: 2 session(s) closed (all nodes)"
        for c in (c1, c2):
            env = c.wait_for(lambda e: e["type"] == "close")
            assert env["reconnect"] is False
        assert other.ping()["type"] == "pong"
        assert admin_json(daemon, "kick", "kicked") == {"user": "kicked", "closed": 0}
    finally:
        for c in (c1, c2, other):
            c.close()


def test_log_level(daemon):
    assert admin_json(daemon, "log-level", "debug") == {"old": "info", "level": "debug"}
    r = daemon.admin("log-level", "info")
    assert r.returncode == 0 and r.stdout.strip() == "log level debug -> info"
    assert daemon.admin("log-level", "loud").returncode == 2          # refused by argparse
    ans = raw(daemon, b'{"cmd":"log-level","level":"loud"}\n')[0]
    assert ans["ok"] is False and "log level must be one of" in ans["error"]
    assert admin_json(daemon, "status")["log_level"] == "info"


def test_reload_reports_changes(tmp_path):
    d = start_daemon(tmp_path)
    try:
        assert admin_json(d, "reload")["applied"] == []
        assert d.admin("reload").stdout.strip().endswith("no changes")
        d.write_config({"limits": {"heartbeat": 20}, "node": {"id": "n2"}, "auth": {"secret": "imd-new-secret-0123456789abcdefghijkl"}})
        r = admin_json(d, "reload")
        applied = {c["key"]: c for c in r["applied"]}
        assert applied["limits.heartbeat"]["old"] == 30 and applied["limits.heartbeat"]["new"] == 20
        assert applied["auth.secret"]["new"] == "<hidden>"            # secrets are never shown
        assert [c["key"] for c in r["restart_needed"]] == ["node.id"]
        c = d.login("after-reload", secret="imd-new-secret-0123456789abcdefghijkl")
        assert c.hello["heartbeat"] == 20
        c.close()
        assert "imd-new-secret-0123456789abcdefghijkl" not in d.log()

        d.write_config(text="[limits]\nheartbeat = -5\n")
        bad = d.admin("reload")
        assert bad.returncode == 1
        assert "reload refused" in bad.stderr and "limits.heartbeat" in bad.stderr
        c = d.login("after-bad-reload", secret="imd-new-secret-0123456789abcdefghijkl")     # the running config stayed
        assert c.hello["heartbeat"] == 20
        c.close()

        d.write_config({"limits": {"heartbeat": 20}, "node": {"id": "n2"}, "auth": {"secret": "imd-new-secret-0123456789abcdefghijkl"}})
        table = d.admin("reload")
        assert table.returncode == 0 and "no changes" not in table.stdout
        assert "needs a restart:\n  node.id: 'n1' -> 'n2'" in table.stdout
    finally:
        d.stop()
        d.cleanup()


def test_drain(tmp_path):
    d = start_daemon(tmp_path)
    c = d.login("draining-user")
    try:
        r = d.admin("drain", "--wait", "30")
        assert r.returncode == 0, r.stderr
        assert r.stdout.splitlines() == ["draining: 1 session(s) told to reconnect; imd exits when done",
                                         "imd has exited"]
        env = c.wait_for(lambda e: e["type"] == "close")
        assert env["reconnect"] is True
        assert d.wait(10) == 0
        assert not os.path.exists(d.control)          # removed on exit
    finally:
        c.close()
        d.cleanup()


def test_drain_json(tmp_path):
    d = start_daemon(tmp_path)
    try:
        assert admin_json(d, "drain") == {"draining": True, "sessions": 0}
        assert d.wait(10) == 0
    finally:
        d.cleanup()


def test_not_running(tmp_path):
    missing = str(tmp_path / "none.sock")
    r = run_admin("-s", missing, "status")
    assert r.returncode == 3
    assert "no control socket at" in r.stderr and "is imd running?" in r.stderr
    stale = "/tmp/imd-test-stale-%d.sock" % os.getpid()
    s = socket.socket(socket.AF_UNIX)
    s.bind(stale)                  # bound, never listening: like a crashed daemon's socket
    try:
        r = run_admin("-s", stale, "status", "--json")
        assert r.returncode == 3 and "not running" in r.stderr
    finally:
        s.close()
        os.unlink(stale)


def test_admin_finds_socket_from_config(daemon):
    r = run_admin("-c", str(daemon.config_path), "status", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["pid"] == daemon.proc.pid
    r = run_admin("-c", "/nonexistent.toml", "status")
    assert r.returncode == 2 and "no such file" in r.stderr


def test_hostile_requests(daemon):
    answers = raw(daemon, b"not json\n", b"[1,2]\n", b'{"cmd":5}\n', b'{"cmd":"format-disk"}\n',
                  b'{"cmd":"kick"}\n', b'{"cmd":"sessions","limit":-1}\n', b'{"cmd":"sessions","user":7}\n',
                  b"\xff\xfe\n", b'{"cmd":"status"}\n')
    assert [a["ok"] for a in answers] == [False] * 8 + [True]
    assert answers[0]["error"] == "request is not valid JSON"
    assert answers[1]["error"] == 'request must be an object with a "cmd" string'
    assert answers[3]["error"].startswith('unknown command "format-disk"')
    assert answers[4]["error"] == 'kick needs "user"'


def test_oversized_request_closes_only_that_connection(daemon):
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(daemon.control)
        s.sendall(b"x" * 70000)
        f = s.makefile("rb")
        ans = json.loads(f.readline())
        assert ans["ok"] is False and "longer than" in ans["error"]
        assert f.readline() == b""          # closed
    assert admin_json(daemon, "status")["state"] == "running"


def test_second_daemon_refuses_the_socket_of_a_live_one(daemon, tmp_path):
    other = Imd(tmp_path, {"listen": {"tcp": ""}})
    other.control = daemon.control
    other.base["listen"]["control"] = daemon.control
    other.write_config()
    try:
        other.start(wait_ready=False)
        assert other.wait(20) == 1
        assert "is in use: is another imd running?" in other.log()
        assert admin_json(daemon, "status")["pid"] == daemon.proc.pid     # untouched
    finally:
        other.cleanup()


def test_stale_socket_is_replaced(tmp_path):
    d = Imd(tmp_path, {})
    s = socket.socket(socket.AF_UNIX)
    s.bind(d.control)
    s.close()
    try:
        d.start()
        assert "removed stale control socket" in d.log()
        assert admin_json(d, "status")["state"] == "running"
    finally:
        d.stop()
        d.cleanup()


def test_metrics(daemon, two_clients):
    host, guest = two_clients
    host.msg("guestB", "hi")
    r = daemon.admin("metrics")
    assert r.returncode == 0, r.stderr
    text = r.stdout
    assert 'imd_connections{protocol="tcp",source="android-host"} 1' in text
    assert "# TYPE imd_store_committed_total counter" in text
    assert "imd_store_queue 0" in text
    assert "imd_engine_connected 1" in text
    assert 'imd_accepted_total{listener="tcp"}' in text
    assert 'imd_info{version="' in text and 'fastpath="' in text
    assert "process_open_fds " in text and "process_resident_memory_bytes " in text
    assert 'python_gc_collections_total{generation="2"} ' in text and "imd_gc_pause_seconds_count " in text
    assert admin_json(daemon, "metrics")["text"].startswith("# HELP")


def test_too_long_socket_path_is_a_clear_start_error(tmp_path):
    d = Imd(tmp_path, {})
    d.base["listen"]["control"] = "/tmp/" + "x" * 120 + "/imd.sock"
    d.write_config()
    try:
        d.start(wait_ready=False)
        assert d.wait(20) == 1
        assert "control socket path too long for a unix socket" in d.log()
    finally:
        d.cleanup()
