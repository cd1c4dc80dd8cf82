"""The store contract (imd/store/base.py, DESIGN.md §3 and §6), run against every backend."""

import importlib
import itertools
import os
import signal
import subprocess
import sys
import time

import gevent
import pytest

from imd.store.base import Entry, MessageResult, StoreFull, UserInfo

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class Acks:
    """Collects (tag, result, error) of store callbacks in the order they ran."""

    def __init__(self):
        self.items = []

    def cb(self, tag):
        return lambda result, error: self.items.append((tag, result, error))

    def results(self):
        assert all(e is None for _, _, e in self.items), self.items
        return [r for _, r, _ in self.items]


def send(store, acks, sender, recipient, cid, body="hi", ctx=None, mid=None, ts=1000):
    store.send_message(sender, recipient, cid, body, ctx, mid or "m-%s-%s" % (sender, cid), ts,
                       acks.cb(cid))


def send_now(store, acks, *args, **kw):
    """send() and wait for the commit: fixes the order between senders (N writers)."""
    send(store, acks, *args, **kw)
    assert store.flush(10)


def mid_maker(prefix="n"):
    counter = itertools.count(1)
    return lambda: "%s%d" % (prefix, next(counter))


def wait_until(predicate, bound=30.0):
    """Poll ``predicate`` (cooperatively) until true or ``bound`` seconds pass."""
    for _ in range(int(bound / 0.02)):
        if predicate():
            return True
        gevent.sleep(0.02)
    return predicate()


# -- seqs and both inboxes ---------------------------------------------------

def test_seqs_start_at_one_dense_unique(store):
    acks = Acks()
    for i in range(30):
        send(store, acks, "alice", "bob" if i % 2 else "carol", "c%d" % i)
        if i % 7 == 0:
            assert store.flush(10)
    assert store.flush(10)
    results = acks.results()
    assert [r.sender_seq for r in results] == list(range(1, 31))
    assert [r.recipient_seq for r in results if r.entries[1].user == "bob"] == list(range(1, 16))
    assert [r.recipient_seq for r in results if r.entries[1].user == "carol"] == list(range(1, 16))
    assert [e.seq for e in store.inbox("alice", 0, 100)] == list(range(1, 31))
    assert store.last_seq("alice") == 30 and store.last_seq("bob") == 15
    assert store.last_seq("nobody") == 0
    assert store.last_seqs(["alice", "bob", "carol", "nobody"]) == {"alice": 30, "bob": 15, "carol": 15,
                                                                    "nobody": 0}
    assert store.last_seqs([]) == {}


def test_last_seqs_is_bounded(store):
    from imd.store.base import LAST_SEQS_MAX
    users = [f"u{i}" for i in range(LAST_SEQS_MAX)]
    assert store.last_seqs(users) == dict.fromkeys(users, 0)
    with pytest.raises(ValueError):
        store.last_seqs(users + ["one-too-many"])


def test_message_lands_in_both_inboxes(store):
    acks = Acks()
    body = {"text": "你好", "n": [1, 2.5, None, True], "deep": {"x": {"y": "z"}}}
    ctx = {"listing": "L1", "booking": "B9"}
    send(store, acks, "host1", "guest1", "id-1", body=body, ctx=ctx, mid="M1", ts=1712345678901)
    assert store.flush(10)
    [result] = acks.results()
    assert isinstance(result, MessageResult) and not result.duplicate
    assert (result.mid, result.ts, result.sender_seq, result.recipient_seq) == ("M1", 1712345678901, 1, 1)
    mine, theirs = result.entries
    assert (mine.user, theirs.user) == ("host1", "guest1")
    [stored_s] = store.inbox("host1", 0, 10)
    [stored_r] = store.inbox("guest1", 0, 10)
    assert stored_s == mine and stored_r == theirs
    assert stored_r.body == body and stored_r.ctx == ctx
    assert stored_r.envelope() == {"type": "msg", "mid": "M1", "seq": 1, "from": "host1",
                                   "to": "guest1", "body": body, "ctx": ctx, "ts": 1712345678901,
                                   "id": "id-1"}


