"""The engine contract: the same behaviour from MemoryEngine and RedisEngine,
then the cluster behaviour only a remote bus has (several nodes, TTL expiry,
reconnects), against the real Redis."""

import gevent
import redis

from imd.engine.base import Event, shared_state

from .conftest import REDIS_URL


def entry(user, seq):
    return Event("entry", {"user": user, "seq": seq, "body": "héllo ☃", "ctx": {"listing": "L1"}})


# -- contract: every engine -------------------------------------------------------------
def test_subscribe_publish_delivers_once(factory):
    e, rec = factory.make("n1")
    e.subscribe("u:alice")
    assert factory.ready(e)
    e.publish("u:alice", entry("alice", 1))
    assert rec.wait(lambda got: len(got) == 1)
    gevent.sleep(0.2)                       # no echo arrives later through the bus
    assert len(rec.got) == 1
    channel, ev = rec.got[0]
    assert channel == "u:alice" and ev.kind == "entry" and ev.origin == "n1"
    assert ev.data["seq"] == 1 and ev.data["body"] == "héllo ☃"


def test_no_delivery_without_or_after_subscription(factory):
    e, rec = factory.make("n1")
    e.publish("u:nobody", entry("nobody", 1))
    e.subscribe("u:bob")
    assert factory.ready(e)
    e.unsubscribe("u:bob")
    e.publish("u:bob", entry("bob", 1))
    assert factory.ready(e)
    gevent.sleep(0.2)
    assert rec.got == []


def test_subscribe_user_is_the_user_channel(factory):
    e, rec = factory.make("n1")
    e.subscribe_user("alice")
    e.subscribe_user("bob")
    assert factory.ready(e)
    e.unsubscribe_user("bob")
    e.publish("u:bob", entry("bob", 1))
    e.publish("u:alice", entry("alice", 1))
    assert rec.wait(lambda got: len(got) == 1)
    gevent.sleep(0.2)
    assert [(c, ev.data["seq"]) for c, ev in rec.got] == [("u:alice", 1)]
    e.unsubscribe("u:alice")                # the channel form undoes the user form
    e.publish("u:alice", entry("alice", 2))
    assert factory.ready(e)
    gevent.sleep(0.2)
    assert len(rec.got) == 1


def test_several_channels(factory):
    e, rec = factory.make("n1")
    for u in ("a", "b", "c"):
        e.subscribe("u:" + u)
    e.subscribe("c:room")
    assert factory.ready(e)
    for i, ch in enumerate(("u:a", "u:b", "c:room", "u:c", "u:a")):
        e.publish(ch, Event("transient", {"i": i}))
    assert rec.wait(lambda got: len(got) == 5)
    gevent.sleep(0.2)
    # each channel in publication order (the order between user channels and the
    # others may differ: the latter come back through Redis, see imd/engine/redis.py)
    assert sorted((c, ev.data["i"]) for c, ev in rec.got) == [
        ("c:room", 2), ("u:a", 0), ("u:a", 4), ("u:b", 1), ("u:c", 3)]
    assert [ev.data["i"] for c, ev in rec.got if c == "u:a"] == [0, 4]


def test_event_round_trip():
    ev = Event("entry", {"user": "u", "seq": 7, "body": {"t": "ü€𝄞", "n": [1, 2.5, None, True]}}, "n9")
    back = Event.decode(ev.encode())
    assert (back.kind, back.data, back.origin) == (ev.kind, ev.data, ev.origin)
    assert ev.encode() is ev.encode()       # encoded once


def test_presence_set_get_remove(factory):
    e, _ = factory.make("n1")
    assert factory.ready(e)
    e.presence_set("alice", {"status": "online", "platforms": ["ios", "web"]})
    e.presence_set("bob", {"status": "away", "platforms": ["android"]})
    got = e.presence_get(["alice", "bob", "carol"])
    assert got["alice"] == [{"status": "online", "platforms": ["ios", "web"], "node": "n1"}]
    assert got["bob"] == [{"status": "away", "platforms": ["android"], "node": "n1"}]
    assert got["carol"] == []
    e.presence_set("alice", None)
    assert e.presence_get(["alice"]) == {"alice": []}


