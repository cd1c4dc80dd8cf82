"""iComet channels across two nodes sharing the redis engine (skipped without it).

A subscriber on node A gets what the admin port of node B published, with
the same seqs; a long-poll client that moves to node B resumes from B's
replica of the buffer; /sign on one node gives a token the other accepts.
"""

import time

import orjson
import pytest

from tests.proto.comet.live import Imd, Stream, request

pytest.importorskip("imd.engine.redis")
MSG = b'{"type":"%s","cname":"%s","seq":%d,"content":"%s"}'


def node(tmp_path_factory, name, extra=None):
    cfg = {"node": {"id": name}, "engine": {"backend": "redis", "url": "redis://127.0.0.1:6379/9"},
           "comet": {"polling_timeout": 5, "auth": "none"}}
    for k, v in (extra or {}).items():
        cfg.setdefault(k, {}).update(v)
    return Imd(tmp_path_factory.mktemp(name), cfg).start()


@pytest.fixture(scope="module")
def nodes(tmp_path_factory):
    a, b = node(tmp_path_factory, "ca"), node(tmp_path_factory, "cb")
    time.sleep(0.5)                       # both subscribed on the bus
    yield a, b
    a.stop()
    b.stop()


def test_publish_on_one_node_reaches_subscribers_on_the_other(nodes):
    a, b = nodes
    s = Stream(a.addr["comet"], "/stream?cname=cl1&seq=1")
    time.sleep(0.2)
    assert request(b.addr["admin"], "GET", "/push?cname=cl1&content=from-b")[0] == 200
    assert s.chunk() == MSG % (b"data", b"cl1", 1, b"from-b") + b"\n"
    request(a.addr["admin"], "GET", "/push?cname=cl1&content=from-a")
    assert s.chunk() == MSG % (b"data", b"cl1", 2, b"from-a") + b"\n"
    # a long-poll client moving to node B finds the same buffer and seqs there
    time.sleep(0.3)                       # B gets A's publication through Redis
    body = request(b.addr["comet"], "GET", "/sub?cname=cl1&seq=1")[2]
    assert body == b"[" + MSG % (b"data", b"cl1", 1, b"from-b") + b"," + MSG % (
        b"data", b"cl1", 2, b"from-a") + b"]\n"


def test_close_and_broadcast_everywhere(nodes):
    a, b = nodes
    sa = Stream(a.addr["comet"], "/stream?cname=cl2&seq=1")
    sb = Stream(b.addr["comet"], "/stream?cname=cl2&seq=1")
    time.sleep(0.2)
    request(a.addr["admin"], "GET", "/broadcast?content=hello")
    for s in (sa, sb):
        assert orjson.loads(s.chunk())["type"] == "broadcast"
        assert orjson.loads(s.chunk())["type"] == "next_seq"
    request(b.addr["admin"], "GET", "/close?cname=cl2")
    for s in (sa, sb):
        assert orjson.loads(s.chunk())["type"] == "close"
        assert s.chunk() == b""