def test_string_body_and_no_ctx_round_trip(store):
    acks = Acks()
    for cid, body in [("a", "plain"), ("b", ""), ("c", '{"not": "an object"}'), ("d", "\u0000\U0001F600")]:
        send(store, acks, "u1", "u2", cid, body=body)
    assert store.flush(10)
    entries = store.inbox("u2", 0, 10)
    assert [e.body for e in entries] == ["plain", "", '{"not": "an object"}', "\u0000\U0001F600"]
    assert all(e.ctx is None and "ctx" not in e.envelope() for e in entries)


def test_message_to_oneself_is_refused(store):
    with pytest.raises(ValueError):
        store.send_message("same", "same", "c1", "x", None, "m1", 1, lambda r, e: None)


# -- durability: ack only after commit ---------------------------------------

def test_acked_message_survives_close_and_reopen_and_seqs_continue(backend):
    first = backend.make()
    first.open()
    acks = Acks()
    send(first, acks, "a", "b", "c1", mid="M1")
    send(first, acks, "b", "a", "c2", mid="M2")
    first.add_notices(["a"], None, "booking.confirmed", {"b": 1}, mid_maker(), 5, acks.cb("n"))
    first.touch_user("a", "host", "web", 77)
    first.set_cursor("a", "d1", 2)
    first.add_contact("a", "b")
    first.set_password("a", {"salt": "xx", "iterations": 4096})
    first.close()
    assert len(acks.items) == 3
    second = backend.make()
    second.open()
    try:
        stored = second.inbox("a", 0, 10)      # N writers may commit different senders in any order
        assert sorted(e.mid for e in stored) == ["M1", "M2", "n1"] and [e.seq for e in stored] == [1, 2, 3]
        assert second.cursor("a", "d1") == 2
        assert second.contacts("b") == {"a"}
        assert second.password("a") == {"salt": "xx", "iterations": 4096}
        assert second.users_info(["a"])["a"] == UserInfo("a", "host", 77, "web")
        acks2 = Acks()
        send(second, acks2, "a", "b", "c3", mid="M3")
        send(second, acks2, "a", "b", "c1", mid="M1-again")        # dedupe survives reopen
        assert second.flush(10)
        new, dup = acks2.results()
        assert (new.sender_seq, new.recipient_seq) == (4, 3)
        original = next(r for tag, r, _ in acks.items if tag == "c1")
        assert dup.duplicate and dup.mid == "M1" and dup.sender_seq == original.sender_seq
    finally:
        second.close()


def test_no_ack_before_commit_and_failed_batch_is_retried(backend):
    store = backend.make()
    store.open()
    try:
        acks = Acks()
        with backend.writes_blocked():
            for i in range(3):
                send(store, acks, "x", "y", "c%d" % i)
            assert wait_until(lambda: store.stats()["retries"] >= 1)
            assert acks.items == []
            assert store.stats()["queue"] == 3
            assert store.inbox("y", 0, 10) == []
        assert store.flush(60)
        assert [r.recipient_seq for r in acks.results()] == [1, 2, 3]
        assert [e.seq for e in store.inbox("y", 0, 10)] == [1, 2, 3]
        assert store.stats()["queue"] == 0
    finally:
        store.close()


def test_store_full_at_queue_limit_then_drains(backend):
    store = backend.make(queue_size=5, batch_max=2)
    store.open()
    try:
        acks = Acks()
        with backend.writes_blocked():
            for i in range(5):
                send(store, acks, "p", "q", "c%d" % i)
            with pytest.raises(StoreFull):
                send(store, acks, "p", "q", "c5")
            with pytest.raises(StoreFull):
                store.add_notices(["q"], None, "k", "b", mid_maker(), 1, acks.cb("n"))
            assert acks.items == []
        assert store.flush(60)
        assert [tag for tag, _, _ in acks.items] == ["c%d" % i for i in range(5)]
        send(store, acks, "p", "q", "c5")
        assert store.flush(10)
        assert [r.sender_seq for r in acks.results()] == list(range(1, 7))
    finally:
        store.close()


