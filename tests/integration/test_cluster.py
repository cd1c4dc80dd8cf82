"""Three imd nodes (separate processes and ports) sharing PostgreSQL and Redis.

Cross-node chat, presence and kick over the raw-TCP protocol; a node killed
with SIGKILL; Redis killed and restarted (a private redis-server) under load
checked by tests/faults/checker.py.
"""

import importlib.util
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid

import orjson
import pytest
import redis

from imd.engine.base import Event

from tests.faults.checker import Checker
from tests.faults.load import Receiver, Sender, audit, wind_down

from .cluster import ROOT, Database, Node, RedisServer, admin, presence_of, token, wait_msg, wait_until

if importlib.util.find_spec("imd.store.postgresql") is None:
    pytest.skip("the PostgreSQL store (imd/store/postgresql.py) is not on this branch yet",
                allow_module_level=True)

SYSTEM_REDIS = "redis://127.0.0.1:6379/13"

TTL = 3          # engine.presence_ttl of every node here
LOAD_USERS = ["r0", "r1", "r2"]    # receivers of the checker's load in test_redis_restart


@pytest.fixture
def db():
    d = Database()
    yield d
    d.drop()


class Cluster:
    """Nodes sharing one database and one Redis; everything stopped at the end."""

    def __init__(self, tmp_path, db, redis_url) -> None:
        self.tmp = str(tmp_path)
        self.db = db
        self.redis_url = redis_url
        self.prefix = f"imdit:{uuid.uuid4().hex[:8]}:"
        self.nodes = {}

    def node(self, node_id: str, **kw) -> Node:
        n = Node(self.tmp, node_id, self.db.dsn, self.redis_url, self.prefix, **kw)
        self.nodes[node_id] = n
        return n.start()

    def start(self, *ids, **kw):
        return [self.node(i, **kw) for i in ids]

    def stop(self) -> None:
        for n in self.nodes.values():
            n.stop()
        try:
            r = redis.Redis.from_url(self.redis_url)
            keys = list(r.scan_iter(match=self.prefix + "*", count=1000))
            if keys:
                r.delete(*keys)
            r.close()
        except redis.ConnectionError:
            pass


@pytest.fixture
def cluster(tmp_path, db):
    c = Cluster(tmp_path, db, SYSTEM_REDIS)
    yield c
    c.stop()


@pytest.fixture
def private_redis(tmp_path):
    r = RedisServer(str(tmp_path))
    yield r
    r.stop()


def test_cross_node_chat(cluster):
    n1, n2, n3 = cluster.start("n1", "n2", "n3")
    alice = n1.client("alice", "host")
    alice2 = n3.client("alice", "host", device="web", platform="web")
    bob = n2.client("bob")
    carol = n3.client("carol")

    ack = alice.msg("bob", "Is the flat free on Friday?", ctx={"listing": "L1"})
    got = wait_msg(bob)
    assert (got["from"], got["to"], got["body"], got["ctx"]) == ("alice", "bob", "Is the flat free on Friday?",
                                                                  {"listing": "L1"})
    assert got["seq"] == 1 and got["mid"] == ack["mid"]
    mine = wait_msg(alice2)                      # the sender's other device, on another node
    assert mine["mid"] == ack["mid"] and mine["seq"] == ack["seq"]

    bob.msg("carol", "hi carol")
    assert wait_msg(carol)["body"] == "hi carol"
    carol.msg("alice", "hi alice")
    assert wait_msg(alice, lambda e: e["from"] == "carol")["body"] == "hi alice"
    assert wait_msg(alice2, lambda e: e["from"] == "carol")["body"] == "hi alice"

    # a burst across nodes arrives complete and in seq order
    for i in range(50):
        alice.msg("bob", f"m{i}", wait=False)
    bodies = [wait_msg(bob)["body"] for _ in range(50)]
    assert bodies == [f"m{i}" for i in range(50)]
    for c in (alice, alice2, bob, carol):
        c.close()


