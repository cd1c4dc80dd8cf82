"""The router's answers to a message when the store's write queue is full
(docs/protocol.md, error 503; docs/comet.md, POST /api/v1/messages): a new message
is refused and not stored; a re-send of a message stored before gets that message's
ack, from a client connection and from the web tier alike."""

import contextlib
import sqlite3

import pytest

from imd import router
from imd.client import Client
from imd.store.base import StoreFull
from imd.store.sqlite import FILENAME
from tests import inproc
from tests.daemon import token
from tests.test_metrics import value


@pytest.fixture
def node(tmp_path):
    """A node whose write queue holds 3 messages (queued and in flight)."""
    d = inproc.start(tmp_path, {"store": {"queue_size": 3}})
    yield d
    d.stop(reconnect=False, timeout=5)


def refused_total(node) -> float:
    return value(node.metrics.render(), "imd_store_refused_total") or 0.0


@contextlib.contextmanager
def full_queue(a, tmp_path):
    """The database's write lock held from outside (the writer waits; reads go on: WAL) and
    the queue filled by ``a``: c-2..c-4 wait, c-5 is refused."""
    blocker = sqlite3.connect(str(tmp_path / "var" / FILENAME), isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        for i in range(2, 5):
            a.msg("rb", "x", id=f"c-{i}", wait=False)
        a.msg("rb", "x", id="c-5", wait=False)
        refused = a.wait_for(lambda e: e.get("id") == "c-5", timeout=10)
        assert (refused["type"], refused["code"]) == ("error", 503)
        yield
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()


def test_a_resend_of_a_stored_message_gets_its_ack_while_the_queue_is_full(node, tmp_path):
    a = Client(*inproc.addr(node))
    a.auth(token("ra", "host"), "ios", "d1")
    first = a.msg("rb", "first", id="c-1")
    with full_queue(a, tmp_path):
        assert refused_total(node) == 1
        a.msg("rb", "first", id="c-1", wait=False)      # a re-send: its ack was lost, say
        again = a.wait_for(lambda e: e.get("id") == "c-1", timeout=10)
        assert again["type"] == "ack"
        assert (again["mid"], again["seq"], again["ts"]) == (first["mid"], first["seq"], first["ts"])
        assert refused_total(node) == 1
    b = Client(*inproc.addr(node))
    b.auth(token("rb", "guest"), "android", "d2")
    entries = b.sync(0)                # (after the offline entries its login pushed)
    assert "c-5" not in {e["id"] for e in entries}                      # the refused one was not stored
    assert {e["mid"] for e in entries if e["id"] == "c-1"} == {first["mid"]}   # nor the re-send again


def test_past_the_lookup_bound_a_resend_is_refused_at_once(node, tmp_path, monkeypatch):
    monkeypatch.setattr(router, "LOOKUPS_MAX", 0)
    a = Client(*inproc.addr(node))
    a.auth(token("ra", "host"), "ios", "d1")
    a.msg("rb", "first", id="c-1")
    with full_queue(a, tmp_path):
        a.msg("rb", "first", id="c-1", wait=False)
        again = a.wait_for(lambda e: e.get("id") == "c-1", timeout=10)
        assert (again["type"], again["code"]) == ("error", 503)
        assert refused_total(node) == 2


def test_the_web_tiers_resend_of_a_stored_message_gets_its_ack_while_the_queue_is_full(node, tmp_path):
    first = node.router.post_message("ra", "rb", "first", None, client_id="w-1")
    a = Client(*inproc.addr(node))
    a.auth(token("ra", "host"), "ios", "d1")
    with full_queue(a, tmp_path):
        assert node.router.post_message("ra", "rb", "first", None, client_id="w-1") == first
        with pytest.raises(StoreFull):
            node.router.post_message("ra", "rb", "new", None, client_id="w-2")
        with pytest.raises(StoreFull):
            node.router.post_message("ra", "rb", "no id", None)