def test_callbacks_run_in_submission_order_across_batches(backend):
    """One writer: callbacks in submission order. N writers: in order per sender."""
    store = backend.make(batch_max=7)
    store.open()
    try:
        acks = Acks()
        mids = mid_maker()
        for i in range(100):
            if i % 10 == 3:
                store.add_notices(["r%d" % (i % 3)], None, "k", i, mids, i, acks.cb("n%d" % i))
            else:
                send(store, acks, "s%d" % (i % 4), "r%d" % (i % 3), "c%d" % i)
        assert store.flush(30)
        tags = [tag for tag, _, _ in acks.items]
        expected = ["n%d" % i if i % 10 == 3 else "c%d" % i for i in range(100)]
        if store.stats()["writers"] == 1:
            assert tags == expected
        for s in range(4):
            mine = ["c%d" % i for i in range(100) if i % 10 != 3 and i % 4 == s]
            assert [t for t in tags if t in mine] == mine
            assert [r.sender_seq for t, r, _ in acks.items if t in mine] == list(range(1, len(mine) + 1))
        stats = store.stats()
        assert stats["batches"] >= 100 // 7 and stats["committed"] == 100 and stats["queue"] == 0
    finally:
        store.close()


# -- dedupe -------------------------------------------------------------------

def test_dedupe_in_the_same_batch(store):
    acks = Acks()
    send(store, acks, "a", "b", "same", body="one", mid="M1", ts=10)
    send(store, acks, "a", "b", "same", body="two", mid="M2", ts=20)
    assert store.flush(10)
    first, second = acks.results()
    assert not first.duplicate and second.duplicate and second.entries == []
    assert (second.mid, second.ts, second.sender_seq, second.recipient_seq) == \
        (first.mid, first.ts, first.sender_seq, first.recipient_seq)
    assert [e.body for e in store.inbox("b", 0, 10)] == ["one"]
    assert store.last_seq("a") == 1 and store.last_seq("b") == 1


def test_dedupe_in_later_batches_and_per_sender(store):
    acks = Acks()
    send(store, acks, "a", "b", "id1", mid="M1", ts=10)
    assert store.flush(10)
    send_now(store, acks, "a", "b", "id1", mid="M9", ts=99)
    send(store, acks, "c", "b", "id1", mid="M3", ts=30)      # another sender: not a duplicate
    assert store.flush(10)
    first, again, other = acks.results()
    assert again.duplicate and (again.mid, again.ts, again.sender_seq, again.recipient_seq) == \
        ("M1", 10, 1, 1)
    assert not other.duplicate and other.recipient_seq == 2
    assert [e.mid for e in store.inbox("b", 0, 10)] == ["M1", "M3"]


def test_stored_ack_names_the_stored_message_of_a_client_id(store):
    acks = Acks()
    send(store, acks, "a", "b", "id1", mid="M1", ts=10)
    send(store, acks, "a", "b", "id2", mid="M2", ts=20)
    send(store, acks, "a", "b", None, mid="M3", ts=30)
    assert store.flush(10)
    assert store.stored_ack("a", "id2") == ("M2", 2, 20)
    assert store.stored_ack("a", "id1") == ("M1", 1, 10)
    assert store.stored_ack("b", "id1") is None           # per sender
    assert store.stored_ack("a", "id3") is None


def test_stored_ack_is_answered_while_writes_wait(backend):
    store = backend.make(queue_size=5)
    store.open()
    try:
        acks = Acks()
        send_now(store, acks, "a", "b", "id1", mid="M1", ts=10)
        with backend.writes_blocked():
            send(store, acks, "a", "b", "id2", mid="M2", ts=20)
            assert store.stored_ack("a", "id1") == ("M1", 1, 10)
            assert store.stored_ack("a", "id2") is None     # queued, not stored
        assert store.flush(60)
        assert store.stored_ack("a", "id2") == ("M2", 2, 20)
    finally:
        store.close()