def ws_login(node, user, role="guest", **q):
    import websocket
    host, port = node.addr["comet"]
    query = "".join(f"&{k}={v}" for k, v in q.items())
    ws = websocket.create_connection(f"ws://{host}:{port}/ws?token={token(user, role)}{query}", timeout=10)
    hello = orjson.loads(ws.recv())
    assert hello["type"] == "auth" and hello["ok"] is True
    return ws


def ws_recv(ws, type_, pred=lambda e: True):
    while True:
        env = orjson.loads(ws.recv())
        if env["type"] == type_ and pred(env):
            return env


def test_cross_protocol_and_web_tier_across_nodes(cluster):
    """A TCP app user on n1, a WebSocket web user on n2, the web tier on n3's admin port."""
    n1, n2, n3 = cluster.start("n1", "n2", "n3")
    host = n1.client("hostw", "host", platform="ios")
    guest = ws_login(n2, "guestw", "guest", platform="web", device="browser")

    st, body = admin(n3, "POST", "/api/v1/contacts", {"user": "hostw", "contact": "guestw"})
    assert st == 200 and body == {"ok": True}
    host.wait_for(lambda e: e.get("type") == "contacts" and e.get("contact") == "guestw")
    ws_recv(guest, "contacts", lambda e: e["contact"] == "hostw")
    presence_of(host, "guestw", "online")
    assert ws_recv(guest, "presence", lambda e: e["user"] == "hostw")["status"] == "online"

    ack = host.msg("guestw", "Welcome! Check-in is at 3pm.", ctx={"booking": "B9"})
    got = ws_recv(guest, "msg")
    assert (got["from"], got["body"], got["ctx"], got["mid"]) == ("hostw", "Welcome! Check-in is at 3pm.",
                                                                  {"booking": "B9"}, ack["mid"])
    guest.send(orjson.dumps({"type": "msg", "id": "w1", "to": "hostw", "body": "Thanks!"}))
    assert ws_recv(guest, "ack", lambda e: e["id"] == "w1")["seq"] >= 1
    assert wait_msg(host, lambda e: e["from"] == "guestw")["body"] == "Thanks!"

    st, pres = admin(n3, "GET", "/api/v1/presence?users=hostw,guestw,nobody")
    assert st == 200
    assert (pres["hostw"]["status"], pres["hostw"]["platforms"]) == ("online", ["ios"])
    assert (pres["guestw"]["status"], pres["guestw"]["platforms"]) == ("online", ["web"])
    assert pres["nobody"]["status"] == "offline"

    st, res = admin(n3, "POST", "/api/v1/notices",
                    {"to": ["hostw", "guestw"], "kind": "booking.confirmed", "body": {"booking": "B9"}})
    assert st == 200 and res["count"] == 2
    assert host.wait_for(lambda e: e.get("type") == "notice")["kind"] == "booking.confirmed"
    assert ws_recv(guest, "notice")["body"] == {"booking": "B9"}

    st, res = admin(n3, "POST", "/api/v1/users/hostw/kick")
    assert st == 200 and res == {"closed": 1}           # none on n3; n1 closes its own and counts it
    env = host.wait_for(lambda e: e.get("type") == "close")
    assert env["code"] == 4001 and env["reconnect"] is False
    assert ws_recv(guest, "presence", lambda e: e["user"] == "hostw")["status"] == "offline"
    guest.close()


def test_xmpp_and_tcp_users_on_different_nodes(cluster):
    """An XMPP client (slixmpp) on n1 and a raw-TCP app user on n2 chat both ways,
    and see each other's presence through the bus."""
    import asyncio
    import types
    from tests.proto.xmpp.harness import client, login, logout, next_message, run
    n1, n2 = cluster.start("n1", "n2")
    cluster.db.add_contacts("xhost", "tguest")

    async def scenario():
        x = client("xhost", password=token("xhost", "host"), mech="PLAIN", resource="desk")
        await login(x, types.SimpleNamespace(port=n1.addr["xmpp"][1]))
        t = await asyncio.to_thread(n2.client, "tguest", "guest", "phone", None, "ios")
        await asyncio.to_thread(presence_of, t, "xhost", "online")
        ack = await asyncio.to_thread(t.msg, "xhost", "from the app on n2", {"listing": "L7"})
        m = await next_message(x)
        assert (m["from"].bare, m["body"], m["id"]) == ("tguest@localhost", "from the app on n2", ack["id"])
        x.send_message(mto="tguest@localhost", mbody="from xmpp on n1", mtype="chat")
        env = await asyncio.to_thread(wait_msg, t, lambda e: e["from"] == "xhost")
        assert env["body"] == "from xmpp on n1" and env["to"] == "tguest"
        await logout(x)
        await asyncio.to_thread(presence_of, t, "xhost", "offline")
        t.close()
    run(scenario())