def test_presence_states_aggregate_what_presence_get_returns(factory):
    e, _ = factory.make("n1")
    assert factory.ready(e)
    e.presence_set("alice", {"status": "online", "platforms": ["ios", "web"], "devices": ["p", "c"]})
    e.presence_set("bob", {"status": "away", "platforms": ["android"]})
    states = e.presence_states(["alice", "bob", "carol"])
    assert states == {"alice": ("online", ("ios", "web")), "bob": ("away", ("android",)), "carol": None}
    assert states["alice"] is shared_state("online", ["ios", "web"])


def test_presence_records_keep_devices(factory):
    e, _ = factory.make("n1")
    assert factory.ready(e)
    e.presence_set("alice", {"status": "online", "platforms": ["ios"], "devices": ["phone"]})
    e.presence_set("bob", {"status": "online", "platforms": ["ios", "web"], "devices": ["pad", "pc"]})
    got = e.presence_get(["alice", "bob"])
    assert got["alice"] == [{"status": "online", "platforms": ["ios"], "devices": ["phone"], "node": "n1"}]
    assert got["bob"] == [{"status": "online", "platforms": ["ios", "web"], "devices": ["pad", "pc"],
                           "node": "n1"}]
    e.presence_set("bob", {"status": "away", "platforms": ["web"]})
    assert e.presence_get(["bob"])["bob"] == [{"status": "away", "platforms": ["web"], "node": "n1"}]


def test_channel_counts(factory):
    e, _ = factory.make("n1")
    assert factory.ready(e)
    e.channel_count_set("room1", 3)
    e.channel_count_set("room2", 1)
    assert e.channel_counts(["room1", "room2", "room3"]) == {"room1": 3, "room2": 1, "room3": 0}
    e.channel_count_set("room1", 0)
    assert e.channel_counts(["room1"]) == {"room1": 0}


def test_state(factory):
    e, _ = factory.make("n1")
    e.subscribe("u:a")
    assert factory.ready(e)
    st = e.state()
    assert st["backend"] == e.name and st["connected"] is True and st["channels"] == 1


# -- cluster: the Redis engine between nodes -----------------------------------------------
def test_cross_node_delivery(redis_factory):
    f = redis_factory
    e1, r1 = f.make("n1")
    e2, r2 = f.make("n2")
    e3, r3 = f.make("n3")
    e2.subscribe("u:x")
    e3.subscribe("u:x")
    assert f.ready(e1) and f.ready(e2) and f.ready(e3)
    e1.publish("u:x", entry("x", 1))
    assert r2.wait(lambda got: len(got) == 1) and r3.wait(lambda got: len(got) == 1)
    gevent.sleep(0.2)
    assert r1.got == [] and len(r2.got) == 1 and len(r3.got) == 1
    assert r2.got[0][1].origin == "n1" and r2.got[0][1].data["seq"] == 1


def test_presence_across_nodes_and_clean_stop(redis_factory):
    f = redis_factory
    e1, _ = f.make("n1", presence_ttl=2)
    e2, r2 = f.make("n2", presence_ttl=2)
    assert f.ready(e1) and f.ready(e2)
    e1.presence_set("alice", {"status": "online", "platforms": ["ios"]})
    e2.presence_set("alice", {"status": "away", "platforms": ["web"]})
    e1.channel_count_set("room", 2)
    e2.channel_count_set("room", 5)
    gevent.sleep(0.3)                        # the writers reach Redis
    recs = e2.presence_get(["alice"])["alice"]
    assert sorted(r["node"] for r in recs) == ["n1", "n2"]
    assert e1.channel_counts(["room"]) == {"room": 7}
    e1.stop()
    assert r2.wait(lambda got: got and any(ev.kind == "nodes_lost" for _, ev in got), timeout=5)
    _, lost = r2.kinds("nodes_lost")[0]
    assert lost.data == {"nodes": ["n1"], "users": ["alice"]}
    assert [r["node"] for r in e2.presence_get(["alice"])["alice"]] == ["n2"]
    assert e2.channel_counts(["room"]) == {"room": 5}