def test_entries_carry_the_senders_client_id(store):
    """Inbox, offline and commit-callback entries all carry messages.client_id (XMPP
    stanza ids and receipts rely on it); notices and id-less messages have None."""
    acks = Acks()
    send_now(store, acks, "a", "b", "cid-1:x", mid="M1")
    store.send_message("a", "b", None, "no id", None, "M2", 1, acks.cb("none"))
    assert store.flush(10)
    store.add_notices(["b"], None, "k", "n", mid_maker(), 2, acks.cb("n"))
    assert store.flush(10)
    first, second, notices = acks.results()
    assert [e.client_id for e in first.entries] == ["cid-1:x", "cid-1:x"]
    assert [e.client_id for e in second.entries] == [None, None]
    assert [e.client_id for e in notices] == [None]
    stored = store.inbox("b", 0, 10)
    assert [e.client_id for e in stored] == ["cid-1:x", None, None]
    assert stored[0] == first.entries[1]
    assert [e.client_id for e in store.offline("b", 10)] == ["cid-1:x", None, None]
    assert [e.client_id for e in store.inbox("a", 0, 10)] == ["cid-1:x", None]
    assert stored[0].envelope()["id"] == "cid-1:x" and "id" not in stored[1].envelope()


def test_flags_round_trip(store):
    """A message's flags (an XMPP sender's receipt request) come back in the commit
    callback's entries, the inbox, offline and attach reads of both users; other messages
    and notices have 0; the envelope never shows them."""
    acks = Acks()
    store.send_message("a", "b", "r1", "asks", None, "M1", 1, acks.cb("asks"), flags=1)
    store.send_message("a", "b", "r2", "plain", None, "M2", 2, acks.cb("plain"))
    store.send_message("a", "b", "r1", "again", None, "M3", 3, acks.cb("dup"))     # a duplicate
    assert store.flush(10)
    store.add_notices(["b"], None, "k", "n", mid_maker(), 4, acks.cb("n"))
    assert store.flush(10)
    asks, plain, dup, notices = acks.results()
    assert [e.flags for e in asks.entries] == [1, 1] and [e.flags for e in plain.entries] == [0, 0]
    assert dup.duplicate and dup.mid == "M1" and not dup.entries
    assert [e.flags for e in notices] == [0]
    assert [e.flags for e in store.inbox("b", 0, 10)] == [1, 0, 0]
    assert [e.flags for e in store.offline("b", 10)] == [1, 0, 0]
    assert [e.flags for e in store.attach_states([("b", False, 10)])[0].offline] == [1, 0, 0]
    assert [e.flags for e in store.inbox("a", 0, 10)] == [1, 0]
    assert store.inbox("b", 0, 1)[0] == asks.entries[1]
    assert "flags" not in store.inbox("b", 0, 1)[0].envelope()


def test_migration_2_gives_existing_messages_flags_0(backend, monkeypatch):
    """A database at schema version 1 with a message in it is upgraded at open: the
    old row reads back with flags 0, new ones keep theirs."""
    module = importlib.import_module(backend.migrations_module)
    every = module.migrations
    monkeypatch.setattr(module, "migrations", lambda name: every(name)[:1])
    old = backend.make_here()
    old.open()
    old.close()
    user_column = "user" if backend.schema_names == "sqlite" else "user_id"
    backend.execute("INSERT INTO messages (mid, kind, sender, recipient, body, ts, sender_seq, "
                    "recipient_seq) VALUES ('M1', 'msg', 'a', 'b', '\"old\"', 1, 1, 1)")
    for user, inbound in (("a", "false"), ("b", "true")):     # as the writer stores a message
        backend.execute("INSERT INTO inbox (%s, seq, mid, inbound) VALUES ('%s', 1, 'M1', %s)"
                        % (user_column, user, inbound))
        backend.execute("INSERT INTO users (id, last_seq) VALUES ('%s', 1)" % user)
    monkeypatch.setattr(module, "migrations", every)
    new = backend.make()
    new.open()
    try:
        acks = Acks()
        new.send_message("a", "b", "c2", "x", None, "M2", 2, acks.cb("c2"), flags=1)
        assert new.flush(10)
        assert [(e.mid, e.body, e.flags) for e in new.inbox("b", 0, 10)] == [("M1", "old", 0), ("M2", "x", 1)]
    finally:
        new.close()


def test_messages_without_client_id_are_not_deduplicated(store):
    acks = Acks()
    store.send_message("a", "b", None, "x", None, "M1", 1, acks.cb(1))
    store.send_message("a", "b", None, "x", None, "M2", 1, acks.cb(2))
    assert store.flush(10)
    assert [r.recipient_seq for r in acks.results()] == [1, 2]


# -- notices ------------------------------------------------------------------