def test_icomet_channel_across_three_nodes(cluster):
    """iComet: subscribers on two nodes get what the admin port of a third pushed,
    with the same seqs."""
    from tests.proto.comet.live import Stream, request
    n1, n2, n3 = cluster.start("n1", "n2", "n3")
    s1 = Stream(n1.addr["comet"], "/stream?cname=room7&seq=1")
    s2 = Stream(n2.addr["comet"], "/stream?cname=room7&seq=1")
    time.sleep(0.3)                                # the subscriptions are live
    for i in range(3):
        assert request(n3.addr["admin"], "GET", f"/push?cname=room7&content=m{i}")[0] == 200
    for s in (s1, s2):
        got = [orjson.loads(s.chunk()) for _ in range(3)]
        assert [(m["type"], m["seq"], m["content"]) for m in got] == [("data", i + 1, f"m{i}") for i in range(3)]
        s.close()


def test_presence_across_nodes(cluster):
    n1, n2 = cluster.start("n1", "n2")
    cluster.db.add_contacts("host1", "guest1")
    guest = n2.client("guest1")
    presence_of(guest, "host1", "offline")       # the contact's presence at login
    host = n1.client("host1", "host", platform="ios")
    p = presence_of(guest, "host1", "online")
    assert p["platforms"] == ["ios"]
    presence_of(host, "guest1", "online")         # and the other way round, at the host's login
    host.send({"type": "presence", "status": "away"})
    presence_of(guest, "host1", "away")
    host.close()
    p = presence_of(guest, "host1", "offline")    # after presence.grace
    assert p["last_seen"] is not None
    guest.close()


def test_kick_across_nodes(cluster):
    n1, n2, n3 = cluster.start("n1", "n2", "n3")
    a1 = n1.client("kicked", device="a")
    a3 = n3.client("kicked", device="b")
    other = n2.client("bystander")
    # the admin API's kick (router.kick → node.kick) is one publication on the user's channel
    r = redis.Redis.from_url(cluster.redis_url)
    r.publish(cluster.prefix + "u:kicked",
              b"n2 " + Event("kick", {"user": "kicked", "reason": "banned"}, "n2").encode())
    r.close()
    for c in (a1, a3):
        env = c.wait_for(lambda e: e.get("type") == "close")
        assert env["code"] == 4001 and env["reason"] == "banned" and env["reconnect"] is False
    assert other.ping()["type"] == "pong"        # nobody else affected
    other.close()


def test_kick_counts_sessions_on_every_node(cluster):
    """A kick through any node answers with the sessions closed on all nodes: each node
    holding a session of the user answers the asking node with its count."""
    n1, n2, n3 = cluster.start("n1", "n2", "n3")
    kicked = [n1.client("kc", device="a", platform="ios"), n1.client("kc", device="b", platform="web"),
              n2.client("kc", device="c", platform="android")]
    other = n2.client("bystander")

    def platforms():
        return sorted(admin(n3, "GET", "/api/v1/presence?users=kc")[1]["kc"]["platforms"])
    wait_until(lambda: platforms() == ["android", "ios", "web"], what="kc's presence on n1 and n2 seen from n3")
    st, res = admin(n3, "POST", "/api/v1/users/kc/kick")
    assert st == 200 and res == {"closed": 3}
    for c in kicked:
        env = c.wait_for(lambda e: e.get("type") == "close")
        assert env["code"] == 4001 and env["reconnect"] is False
    assert other.ping()["type"] == "pong"

    again = n2.client("kc", device="d")
    wait_until(lambda: platforms() == ["android"], what="kc back on n2 only")
    st, res = admin(n1, "POST", "/api/v1/users/kc/kick")     # asked on a node without the user
    assert st == 200 and res == {"closed": 1}
    assert again.wait_for(lambda e: e.get("type") == "close")["code"] == 4001
    other.close()


