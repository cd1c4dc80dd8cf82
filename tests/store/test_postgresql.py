"""PostgreSQL-only behaviour: outages, several nodes on one database, retention."""

import itertools

import gevent
import psycopg
import pytest

from imd.store.base import StoreFull, StoreUnavailable
from imd.store.postgresql import PostgresStore

from .backends import PostgresBackend
from .tcp_proxy import TcpProxy
from .test_contract import Acks, mid_maker, send, wait_until


@pytest.fixture
def pg(tmp_path):
    backend = PostgresBackend(tmp_path)
    yield backend
    backend.cleanup()


def test_outage_queues_refuses_at_limit_and_drains_after(pg):
    proxy = TcpProxy(("127.0.0.1", 5432)).start()
    store = PostgresStore(pg.dsn_via(proxy.server), writers=2, queue_size=40,
                                batch_max=10, connect_timeout=2)
    store.open()
    try:
        acks = Acks()
        for i in range(10):
            send(store, acks, "s%d" % (i % 3), "r", "before%d" % i)
        assert store.flush(10) and len(acks.items) == 10
        proxy.cut()
        queued = 0
        with pytest.raises(StoreFull):
            for i in range(1000):
                send(store, acks, "s%d" % (i % 3), "r", "during%d" % i)
                queued += 1
        assert queued == 40
        assert wait_until(lambda: store.stats()["retries"] >= 2)
        assert len(acks.items) == 10 and store.stats()["queue"] == 40
        with pytest.raises(StoreUnavailable):
            store.inbox("r", 0, 10)
        proxy.restore()
        assert store.flush(60)
        assert all(e is None for _, _, e in acks.items) and len(acks.items) == 50
        for s in range(3):
            mine = [r.sender_seq for tag, r, _ in acks.items if r.entries[0].user == "s%d" % s]
            assert mine == list(range(1, len(mine) + 1))
        stored = store.inbox("r", 0, 100)
        assert [e.seq for e in stored] == list(range(1, 51))
        assert sorted(e.mid for e in stored) == sorted(r.mid for _, r, _ in acks.items)
    finally:
        store.close()
        proxy.stop()


def test_read_after_a_blip_replaces_the_dead_pooled_connection(pg):
    proxy = TcpProxy(("127.0.0.1", 5432)).start()
    store = PostgresStore(pg.dsn_via(proxy.server), connect_timeout=2)
    store.open()
    try:
        assert store.last_seq("x") == 0            # leaves an idle read connection
        proxy.cut()
        proxy.restore()
        assert store.last_seq("x") == 0            # dead pooled connection replaced, no error
    finally:
        store.close()
        proxy.stop()


def test_terminated_connections_under_load_lose_nothing_acked(pg):
    store = pg.make(writers=4, batch_max=20)
    store.open()
    acks = Acks()
    stop = []

    def load():
        for i in itertools.count():
            if stop:
                return
            try:
                send(store, acks, "u%d" % (i % 8), "hub", "c%d" % i)
            except StoreFull:
                pass
            if i % 10 == 0:
                gevent.sleep(0.002)

    def terminate():
        with psycopg.connect(pg.server_dsn, autocommit=True) as con:
            con.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE datname = current_database() AND pid <> pg_backend_pid() "
                        "AND application_name = ''")

    try:
        loader = gevent.spawn(load)
        for _ in range(4):
            assert wait_until(lambda: store.stats()["committed"] > 0)
            gevent.sleep(0.2)
            terminate()
        assert wait_until(lambda: store.stats()["retries"] >= 1)
        stop.append(True)
        loader.join()
        assert store.flush(60)
        assert all(e is None for _, _, e in acks.items)
        stored = store.inbox("hub", 0, 100000)
        assert [e.seq for e in stored] == list(range(1, len(stored) + 1))
        by_mid = {e.mid: e.seq for e in stored}
        assert len(by_mid) == len(stored)
        for _, result, _ in acks.items:
            if not result.duplicate:
                assert by_mid[result.mid] == result.recipient_seq
    finally:
        store.close()