def test_notices_to_a_list(store):
    acks = Acks()
    send_now(store, acks, "x", "u1", "c1")
    store.add_notices(["u1", "u2", "u1"], None, "booking.confirmed", {"booking": "B9"},
                      mid_maker(), 500, acks.cb("n"))
    assert store.flush(10)
    entries = acks.results()[1]
    assert [(e.user, e.seq, e.mid) for e in entries] == [("u1", 2, "n1"), ("u2", 1, "n2")]
    [stored] = store.inbox("u2", 0, 10)
    assert stored == entries[1]
    assert stored.envelope() == {"type": "notice", "mid": "n2", "seq": 1,
                                 "kind": "booking.confirmed", "body": {"booking": "B9"}, "ts": 500}


def test_notices_to_a_role_and_to_all(store):
    store.touch_user("h1", "host", "ios", 1)
    store.touch_user("h2", "host", "web", 2)
    store.touch_user("g1", "guest", "android", 3)
    acks = Acks()
    send(store, acks, "g1", "stranger", "c1")       # 'stranger' is not known through touch_user
    assert store.flush(10)
    store.add_notices(None, "host", "payout", "paid", mid_maker("h"), 9, acks.cb("role"))
    store.add_notices(None, None, "maintenance", "tonight", mid_maker("a"), 9, acks.cb("all"))
    assert store.flush(10)
    by_tag = {tag: r for tag, r, _ in acks.items}
    to_hosts, to_all = by_tag["role"], by_tag["all"]
    assert sorted(e.user for e in to_hosts) == ["h1", "h2"]
    assert sorted(e.user for e in to_all) == ["g1", "h1", "h2"]
    assert len({e.mid for e in to_hosts + to_all}) == 5
    assert [e.kind for e in store.inbox("h1", 0, 10)] == ["notice", "notice"]
    assert [e.notice_kind for e in store.inbox("g1", 0, 10)] == [None, "maintenance"]
    assert store.inbox("stranger", 0, 10)[0].kind == "msg" and store.last_seq("stranger") == 1


def test_notice_to_nobody(store):
    acks = Acks()
    store.add_notices(None, "host", "k", "b", mid_maker(), 1, acks.cb("n"))
    store.add_notices([], None, "k", "b", mid_maker(), 1, acks.cb("m"))
    assert store.flush(10)
    assert sorted(acks.results()) == [[], []]


# -- reads ----------------------------------------------------------------------

def test_inbox_paging(store):
    acks = Acks()
    for i in range(25):
        send(store, acks, "a", "b", "c%d" % i, body=i)
    assert store.flush(10)
    pages, since = [], 0
    while True:
        page = store.inbox("b", since, 10)
        if not page:
            break
        pages.append([e.body for e in page])
        since = page[-1].seq
    assert pages == [list(range(10)), list(range(10, 20)), list(range(20, 25))]
    assert [e.seq for e in store.inbox("b", 22, 100)] == [23, 24, 25]
    assert store.inbox("b", 25, 10) == [] and store.inbox("nobody", 0, 10) == []
    assert all(isinstance(e, Entry) for e in store.inbox("a", 0, 5))


def test_offline_is_inbound_entries_above_received_seq(store):
    acks = Acks()
    send_now(store, acks, "b", "a", "x1", mid="in1")       # a: seq 1 inbound
    send_now(store, acks, "a", "b", "y1", mid="out1")      # a: seq 2 outbound
    send_now(store, acks, "b", "a", "x2", mid="in2")       # a: seq 3
    store.add_notices(["a"], None, "k", "n", mid_maker(), 1, acks.cb("n"))   # a: seq 4
    assert store.flush(10)
    assert [e.mid for e in store.offline("a", 100)] == ["in1", "in2", "n1"]
    assert store.received_seq("a") == 0
    store.set_cursor("a", "phone", 1)
    store.set_cursor("a", "laptop", 3)
    assert store.flush(10)
    assert store.received_seq("a") == 3
    assert [e.mid for e in store.offline("a", 100)] == ["n1"]
    assert [e.mid for e in store.offline("a", 0)] == []
    assert [e.mid for e in store.offline("b", 1)] == ["out1"]