def test_kill9_node(cluster):
    n1, n2, n3 = cluster.start("n1", "n2", "n3", presence_ttl=TTL)
    cluster.db.add_contacts("host9", "guest9")
    host = n1.client("host9", "host")
    guest = n2.client("guest9")
    presence_of(host, "guest9", "online")
    acked = [host.msg("guest9", f"before {i}") for i in range(5)]
    got = [wait_msg(guest)["seq"] for _ in range(5)]
    last_seen = got[-1]
    guest.ack(last_seen)
    host.drain(0.2)                              # forget the presence seen at the host's login

    n2.kill9()
    t0 = time.monotonic()
    # messages sent while the guest has no session anywhere are stored and acked
    for i in range(5):
        acked.append(host.msg("guest9", f"after {i}"))
    presence_of(host, "guest9", "offline", timeout=TTL + 5)
    # within the TTL (and the reaping tick, TTL/4, which is inside it): measured, not asserted
    print(f"offline announced {time.monotonic() - t0:.2f}s after kill -9 (presence_ttl={TTL})")
    for i in range(5):
        acked.append(host.msg("guest9", f"offline {i}"))

    guest = n3.client("guest9", since=last_seen)
    entries = [wait_msg(guest) for _ in range(10)]
    assert [e["body"] for e in entries] == [f"after {i}" for i in range(5)] + [f"offline {i}" for i in range(5)]
    seqs = [e["seq"] for e in entries]
    assert seqs == list(range(last_seen + 1, last_seen + 11))
    presence_of(host, "guest9", "online")
    # nothing acked lost: every acked mid is in the guest's inbox
    stored = {row[0] for row in cluster.db.execute(
        "SELECT mid FROM messages WHERE recipient = %s", ("guest9",))}
    assert {a["mid"] for a in acked} <= stored
    host.close()
    guest.close()


def test_redis_restart(tmp_path, db, private_redis):
    """Redis killed and restarted on the same port while steady load runs across n1 and
    n2 (tests/faults/load.py, recorded by the checker) next to the scripted clients:
    local traffic keeps flowing during the outage, cross-node traffic resumes by itself,
    gaps are filled from the store; nothing acked is lost, duplicated or reordered."""
    c = Cluster(tmp_path, db, private_redis.url)
    chk = Checker()
    stop_send, stop_recv = threading.Event(), threading.Event()
    on = {n: (lambda n=n: c.nodes[n].addr["tcp"]) for n in ("n1", "n2")}
    receivers = [Receiver("r0", "phone", on["n1"], token, chk, stop_recv),     # local to s0
                 Receiver("r0", "tablet", on["n2"], token, chk, stop_recv),
                 Receiver("r1", "phone", on["n2"], token, chk, stop_recv),
                 Receiver("r2", "phone", on["n1"], token, chk, stop_recv, churn=1.0)]
    senders = [Sender(f"s{i}", LOAD_USERS, on["n1" if i % 2 == 0 else "n2"], token, chk, stop_send,
                      window=10, rate=15) for i in range(4)]     # under limits.msg_rate (20/s)
    try:
        n1, n2, n3 = c.start("n1", "n2", "n3", presence_ttl=TTL)
        for t in receivers + senders:
            t.start()
        wait_until(lambda: chk.report().acked >= 100, 30, what="load before the outage")
        dave = n3.client("dave")
        alice = n1.client("alice")
        bob = n1.client("bob")                       # same node as alice
        carol = n2.client("carol")                   # another node
        alice.msg("carol", "before")
        assert wait_msg(carol)["body"] == "before"

        private_redis.kill()
        before = chk.report().acked, chk.received_by("r0", "phone")
        # local traffic keeps flowing (the load's too: s0, s2 -> r0's phone, all on n1)
        for i in range(3):
            alice.msg("bob", f"local {i}")
        assert [wait_msg(bob)["body"] for _ in range(3)] == [f"local {i}" for i in range(3)]
        # logins work (presence answers from the node's own records)
        erin = n1.client("erin")
        erin.msg("bob", "hello from a login during the outage")
        assert wait_msg(bob)["body"] == "hello from a login during the outage"
        erin.close()
        # cross-node messages are stored and acked while Redis is down
        queued = [alice.msg("carol", f"during {i}")["mid"] for i in range(3)]
        # these publications are truly lost: their node dies before Redis is back
        lost = [dave.msg("carol", f"lost {i}")["mid"] for i in range(2)]
        dave.close()
        n3.kill9()
        wait_until(lambda: chk.report().acked >= before[0] + 60 and chk.received_by("r0", "phone") >= before[1] + 10,
                   20, what="load acked and delivered on one node while Redis is down")

        private_redis.start()                        # the same port
        # the nodes reconnect by themselves; n1 sends what it queued, and carol's
        # node resyncs from the store, which fills the gap n3 left
        got = [wait_msg(carol, timeout=20) for _ in range(5)]
        assert sorted(e["mid"] for e in got) == sorted(queued + lost)
        assert [e["seq"] for e in got] == sorted(e["seq"] for e in got)
        wait_until(lambda: "resync done" in n1.log() and "resync done" in n2.log(), 20, what="resync")
        alice.msg("carol", "after")
        assert wait_msg(carol)["body"] == "after"
        carol.msg("alice", "back")
        assert wait_msg(alice)["body"] == "back"
        for cl in (alice, bob, carol):
            cl.close()
        wind_down(n1, token, LOAD_USERS, senders, receivers, stop_send, stop_recv, timeout=60)
        audit(on["n2"], token, LOAD_USERS, chk)
    finally:
        stop_send.set()
        stop_recv.set()
        c.stop()
    rep = chk.report()
    print(rep)
    assert rep.acked and not rep.refused and not rep.lost and not rep.reordered, rep
    assert not rep.duplicated and not rep.conflicts and not rep.stored_twice, rep