def test_two_nodes_share_one_database(pg):
    nodes = [pg.make(writers=3, batch_max=25) for _ in range(2)]
    for node in nodes:
        node.open()
    try:
        acks = Acks()
        for i in range(400):
            send(nodes[i % 2], acks, "n%d-u%d" % (i % 2, i % 5), "popular", "c%d" % i)
            if i % 50 == 0:
                gevent.sleep(0)
        assert all(node.flush(30) for node in nodes)
        results = acks.results()
        assert sorted(r.recipient_seq for r in results) == list(range(1, 401))
        stored = nodes[0].inbox("popular", 0, 1000)
        assert [(e.seq, e.mid) for e in stored] == sorted((r.recipient_seq, r.mid) for r in results)
        assert nodes[1].last_seq("popular") == 400
    finally:
        for node in nodes:
            node.close()


def test_open_fails_clearly_when_unreachable(pg):
    proxy = TcpProxy(("127.0.0.1", 5432)).start()
    proxy.cut()
    store = PostgresStore(pg.dsn_via(proxy.server), connect_timeout=2)
    with pytest.raises(StoreUnavailable):
        store.open()


def test_close_during_outage_fails_the_queued_ops_without_hanging(pg):
    proxy = TcpProxy(("127.0.0.1", 5432)).start()
    store = PostgresStore(pg.dsn_via(proxy.server), writers=2, connect_timeout=2)
    store.open()
    acks = Acks()
    try:
        proxy.cut()
        for i in range(5):
            send(store, acks, "a%d" % i, "b", "c%d" % i)
        assert wait_until(lambda: store.stats()["retries"] >= 1)
        store.close(timeout=0.5)
        assert len(acks.items) == 5
        assert all(r is None and isinstance(e, StoreUnavailable) for _, r, e in acks.items)
        with pytest.raises(StoreUnavailable):
            send(store, acks, "a", "b", "late")
    finally:
        store.close()
        proxy.stop()


# Client ids that make the batch take each insert path: one text parameter per column,
# or (every separator candidate in a client id) psycopg arrays.
EVERY_MARKER = "".join(chr(c) for c in range(1, 0x20))
PATHS = {"texts": "", "arrays": EVERY_MARKER}


@pytest.mark.parametrize("path", sorted(PATHS))
def test_flags_through_both_insert_paths(pg, path):
    """messages.flags is written by both insert paths (texts, arrays)."""
    store = pg.make()
    store.open()
    try:
        acks = Acks()
        store.send_message("a", "b", "c1" + PATHS[path], "asks", None, "M1", 1, acks.cb("c1"), flags=1)
        store.send_message("a", "b", "c2", "plain", None, "M2", 2, acks.cb("c2"))
        assert store.flush(10)
        assert [[e.flags for e in r.entries] for r in acks.results()] == [[1, 1], [0, 0]]
        assert [e.flags for e in store.inbox("b", 0, 10)] == [1, 0]
    finally:
        store.close()


@pytest.mark.parametrize("path", sorted(PATHS))
def test_stored_client_ids_in_a_batch_are_planned_again(pg, path):
    """The write statement finds client ids stored by earlier batches (dedupe inside it):
    that transaction inserts nothing, the batch is planned again and the new messages
    keep dense seqs, on both insert paths."""
    store = pg.make()
    store.open()
    try:
        acks, x = Acks(), PATHS[path]
        send(store, acks, "a", "b", "c1" + x, mid="m-a-c1")
        assert store.flush(10)
        for cid in ("c2", "c1", "c3"):
            send(store, acks, "a", "b", cid + x, mid="again-%s" % cid)
        assert store.flush(10)
        results = acks.results()
        assert [(r.mid, r.sender_seq, r.duplicate) for r in results] == [
            ("m-a-c1", 1, False), ("again-c2", 2, False), ("m-a-c1", 1, True), ("again-c3", 3, False)]
        assert [(e.seq, e.client_id) for e in store.inbox("b", 0, 10)] == [
            (1, "c1" + x), (2, "c2" + x), (3, "c3" + x)]
    finally:
        store.close()