def test_attach_states_read_what_a_login_needs_in_one_call(store):
    acks = Acks()
    send_now(store, acks, "b", "a", "x1", mid="in1")       # a: seq 1 inbound; b: seq 1
    send_now(store, acks, "a", "b", "y1", mid="out1")      # a: seq 2; b: seq 2 inbound
    store.add_contact("a", "b")
    store.set_cursor("b", "phone", 2)
    assert store.flush(10)
    a, b, nobody = store.attach_states([("a", True, 100), ("b", False, 100), ("nobody", True, 0)])
    assert (a.top, a.contacts, [e.mid for e in a.offline]) == (2, {"b"}, ["in1"])
    assert (b.top, b.contacts, b.offline) == (2, None, [])          # everything received
    assert (nobody.top, nobody.contacts, nobody.offline) == (0, set(), None)
    assert [e.mid for e in store.attach_states([("a", False, 1)])[0].offline] == ["in1"]
    twice = store.attach_states([("a", True, 1), ("b", False, 5), ("a", False, 100)])   # two devices of a
    assert [[e.mid for e in st.offline] for st in twice] == [["in1"], [], ["in1"]]
    assert [st.contacts for st in twice] == [{"b"}, None, None] and [st.top for st in twice] == [2, 2, 2]


def test_reads_see_the_cursor_writes_made_before_them(store):
    """set_cursor is coalesced and fire-and-forget, yet a read that depends on cursors
    (a device logging out and in again) sees it: what it acknowledged does not come back.
    Each write follows a commit of coalesced writes, so it would wait its interval."""
    acks = Acks()
    for n in range(1, 5):
        send_now(store, acks, "b", "a", "x%d" % n, mid="in%d" % n)      # a: seqs 1-4 inbound

    def acknowledged(seq):
        store.set_cursor("z", "d", seq)
        assert store.flush(10)             # a commit of coalesced writes just happened
        store.set_cursor("a", "phone", seq)

    acknowledged(1)
    assert [e.mid for e in store.attach_states([("a", False, 10)])[0].offline] == ["in2", "in3", "in4"]
    acknowledged(2)
    assert [e.mid for e in store.offline("a", 10)] == ["in3", "in4"]
    acknowledged(3)
    assert store.received_seq("a") == 3
    acknowledged(4)
    assert store.cursor("a", "phone") == 4


def test_cursors_are_monotonic(store):
    store.set_cursor("u", "d1", 5)
    store.set_cursor("u", "d1", 3)
    assert store.flush(10)
    assert store.cursor("u", "d1") == 5
    store.set_cursor("u", "d1", 2)
    assert store.flush(10)
    assert store.cursor("u", "d1") == 5
    store.set_cursor("u", "d1", 9)
    store.set_cursor("u", "d2", 1)
    assert store.flush(10)
    assert (store.cursor("u", "d1"), store.cursor("u", "d2"), store.cursor("u", "d3")) == (9, 1, 0)
    assert store.received_seq("u") == 9 and store.received_seq("other") == 0


def test_contacts_mutual_add_remove_in_order(store):
    store.add_contact("h", "g1")
    store.add_contact("g2", "h")
    store.add_contact("h", "g3")
    store.remove_contact("g3", "h")
    store.add_contact("h", "g3")
    store.remove_contact("h", "g1")
    assert store.flush(10)
    assert store.contacts("h") == {"g2", "g3"}
    assert store.contacts("g1") == set() and store.contacts("g2") == {"h"}
    assert store.contacts("g3") == {"h"}
    store.remove_contact("h", "g3")
    store.add_contact("h", "g1")
    assert store.flush(10)
    assert store.contacts("h") == {"g1", "g2"} and store.contacts("nobody") == set()


def test_users_info_and_touch_user(store):
    store.touch_user("a", "host", "ios", 100)
    store.touch_user("b", "guest", "web", 200)
    assert store.flush(10)
    store.touch_user("a", None, "android", 150)
    store.touch_user("b", "guest", None, 50)           # older last-seen does not go back
    acks = Acks()
    send(store, acks, "a", "c", "m1")                  # c gets an inbox but is not "known"
    assert store.flush(10)
    info = store.users_info(["a", "b", "c", "zz", "a"])
    assert info == {"a": UserInfo("a", "host", 150, "android"), "b": UserInfo("b", "guest", 200, "web")}
    assert store.users_info([]) == {}