def test_resync_reads_inbox_tops_in_one_query(tmp_path, db, private_redis):
    """After a Redis outage a node reads its users' inbox tops with one store query
    per LAST_SEQS_MAX users (not one per user) and fills every gap from the store."""
    c = Cluster(tmp_path, db, private_redis.url)
    try:
        n2, n3 = c.start("n2", "n3", presence_ttl=TTL)
        receivers = [n2.client(f"rs{i}") for i in range(30)]
        sender = n3.client("rsender")
        sender.msg("rs0", "before")
        assert wait_msg(receivers[0])["body"] == "before"

        private_redis.kill()
        # stored and acked, but their publications die with n3 before Redis is back
        mids = {f"rs{i}": sender.msg(f"rs{i}", f"lost {i}")["mid"] for i in range(0, 30, 3)}
        sender.close()
        n3.kill9()
        private_redis.start()

        for i in range(0, 30, 3):
            assert wait_msg(receivers[i], timeout=20)["mid"] == mids[f"rs{i}"]
        # (the first "resync done users=0" is the bus's first connection, at start)
        wait_until(lambda: "resync done users=30" in n2.log(), 20, what="resync")
        assert re.search(r"resync done users=30 sessions_behind=10 store_queries=1\b", n2.log())
        for cl in receivers:
            cl.close()
    finally:
        c.stop()


