"""Two native-app clients over raw TCP against a real imd process (issue 2)."""

import pytest

from imd import fastpath
from imd.client import ClientError
from tests.daemon import Imd


@pytest.fixture(params=["cython", "python"])
def imd(request, tmp_path):
    """The daemon on each fast-path implementation (the twin via IMD_PURE_PYTHON=1)."""
    if request.param == "cython" and fastpath.IMPL != "cython":
        pytest.skip("imd._fastpath is not built (see the build output of tests/conftest.py)")
    d = Imd(tmp_path, env={"IMD_PURE_PYTHON": "1" if request.param == "python" else "0"}).start()
    assert f"fastpath={request.param}" in d.log_text()
    yield d
    d.stop()


def test_chat_with_acks_and_ctx(imd):
    host = imd.login("host1", "host", "ios", "ih")
    guest = imd.login("guest1", "guest", "android", "ag")
    assert host.hello["user"] == "host1" and host.hello["role"] == "host" and host.hello["seq"] == 0
    ack = guest.msg("host1", "Is the flat free on Friday?", ctx={"listing": "L1", "booking": "B9"})
    assert ack["type"] == "ack" and ack["seq"] == 1 and ack["mid"] and ack["ts"] > 0
    got = host.wait_for(lambda e: e["type"] == "msg")
    assert got == {"type": "msg", "mid": ack["mid"], "seq": 1, "from": "guest1", "to": "host1",
                   "body": "Is the flat free on Friday?", "ts": ack["ts"],
                   "ctx": {"listing": "L1", "booking": "B9"}, "id": ack["id"]}   # the sender's client id
    ack2 = host.msg("guest1", {"text": "Yes", "price": 120})
    assert ack2["seq"] == 2        # host1's inbox: the received message, then its own
    got2 = guest.wait_for(lambda e: e["type"] == "msg")
    assert got2["body"] == {"text": "Yes", "price": 120} and got2["seq"] == 2 and got2["from"] == "host1"


def test_resent_client_id_stores_nothing_new(imd):
    a = imd.login("a1")
    b = imd.login("b1")
    first = a.msg("b1", "once", id="m-1")
    again = a.msg("b1", "once", id="m-1")
    assert again == first
    assert b.wait_for(lambda e: e["type"] == "msg")["mid"] == first["mid"]
    assert [e for e in b.drain(0.3) if e["type"] == "msg"] == []
    assert [e["seq"] for e in a.sync(0)] == [1]


def test_offline_delivery_on_reconnect_with_since(imd):
    b = imd.login("bob", device="phone")
    got = []
    a = imd.login("alice", "host")
    got.append(a.msg("bob", "one")["mid"])
    first = b.wait_for(lambda e: e["type"] == "msg")
    b.ack(first["seq"])
    b.close()
    for text in ("two", "three", "four"):
        got.append(a.msg("bob", text)["mid"])
    b = imd.login("bob", device="phone", since=first["seq"])
    missed = [b.wait_for(lambda e: e["type"] == "msg") for _ in range(3)]
    assert [m["body"] for m in missed] == ["two", "three", "four"]
    assert [m["seq"] for m in missed] == [2, 3, 4]
    assert b.hello["seq"] == 4


def test_login_without_since_gets_offline_entries_only(imd):
    a = imd.login("alice", "host")
    a.msg("bob", "while you were away")
    a.msg("bob", "and again")
    b = imd.login("bob", device="new-install")
    msgs = [b.wait_for(lambda e: e["type"] == "msg") for _ in range(2)]
    assert [m["body"] for m in msgs] == ["while you were away", "and again"]
    b.ack(msgs[-1]["seq"])
    b.msg("alice", "thanks")
    b.close()
    # every entry is now received by some device: a new device gets nothing old
    b2 = imd.login("bob", device="tablet")
    assert [e for e in b2.drain(0.4) if e["type"] in ("msg", "notice")] == []
    assert b2.hello["seq"] == 3


def test_second_device_sees_both_sides(imd):
    phone = imd.login("host9", "host", "ios", "phone")
    web = imd.login("host9", "host", "web", "browser")
    guest = imd.login("guest9")
    ack = phone.msg("guest9", "from my phone")
    mine = web.wait_for(lambda e: e["type"] == "msg")
    assert mine["from"] == "host9" and mine["to"] == "guest9" and mine["seq"] == ack["seq"]
    guest.msg("host9", "reply")
    assert phone.wait_for(lambda e: e["type"] == "msg")["body"] == "reply"
    assert web.wait_for(lambda e: e["type"] == "msg")["body"] == "reply"
    # the sending device is not echoed its own message: the ack told it
    assert [e for e in phone.drain(0.3) if e["type"] == "msg"] == []


def test_sync_pages_history(imd):
    a = imd.login("a2")
    for i in range(5):
        a.msg("b2", f"m{i}")
    page = a.sync(1, limit=2)
    assert [e["seq"] for e in page] == [2, 3]


def test_ping_pong_and_read_receipt(imd):
    a = imd.login("reader")
    b = imd.login("writer", "host")
    assert a.ping() == {"type": "pong"}
    ack = b.msg("reader", "please read")
    m = a.wait_for(lambda e: e["type"] == "msg")
    a.send({"type": "read", "peer": "writer", "seq": m["seq"]})
    r = b.wait_for(lambda e: e["type"] == "read")
    assert r["by"] == "reader" and r["seq"] == m["seq"]
    assert r["peer_seq"] == ack["seq"] and r["mid"] == ack["mid"]


def test_message_to_self_and_unknown_ack_are_refused_but_connection_stays(imd):
    a = imd.login("selfish")
    with pytest.raises(ClientError) as e:
        a.msg("selfish", "me")
    assert e.value.env["code"] == 400
    a.ack(99)
    err = a.wait_for(lambda e: e["type"] == "error")
    assert err["code"] == 400
    assert a.ping() == {"type": "pong"}