def test_passwords_set_get_delete(store):
    creds = {"sha256": {"salt": "c2FsdA==", "iterations": 4096, "stored_key": "AAA", "server_key": "BBB"}}
    assert store.password("u") is None
    store.set_password("u", creds)
    assert store.flush(10)
    assert store.password("u") == creds
    store.set_password("u", {"x": 1})
    store.set_password("u", creds)
    assert store.flush(10)
    assert store.password("u") == creds
    store.set_password("u", None)
    assert store.flush(10)
    assert store.password("u") is None


def test_last_sent_to(store):
    acks = Acks()
    send_now(store, acks, "a", "b", "1", mid="A1")     # a:1 b:1
    send_now(store, acks, "b", "a", "2", mid="B1")     # b:2 a:2
    send_now(store, acks, "a", "b", "3", mid="A2")     # a:3 b:3
    send_now(store, acks, "a", "c", "4", mid="A3")     # a:4 c:1
    assert store.flush(10)
    store.send_message("b", "a", None, "no id", None, "B2", 1000, acks.cb("none"))   # b:4 a:5
    assert store.flush(10)
    assert store.last_sent_to("a", "b", 3) == (3, "A2", "3")
    assert store.last_sent_to("a", "b", 2) == (1, "A1", "1")
    assert store.last_sent_to("a", "b", 0) is None
    assert store.last_sent_to("b", "a", 4) == (2, "B1", "2")
    assert store.last_sent_to("b", "a", 10) == (4, "B2", None)
    assert store.last_sent_to("c", "a", 10) is None



def test_last_sent_to_looks_read_scan_max_entries_back(store):
    """A receipt looks back ``read_scan_max`` entries of the reader's inbox (both
    directions count) from its seq: a sender's message further back is not found (the
    receipt goes without peer_seq/mid/id), one inside the window is."""
    store.read_scan_max = 4
    acks = Acks()
    send_now(store, acks, "a", "b", "1", mid="A1")     # b:1
    send_now(store, acks, "c", "b", "2", mid="C1")     # b:2 c:1
    send_now(store, acks, "b", "c", "3", mid="B1")     # b:3 (sent by b: counts too) c:2
    send_now(store, acks, "c", "b", "4", mid="C2")     # b:4 c:3
    assert store.last_sent_to("a", "b", 4) == (1, "A1", "1")       # b:1..4: inside
    send_now(store, acks, "d", "b", "5", mid="D1")     # b:5
    assert store.last_sent_to("a", "b", 5) is None                 # b:2..5: not inside
    assert store.last_sent_to("a", "b", 4) == (1, "A1", "1")       # the window ends at the seq
    assert store.last_sent_to("c", "b", 5) == (3, "C2", "4")
    assert store.last_sent_to("c", "b", 3) == (1, "C1", "2")
    assert store.last_sent_to("a", "b", 0) is None

def test_flush_waits_for_everything_before_it(store):
    acks = Acks()
    for i in range(50):
        send(store, acks, "a", "b", "c%d" % i)
        store.set_cursor("b", "d", i + 1)
    assert store.flush(10)
    assert len(acks.items) == 50 and store.cursor("b", "d") == 50
    assert store.flush(0) is True                    # nothing pending
    assert store.stats()["queue"] == 0


def test_reads_run_concurrently_with_writes(store):
    acks = Acks()

    def reader():
        seen = 0
        for _ in range(50):
            page = store.inbox("b", 0, 1000)
            assert [e.seq for e in page] == list(range(1, len(page) + 1))
            seen = max(seen, len(page))
            gevent.sleep(0)
        return seen

    readers = [gevent.spawn(reader) for _ in range(4)]
    for i in range(300):
        send(store, acks, "a", "b", "c%d" % i)
        if i % 30 == 0:
            gevent.sleep(0)
    assert store.flush(30)
    gevent.joinall(readers, raise_error=True)
    assert len(store.inbox("b", 0, 1000)) == 300


# -- kill -9 ----------------------------------------------------------------------