def crash(engine):
    """A node that dies without a word: its greenlets stop, its connections drop."""
    engine._running = False
    gevent.killall(engine._greenlets)
    engine._pool.disconnect()


def test_crashed_node_presence_expires_within_ttl(redis_factory):
    f = redis_factory
    e1, _ = f.make("n1", presence_ttl=2)
    e2, r2 = f.make("n2", presence_ttl=2)
    assert f.ready(e1) and f.ready(e2)
    e1.presence_set("alice", {"status": "online", "platforms": ["ios"]})
    e1.presence_set("bob", {"status": "online", "platforms": ["android"]})
    gevent.sleep(0.3)
    assert len(e2.presence_get(["alice"])["alice"]) == 1
    crash(e1)
    assert r2.wait(lambda got: any(ev.kind == "nodes_lost" for _, ev in got), timeout=2.5)
    assert e2.presence_get(["alice", "bob"]) == {"alice": [], "bob": []}
    _, lost = r2.kinds("nodes_lost")[0]
    assert sorted(lost.data["users"]) == ["alice", "bob"]


def kill_pubsub_and_resync(engine, recorder):
    """CLIENT KILL the engine's pub/sub connection only (other clients of this Redis live on),
    then wait until the engine has reconnected and resynced."""
    resyncs = recorder.resyncs
    r = redis.Redis.from_url(REDIS_URL)
    try:
        name = f"imd:{engine.node_id}:pubsub"
        ids = [c["id"] for c in r.client_list(_type="pubsub") if c.get("name") == name]
        assert ids, "the engine's pub/sub connection is not in CLIENT LIST"
        for cid in ids:
            r.client_kill_filter(_id=cid)
    finally:
        r.close()
    assert recorder.wait(lambda got: recorder.resyncs > resyncs, timeout=10)


def test_reconnect_resubscribes_and_resyncs(redis_factory):
    f = redis_factory
    e1, r1 = f.make("n1")
    e2, _ = f.make("n2")
    for i in range(2500):                               # several SUBSCRIBE batches
        e1.subscribe(f"u:user{i}")
    assert f.ready(e1) and f.ready(e2)
    kill_pubsub_and_resync(e1, r1)
    assert e1.state()["reconnects"] == 1 and e1.state()["subscribed"] == 2500
    e2.publish("u:user0", entry("user0", 1))
    e2.publish("u:user2499", entry("user2499", 1))
    assert r1.wait(lambda got: len(r1.kinds("entry")) == 2)
    assert sorted(c for c, _ in r1.kinds("entry")) == ["u:user0", "u:user2499"]


def test_user_subscriptions_keep_no_channel_strings_and_survive_a_reconnect(redis_factory):
    f = redis_factory
    e1, r1 = f.make("n1")
    e2, _ = f.make("n2")
    users = [f"user{i}" for i in range(1500)]           # two SUBSCRIBE batches
    for u in users:
        e1.subscribe_user(u)
    assert f.ready(e1) and f.ready(e2)
    assert e1._subs == set() and all(any(u is x for x in e1._users) for u in users[:3])
    assert r1.wait(lambda got: e1.state()["subscribed"] == 1500)
    kill_pubsub_and_resync(e1, r1)
    assert e1.state()["subscribed"] == 1500
    for u in users[500:]:
        e1.unsubscribe_user(u)
    e1.subscribe_user("user1499")                       # back before its UNSUBSCRIBE went out
    assert f.ready(e1) and r1.wait(lambda got: e1.state()["subscribed"] == 501)
    for u in ("user0", "user499", "user500", "user1499"):
        e2.publish("u:" + u, entry(u, 1))
    assert r1.wait(lambda got: len(r1.kinds("entry")) == 3)
    gevent.sleep(0.2)
    assert sorted(c for c, _ in r1.kinds("entry")) == ["u:user0", "u:user1499", "u:user499"]


