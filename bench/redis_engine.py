"""Costs of the Redis engine, measured against a Redis server (default: a private one you start).

    python bench/redis_engine.py [--url redis://127.0.0.1:6379/12] [--users 100000] [--msgs 200000]

Measures, for N users on one node: time to SUBSCRIBE N user channels (batched),
Redis memory per subscribed channel, time and Redis memory for N presence
records, and bus throughput: events published on one engine and received by
the handler of another (two engines in one process, so the number is a lower
bound of what two processes do on two cores). Prints one JSON object.
"""

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402

import gevent  # noqa: E402
import orjson  # noqa: E402
import redis  # noqa: E402

from imd.engine.base import Event  # noqa: E402
from imd.engine.redis import RedisEngine  # noqa: E402


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def used(r) -> int:
    return r.info("memory")["used_memory"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="redis://127.0.0.1:6379/12")
    ap.add_argument("--users", type=int, default=100000)
    ap.add_argument("--msgs", type=int, default=200000)
    a = ap.parse_args()
    prefix = f"bench:{uuid.uuid4().hex[:6]}:"
    r = redis.Redis.from_url(a.url)
    out = {"users": a.users, "msgs": a.msgs}
    got = [0]
    e1 = RedisEngine(a.url, presence_ttl=30, prefix=prefix)
    e2 = RedisEngine(a.url, presence_ttl=30, prefix=prefix)
    e1.start("b1", lambda c, ev: None)
    e2.start("b2", lambda c, ev: got.__setitem__(0, got[0] + 1))
    while not (e1.connected and e2.connected and e2._first_tick_done.is_set()):
        gevent.sleep(0.01)

    users = [f"user{i}" for i in range(a.users)]
    m0, p0 = used(r), rss()
    t0 = time.perf_counter()
    for u in users:
        e2.subscribe("u:" + u)
    while e2._sub_dirty:
        gevent.sleep(0.001)
    r.execute_command("PING")
    while r.pubsub_numsub(prefix + "u:" + users[-1])[0][1] == 0:
        gevent.sleep(0.001)
    out["subscribe_s"] = round(time.perf_counter() - t0, 3)
    out["redis_bytes_per_channel"] = round((used(r) - m0) / a.users, 1)
    out["node_bytes_per_channel"] = round((rss() - p0) / a.users, 1)

    m0, p0 = used(r), rss()
    t0 = time.perf_counter()
    state = {"status": "online", "platforms": ["android"]}
    for u in users:
        e2.presence_set(u, state)
    while e2._presence.dirty:
        gevent.sleep(0.001)
    gevent.sleep(0.2)
    out["presence_write_s"] = round(time.perf_counter() - t0, 3)
    out["redis_bytes_per_presence_record"] = round((used(r) - m0) / a.users, 1)
    out["node_bytes_per_presence_record"] = round((rss() - p0) / a.users, 1)
    t0 = time.perf_counter()
    for i in range(0, a.users, 1000):
        e1.presence_get(users[i:i + 1000])
    out["presence_get_per_s"] = round(a.users / (time.perf_counter() - t0))

    body = {"user": "x", "seq": 1, "mid": "m" * 22, "kind": "msg", "body": "hello there, is it free?",
            "ts": 1, "sender": "y", "recipient": "x", "ctx": None, "notice_kind": None}
    t0 = time.perf_counter()
    for i in range(a.msgs):
        e1.publish("u:" + users[i % a.users], Event("entry", dict(body, seq=i)))
        if i % 1000 == 999:
            gevent.sleep(0)
    while got[0] < a.msgs and time.perf_counter() - t0 < 120:
        gevent.sleep(0.01)
    dt = time.perf_counter() - t0
    out["bus_events_received"] = got[0]
    out["bus_events_per_s"] = round(got[0] / dt)
    out["event_bytes"] = len(Event("entry", body, "b1").encode())
    e1.stop()
    e2.stop()
    keys = list(r.scan_iter(match=prefix + "*", count=5000))
    for i in range(0, len(keys), 5000):
        r.delete(*keys[i:i + 5000])
    print(orjson.dumps(out).decode())


if __name__ == "__main__":
    main()