def test_workers_share_a_port(tmp_path, db):
    """node.workers = 3: one port, three worker nodes (n1.w0..w2) talking through Redis;
    a worker killed with SIGKILL is started again by the master."""
    c = Cluster(tmp_path, db, SYSTEM_REDIS)
    n = Node(c.tmp, "wk", db.dsn, SYSTEM_REDIS, c.prefix, extra="workers = 3")
    c.nodes["wk"] = n
    try:
        n.start(ready_lines=3)
        wait_until(lambda: "all workers ready workers=3 node=wk" in n.log(), 10, what="the master's readiness")
        clients = [n.client(f"user{i}") for i in range(12)]
        nodes = {cl.hello["session"].rsplit(".", 1)[0] for cl in clients}
        assert nodes <= {"wk.w0", "wk.w1", "wk.w2"} and len(nodes) >= 2
        for i in range(12):
            clients[i].msg(f"user{(i + 1) % 12}", f"from {i}")
        for i in range(12):
            assert wait_msg(clients[(i + 1) % 12])["body"] == f"from {i}"
        pids = [int(x) for x in re.findall(r"worker started index=0 node=wk.w0 pid=(\d+)", n.log())]
        os.kill(pids[0], signal.SIGKILL)
        wait_until(lambda: n.log().count("worker started index=0") == 2, 15, what="worker restart")
        wait_until(lambda: n.log().count("ready node=wk.w0") == 2, 15, what="restarted worker ready")
        n.signal(signal.SIGHUP)                 # validated by the master, reloaded by each worker
        wait_until(lambda: n.log().count("imd.daemon signal HUP") == 3, 15, what="HUP forwarded to the workers")
        assert "needs a restart" not in n.log()        # a worker's own settings survive the reload
        survivor = next(cl for cl in clients if not cl.hello["session"].startswith("wk.w0."))
        assert survivor.ping()["type"] == "pong"
        late = n.client("late")                   # new connections are served after the restart
        late.msg("user0", "still here")
        late.close()
        for cl in clients:
            cl.close()
    finally:
        c.stop()
    log = n.log()
    assert "master stopped" in log and log.count("stopped node=wk.w") == 3


def test_workers_master_speaks_for_them_to_systemd(tmp_path, db):
    """Under systemd (Type=notify) only the master may notify: it says READY=1 once
    every worker is ready, and STOPPING=1 on TERM."""
    import socket
    import struct
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    sock.bind(str(tmp_path / "notify"))
    sock.settimeout(20)
    c = Cluster(tmp_path, db, SYSTEM_REDIS)
    n = Node(c.tmp, "sd", db.dsn, SYSTEM_REDIS, c.prefix, extra="workers = 2")
    c.nodes["sd"] = n
    got = []

    def receive_until(field):
        while True:
            data, anc, _, _ = sock.recvmsg(4096, socket.CMSG_SPACE(12))
            pid = struct.unpack("iII", anc[0][2][:12])[0]
            fields = data.decode().split("\n")
            got.append((pid, fields))
            if field in fields:
                return pid

    try:
        n.start(ready_lines=2, env={"NOTIFY_SOCKET": str(tmp_path / "notify")})
        assert receive_until("READY=1") == n.proc.pid
        assert "all workers ready workers=2" in n.log()
        n.signal(signal.SIGTERM)
        assert receive_until("STOPPING=1") == n.proc.pid
    finally:
        c.stop()
        sock.close()
    assert {pid for pid, _ in got} == {n.proc.pid}        # no worker ever spoke to systemd


def test_workers_leave_with_their_master(tmp_path, db):
    """A master killed with SIGKILL leaves no orphaned worker serving."""
    c = Cluster(tmp_path, db, SYSTEM_REDIS)
    n = Node(c.tmp, "orph", db.dsn, SYSTEM_REDIS, c.prefix, extra="workers = 2")
    c.nodes["orph"] = n
    try:
        n.start(ready_lines=2)
        pids = [int(p) for p in re.findall(r"worker started index=\d node=orph.w\d pid=(\d+)", n.log())]
        assert len(pids) == 2
        n.kill9()

        def gone(pid):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return True
            return False
        wait_until(lambda: all(gone(p) for p in pids), 15, what="the orphaned workers to exit")
        assert n.log().count("master pid=%d is gone" % n.proc.pid) == 2
    finally:
        c.stop()


def test_workers_need_redis(tmp_path):
    cfg = tmp_path / "w.toml"
    cfg.write_text('[node]\nworkers = 2\n[engine]\nbackend = "memory"\n')
    p = subprocess.run([sys.executable, "-m", "imd", "-c", str(cfg)], cwd=ROOT, capture_output=True,
                       text=True, timeout=30, env={"PYTHONPATH": ROOT, "PATH": "/usr/bin:/bin"})
    assert p.returncode == 2
    assert 'node.workers: more than one worker needs engine.backend = "redis"' in p.stderr