def test_presence_records_kept_in_memory_are_right_sized(redis_factory):
    """orjson.dumps returns bytes that keep a 4 KiB buffer: a record must not keep one."""
    import tracemalloc
    e, _ = redis_factory.make("n1")
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(500):
            e.presence_set(f"user{i}", {"status": "online", "platforms": ["web"], "devices": [f"d{i}"]})
        per_user = (tracemalloc.get_traced_memory()[0] - before) / 500
    finally:
        tracemalloc.stop()
    assert per_user < 512
    assert e.presence_get(["user7"])["user7"][0]["devices"] == ["d7"]


def test_records_rewritten_when_redis_loses_them(redis_factory):
    f = redis_factory
    e1, _ = f.make("n1", presence_ttl=2)
    e2, r2 = f.make("n2", presence_ttl=2)
    assert f.ready(e1) and f.ready(e2)
    e1.presence_set("alice", {"status": "online", "platforms": ["ios"]})
    gevent.sleep(0.3)
    r = redis.Redis.from_url(REDIS_URL)
    keys = list(r.scan_iter(match=f.prefix + "*"))
    r.delete(*keys)                          # as if Redis restarted empty
    r.close()
    assert e2.presence_get(["alice"]) == {"alice": []}
    with gevent.Timeout(3, False):
        while not e2.presence_get(["alice"])["alice"]:
            gevent.sleep(0.1)
    assert [x["node"] for x in e2.presence_get(["alice"])["alice"]] == ["n1"]
    assert not r2.kinds("nodes_lost")        # nobody announced alice offline


def test_publications_queued_while_redis_unreachable():
    """Without Redis: publishing never blocks, the queue is bounded, local delivery
    and this node's presence go on."""
    from imd.engine.redis import RedisEngine
    e = RedisEngine("redis://127.0.0.1:1/0", presence_ttl=2, max_queue_bytes=10 * 256)
    got = []
    e.start("lonely", lambda c, ev: got.append(ev))
    e.subscribe("u:a")
    for i in range(25):
        e.publish("u:a", Event("transient", {"i": i, "pad": "x" * 180}))
    gevent.sleep(0.1)
    assert [ev.data["i"] for ev in got] == list(range(25))     # local delivery goes on
    st = e.state()
    assert st["connected"] is False and st["publish_queue"] + st["dropped"] == 25
    assert 0 < st["publish_queue_bytes"] <= 10 * 256 and st["dropped"] > 0
    # presence answers from this node's own records
    e.presence_set("a", {"status": "online", "platforms": ["ios"]})
    assert e.presence_get(["a", "b"]) == {"a": [{"status": "online", "platforms": ["ios"], "node": "lonely"}],
                                          "b": []}
    e._running = False
    gevent.killall(e._greenlets)


def test_malformed_bus_messages_are_skipped(redis_factory):
    """Whatever else publishes on our channels, the reader logs and goes on."""
    f = redis_factory
    e, rec = f.make("n1")
    e.subscribe("u:a")
    assert f.ready(e)
    r = redis.Redis.from_url(REDIS_URL)
    for raw in (b"", b"garbage-without-space", b"n9 {not json", b"n9 [1,2]", b'n9 {"k":"entry"}',
                b"n9 " + b"x" * 100000, "n9 \u2603".encode()):
        r.publish(f.prefix + "u:a", raw)
    r.publish(f.prefix + "u:a", b"n9 " + Event("transient", {"ok": True}, "n9").encode())
    r.close()
    assert rec.wait(lambda got: len(got) == 1)
    channel, ev = rec.got[0]
    assert channel == "u:a" and ev.data == {"ok": True} and ev.origin == "n9"
    assert e.state()["connected"] is True