def test_kill_9_keeps_every_acked_message_exactly_once(backend):
    schema = backend.make()      # create the schema first, then leave the data to the child
    schema.open()
    schema.close()
    child = subprocess.Popen([sys.executable, "-m", "tests.store.ack_writer", backend.spec()],
                             cwd=ROOT, stdout=subprocess.PIPE, env=dict(os.environ, PYTHONPATH=ROOT))
    acked = []
    try:
        with gevent.Timeout(60):
            while len(acked) < 400:
                line = child.stdout.readline()
                assert line, "ack writer died"
                acked.append(line.split())
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    rest = child.stdout.read().split(b"\n")[:-1]     # acks printed before the kill, whole lines
    child.stdout.close()
    acked += [line.split() for line in rest]
    store = backend.make()
    store.open()
    try:
        sent = {e.seq: e for e in store.inbox("ka", 0, 100000)}
        received = {e.seq: e for e in store.inbox("kb", 0, 100000)}
        assert list(sent) == list(range(1, len(sent) + 1))
        assert len({e.mid for e in sent.values()}) == len(sent) == len(received)
        for mid, sender_seq, recipient_seq in acked:
            assert sent[int(sender_seq)].mid == mid.decode()
            assert received[int(recipient_seq)].mid == mid.decode()
    finally:
        store.close()


def test_an_op_that_cannot_commit_fails_alone(store):
    acks = Acks()
    send_now(store, acks, "a", "b", "c1", mid="M1")
    send(store, acks, "a", "b", "c2", mid="M1")          # mid taken: a hard error, not retried
    send(store, acks, "a", "b", "c3", mid="M3")
    assert store.flush(30)
    outcome = {tag: (r, e) for tag, r, e in acks.items}
    assert outcome["c2"][0] is None and outcome["c2"][1] is not None
    assert outcome["c3"][1] is None and outcome["c3"][0].sender_seq == 2
    assert [e.mid for e in store.inbox("b", 0, 10)] == ["M1", "M3"]
    assert store.stats()["failed"] == 1 and store.stats()["queue"] == 0


# -- retention ------------------------------------------------------------------

def test_purge_removes_old_entries_and_keeps_seqs(store):
    acks = Acks()
    for i in range(6):
        send_now(store, acks, "a", "b", "c%d" % i, ts=1000 + i)
    store.add_notices(["b"], None, "k", "n", lambda: "n1", 1001, acks.cb("n"))
    assert store.flush(10)
    assert store.purge(1003) == 4              # 3 messages (ts 1000-1002) + 1 notice
    assert [e.seq for e in store.inbox("b", 0, 10)] == [4, 5, 6]
    assert [e.seq for e in store.inbox("a", 0, 10)] == [4, 5, 6]
    assert store.purge(1003) == 0 and store.stats()["purged"] == 4
    send_now(store, acks, "a", "b", "later", ts=2000)
    assert store.inbox("b", 6, 10)[0].seq == 8 and store.last_seq("a") == 7


def test_retention_purges_periodically(backend):
    store = backend.make(retention_days=1, purge_interval=0.05)
    store.open()
    try:
        acks = Acks()
        send(store, acks, "a", "b", "old", ts=1)
        send(store, acks, "a", "b", "new", ts=int(time.time() * 1000))
        assert store.flush(10)
        assert wait_until(lambda: store.stats()["purged"] >= 1)
        assert [(e.seq, e.mid) for e in store.inbox("b", 0, 10)] == [(2, "m-a-new")]
        assert store.last_seq("b") == 2
    finally:
        store.close()


def test_reopen_after_a_close_that_dropped_writes(backend):
    store = backend.make()
    store.open()
    acks = Acks()
    assert store.inbox("b", 0, 10) == []             # leaves read connections behind
    with backend.writes_blocked():
        send(store, acks, "a", "b", "lost")
        store.set_cursor("a", "d", 5)
        store.close(timeout=0.2)
    assert [(r, type(e).__name__) for _, r, e in acks.items] == [(None, "StoreUnavailable")]
    assert store.stats()["queue"] == 0
    store.open()                                      # the same object opens again
    try:
        send(store, acks, "a", "b", "kept")
        assert store.flush(10)
        assert acks.items[-1][2] is None and acks.items[-1][1].sender_seq == 1
        assert [e.seq for e in store.inbox("b", 0, 10)] == [1]
    finally:
        store.close()