@pytest.mark.parametrize("batch", [
    [("", "x", None)],                                 # one empty string: string_to_array('') is {}
    [("\x1f", "\x1e", {"k": "\x1f\x1e\x01"}), ("c", "", None)],   # markers in ids and bodies
    [(EVERY_MARKER, EVERY_MARKER, {"k": EVERY_MARKER}), ("d", "y", None)],  # no marker fits: arrays
])
def test_awkward_values_round_trip(pg, batch):
    """Client ids, bodies, ctx and user ids holding the separator candidates, or one
    empty string, are stored exactly (texts path, or arrays when no separator fits),
    with a notice and a touch (NULLs in every nullable column) in the same batch."""
    store = pg.make()
    store.open()
    try:
        acks = Acks()
        store.touch_user("u\x1f", "guest", None, 7)
        for n, (cid, body, ctx) in enumerate(batch):
            store.send_message("u\x1f", "v", cid, body, ctx, "M%d" % n, n, acks.cb(n))
        store.add_notices(["v"], None, "k\x1e", "\x1f", mid_maker(), 9, acks.cb("n"))
        assert store.flush(10)
        results = {tag: r for tag, r, _ in acks.items if acks.results()}
        assert [results[n].sender_seq for n in range(len(batch))] == list(range(1, len(batch) + 1))
        stored = store.inbox("v", 0, 10)
        assert [(e.client_id, e.body, e.ctx) for e in stored if e.kind == "msg"] == batch
        assert [(e.body, e.notice_kind, e.sender) for e in stored if e.kind == "notice"] == [
            ("\x1f", "k\x1e", None)]
        assert store.users_info(["u\x1f"])["u\x1f"].role == "guest"
    finally:
        store.close()


def store_at_version(pg, monkeypatch, version):
    """A store opened on ``pg``'s database with the migrations up to ``version`` only, and
    ``upgrade()``, after which the stores made apply them all."""
    import imd.store.postgresql as module
    every = module.migrations
    monkeypatch.setattr(module, "migrations", lambda name: every(name)[:version])
    store = pg.make()
    store.open()
    return store, lambda: monkeypatch.setattr(module, "migrations", every)


def test_migration_3_keeps_every_inbox_as_it_was(pg, monkeypatch):
    """A database at schema version 2 holding messages, a notice, a cursor and a purge,
    with its inbox table filled as the writer of version 2 filled it, is upgraded at open
    (the inbox table gives way to two indexes on messages): every user's inbox and offline
    list read back exactly the entries the table held, and new writes continue the seqs."""
    old, upgrade = store_at_version(pg, monkeypatch, 2)
    acks = Acks()
    for i in range(4):
        send(old, acks, "a", "b", "c%d" % i, ts=1000 + i)
        send(old, acks, "b", "a", "d%d" % i, ts=1000 + i)
    old.add_notices(["b"], None, "k", "n", lambda: "n1", 2000, acks.cb("n"))
    old.set_cursor("b", "phone", 5)
    assert old.flush(10)
    assert old.purge(1001) == 2
    old.close()
    with psycopg.connect(pg.dsn) as con:
        con.execute("INSERT INTO inbox SELECT recipient, recipient_seq, mid, true FROM messages "
                    "UNION ALL SELECT sender, sender_seq, mid, false FROM messages WHERE sender IS NOT NULL")
        held = {u: [tuple(r) for r in con.execute(
            "SELECT seq, mid, inbound FROM inbox WHERE user_id = %s ORDER BY seq", (u,))] for u in "ab"}
    assert [len(held[u]) for u in "ab"] == [6, 7]
    upgrade()
    new = pg.make()
    new.open()
    try:
        for u in "ab":
            assert [(e.seq, e.mid, e.recipient == u) for e in new.inbox(u, 0, 100)] == held[u]
            assert [(e.seq, e.mid) for e in new.offline(u, 100)] == \
                [(seq, mid) for seq, mid, inbound in held[u] if inbound and seq > (5 if u == "b" else 0)]
        with psycopg.connect(pg.dsn) as con:
            assert con.execute("SELECT to_regclass('inbox')").fetchone()[0] is None
        send(new, acks, "a", "b", "later")
        assert new.flush(10)
        assert new.inbox("b", 0, 100)[-1].seq == 10 and new.inbox("a", 8, 100)[0].client_id == "later"
    finally:
        new.close()