def test_node_reaped_while_alive_restores_its_records(redis_factory):
    """A node cut off from Redis longer than the TTL is reaped by the others;
    when it is back it rewrites its records and asks presence to announce again."""
    f = redis_factory
    e1, r1 = f.make("n1", presence_ttl=2)
    e2, r2 = f.make("n2", presence_ttl=2)
    assert f.ready(e1) and f.ready(e2)
    e1.presence_set("alice", {"status": "online", "platforms": ["ios"]})
    gevent.sleep(0.3)
    tick = e1._greenlets[3]
    tick.kill()                                  # n1 stops refreshing its liveness
    assert r2.wait(lambda got: any(ev.kind == "nodes_lost" for _, ev in got), timeout=4)
    assert e2.presence_get(["alice"]) == {"alice": []}
    e1._greenlets[3] = gevent.spawn(e1._tick_loop)
    assert r1.wait(lambda got: any(ev.kind == "presence_restore" for _, ev in got), timeout=3)
    _, restore = r1.kinds("presence_restore")[0]
    assert restore.data["users"] == ["alice"]
    with gevent.Timeout(3, False):
        while not e2.presence_get(["alice"])["alice"]:
            gevent.sleep(0.05)
    assert [x["node"] for x in e2.presence_get(["alice"])["alice"]] == ["n1"]


def test_burst_of_publications_arrives_complete(redis_factory):
    """A reminder to many users at once: far more publications than one pipeline
    batch, to as many channels, all delivered, none dropped."""
    f = redis_factory
    e1, _ = f.make("n1")
    e2, r2 = f.make("n2")
    n = 20000
    for i in range(n):
        e2.subscribe(f"u:user{i}")
    assert f.ready(e1) and f.ready(e2)
    for i in range(n):
        e1.publish(f"u:user{i}", Event("entry", {"user": f"user{i}", "seq": 1, "kind": "notice"}))
    assert r2.wait(lambda got: len(got) == n, timeout=30)
    assert {c for c, _ in r2.got} == {f"u:user{i}" for i in range(n)}
    assert e1.state()["dropped"] == 0


def test_node_channels_in_one_order_everywhere(redis_factory):
    """On ``all`` (and comet channels) every node, the publishers too, sees the
    publications of all nodes in the same order: the comet replicas depend on it."""
    f = redis_factory
    e1, r1 = f.make("n1")
    e2, r2 = f.make("n2")
    for e in (e1, e2):
        e.subscribe("all")
    assert f.ready(e1) and f.ready(e2)
    for i in range(200):
        (e1 if i % 3 else e2).publish("all", Event("comet", {"i": i}))
    assert r1.wait(lambda got: len(got) == 200) and r2.wait(lambda got: len(got) == 200)
    gevent.sleep(0.2)
    order1 = [(ev.origin, ev.data["i"]) for _, ev in r1.got]
    order2 = [(ev.origin, ev.data["i"]) for _, ev in r2.got]
    assert order1 == order2 and len(order1) == 200


def test_applied_callback_after_own_handler(factory):
    """publish(..., applied=cb): cb(True) once this node's handler has the event
    (read-your-writes), on ordered and user channels alike, or at once when the
    node does not subscribe to the channel."""
    e, rec = factory.make("n1")
    e.subscribe("all")
    e.subscribe("u:a")
    assert factory.ready(e)
    seen = []
    for ch in ("all", "u:a", "c:elsewhere"):
        e.publish(ch, Event("comet", {"ch": ch}),
                  applied=lambda ok, ch=ch: seen.append((ch, ok, [c for c, _ in rec.got])))
    with gevent.Timeout(5, False):
        while len(seen) < 3:
            gevent.sleep(0.01)
    by = {ch: (ok, got) for ch, ok, got in seen}
    assert by["all"][0] is True and "all" in by["all"][1]
    assert by["u:a"][0] is True and "u:a" in by["u:a"][1]
    assert by["c:elsewhere"][0] is True
    assert sorted(c for c, _ in rec.got) == ["all", "u:a"]          # each once
