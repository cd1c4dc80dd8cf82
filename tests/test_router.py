"""The router's answers to a message when the store's write queue is full
(docs/protocol.md, error 503): a new message is refused and not stored; a re-send
of a message stored before gets that message's ack."""

import sqlite3

import pytest

from imd.client import Client
from imd.store.sqlite import FILENAME
from tests import inproc
from tests.daemon import token


@pytest.fixture
def node(tmp_path):
    d = inproc.start(tmp_path, {"store": {"queue_size": 3}})
    yield d
    d.stop(reconnect=False, timeout=5)


def refused_total(node) -> float:
    for line in node.metrics.render().splitlines():
        if line.startswith("imd_store_refused_total "):
            return float(line.split()[1])
    return 0.0


def test_a_resend_of_a_stored_message_gets_its_ack_while_the_queue_is_full(node, tmp_path):
    a = Client(*inproc.addr(node))
    a.auth(token("ra", "host"), "ios", "d1")
    first = a.msg("rb", "first", id="c-1")
    blocker = sqlite3.connect(str(tmp_path / "var" / FILENAME), isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")          # the writer waits; reads go on (WAL)
    try:
        replies = {}
        for i in range(2, 40):                  # fill the queue until the store refuses
            a.send({"type": "msg", "id": f"c-{i}", "to": "rb", "body": "x"})
            reply = a.wait_for(lambda e: e.get("type") == "error", timeout=0.5) if i > 4 else None
            if reply is not None:
                replies[reply["id"]] = reply
                break
        else:
            pytest.fail("the queue never filled")
        refused_id, refused = next(iter(replies.items()))
        assert refused["code"] == 503
        assert refused_total(node) == 1
        a.send({"type": "msg", "id": "c-1", "to": "rb", "body": "first"})      # the ack was lost, say
        again = a.wait_for(lambda e: e.get("id") == "c-1", timeout=10)
        assert again["type"] == "ack"
        assert (again["mid"], again["seq"], again["ts"]) == (first["mid"], first["seq"], first["ts"])
        assert refused_total(node) == 1
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    b = Client(*inproc.addr(node))
    b.auth(token("rb", "guest"), "android", "d2")
    entries = b.sync(0)                # (after the offline entries its login pushed)
    assert refused_id not in {e["id"] for e in entries}                 # the refused one was not stored
    assert {e["mid"] for e in entries if e["id"] == "c-1"} == {first["mid"]}   # nor the re-send again