def test_migration_5_makes_ids_bytewise_and_keeps_the_data(pg, monkeypatch):
    """A database at schema version 4 holding messages, a cursor and contacts is upgraded
    at open: the id columns compare bytewise (COLLATE "C", what every index insert of a
    message compares), the indexes still enforce what they did (a re-used client id is a
    duplicate), and inboxes, offline lists and seqs carry on."""
    old, upgrade = store_at_version(pg, monkeypatch, 4)
    acks = Acks()
    for i in range(3):
        send(old, acks, "a", "B", "c%d" % i)
    old.set_cursor("B", "phone", 2)
    old.add_contact("a", "B")
    assert old.flush(10)
    old.close()
    upgrade()
    new = pg.make()
    new.open()
    try:
        with psycopg.connect(pg.dsn) as con:
            collations = dict(con.execute(
                "SELECT table_name || '.' || column_name, collation_name FROM information_schema.columns "
                "WHERE table_schema = current_schema() AND column_name IN "
                "('mid', 'sender', 'recipient', 'client_id', 'id', 'user_id', 'contact')").fetchall())
            assert con.execute("SELECT 'B' < 'a' COLLATE \"C\"").fetchone()[0]
        assert collations == dict.fromkeys(
            ["messages.mid", "messages.sender", "messages.recipient", "messages.client_id", "users.id",
             "cursors.user_id", "contacts.user_id", "contacts.contact"], "C")
        assert [e.client_id for e in new.offline("B", 10)] == ["c2"]
        assert new.contacts("a") == {"B"}
        send(new, acks, "a", "B", "c1", mid="again")
        send(new, acks, "a", "B", "c3")
        assert new.flush(10)
        dup, fresh = acks.results()[-2:]
        assert dup.duplicate and dup.sender_seq == 2 and (fresh.sender_seq, fresh.recipient_seq) == (4, 4)
    finally:
        new.close()


def test_migration_6_drops_messages_pair_and_receipts_still_find_the_sender(pg, monkeypatch):
    """A database at schema version 5 has the index messages_pair; opening it drops the
    index, and last_sent_to finds what it found before, from messages_inbound."""
    old, upgrade = store_at_version(pg, monkeypatch, 5)
    acks = Acks()
    send(old, acks, "a", "b", "1", mid="A1")          # a:1 b:1
    assert old.flush(10)                               # (the writers' lanes: one after the other)
    send(old, acks, "b", "a", "2", mid="B1")          # b:2 a:2
    assert old.flush(10)
    old.close()
    index = "SELECT count(*) FROM pg_indexes WHERE schemaname = current_schema() AND indexname = 'messages_pair'"
    with psycopg.connect(pg.dsn) as con:
        assert con.execute(index).fetchone()[0] == 1
    upgrade()
    new = pg.make()
    new.open()
    try:
        assert new.last_sent_to("a", "b", 1) == (1, "A1", "1")
        assert new.last_sent_to("b", "a", 2) == (2, "B1", "2")
        with psycopg.connect(pg.dsn) as con:
            assert con.execute(index).fetchone()[0] == 0
    finally:
        new.close()


def test_a_read_running_at_close_closes_its_connection_when_it_ends(pg):
    """close() closes the idle read connections; one in use is closed by its read when
    it ends, not put back in the pool of a closed store."""
    import gevent
    store = pg.make()
    store.open()
    used = []

    def slow(con):
        used.append(con)
        return con.execute("SELECT pg_sleep(0.3), 1").fetchone()[1]
    read = gevent.spawn(store._query, slow)
    gevent.sleep(0.1)
    store.close()
    assert read.get(timeout=10) == 1
    assert used[0].closed and not store._idle
