"""Hostile bytes against a live daemon's raw-TCP port hurt no other connection.

One daemon for the module. A sentinel pair (alice → bob) is logged in before
the fuzzing; each example opens a connection, sends arbitrary bytes or a
mutated valid exchange (auth, msg, sync, ...) in random pieces, and closes it
(or the server does). After every example the sentinel's connection still
answers a ping; at the end alice's message still reaches bob, the daemon is
alive, and its log has no traceback.
"""

import socket
import time

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from imd.fastpath import encode_frame
from tests.daemon import Imd, token
from tests.fuzz.strategies import FUZZ, mutate, split

LIVE = settings(FUZZ, max_examples=100)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    d = Imd(tmp_path_factory.mktemp("live"), {"limits": {"max_frame": 4096, "max_body": 1024,
                                                         "auth_timeout": 2}}).start()
    alice, bob = d.login("alice", "host"), d.login("bob", device="phone")
    yield d, alice, bob
    alice.close()
    bob.close()
    d.stop()


def frames(envs):
    return b"".join(encode_frame(orjson.dumps(e)) for e in envs)


exchange = st.lists(st.sampled_from([
    {"type": "auth", "token": token("mallory"), "platform": "ios", "device": "x"},
    {"type": "auth", "token": "not-a-token", "platform": "ios", "device": "x"},
    {"type": "msg", "id": "m1", "to": "bob", "body": "hi"},
    {"type": "msg", "id": "m2", "to": "bob", "body": {"k": [1, 2]}, "ctx": {"listing": "L1"}},
    {"type": "sync", "since": 0, "limit": 5}, {"type": "ack", "seq": 1}, {"type": "ping"},
    {"type": "read", "peer": "bob", "seq": 1}, {"type": "presence", "status": "away"},
]), min_size=1, max_size=5).map(frames)


def attack(d, data, draw):
    s = socket.create_connection(d.addr["tcp"], timeout=2)
    try:
        for piece in split(data, draw.draw):
            s.sendall(piece)
        s.settimeout(0.05)
        try:
            while s.recv(65536):
                pass
        except (socket.timeout, OSError):
            pass
    except OSError:
        pass                               # the server closed first: fine
    finally:
        s.close()


@LIVE
@given(data=st.binary(max_size=600), draw=st.data())
def test_arbitrary_bytes(daemon, data, draw):
    d, alice, _ = daemon
    attack(d, data, draw)
    assert alice.ping()["type"] == "pong"


@LIVE
@given(data=exchange, draw=st.data())
def test_mutated_exchanges(daemon, data, draw):
    d, alice, _ = daemon
    attack(d, mutate(data, draw.draw), draw)
    assert alice.ping()["type"] == "pong"


def test_sentinels_unaffected(daemon):
    d, alice, bob = daemon
    ack = alice.msg("bob", "still here?")
    got = bob.wait_for(lambda e: e.get("type") == "msg" and e.get("from") == "alice" and e["mid"] == ack["mid"])
    assert got["body"] == "still here?"
    assert d.proc.poll() is None
    time.sleep(0.1)
    assert "Traceback" not in d.log_text()
