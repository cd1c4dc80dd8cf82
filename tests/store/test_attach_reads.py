"""imd.attach.AttachReads over a real SQLite store: the logins waiting at one
moment are served by one store call, in request order; a failing store reaches
every waiting callback."""

from gevent import monkey

monkey.patch_all()

import gevent  # noqa: E402

from imd.attach import AttachReads  # noqa: E402
from imd.store.base import StoreUnavailable  # noqa: E402
from imd.store.sqlite import SqliteStore  # noqa: E402


def test_waiting_logins_share_one_store_call(tmp_path):
    store = SqliteStore(str(tmp_path))
    store.open()
    try:
        store.send_message("b", "a", "c1", "hi", None, "m1", 1, lambda r, e: None)
        assert store.flush(10)
        reads = AttachReads(store)
        got = []
        for i in range(50):
            reads.request("a" if i % 2 else f"u{i}", i % 3 == 0, 10, lambda st, err, i=i: got.append((i, st, err)))
        gevent.sleep(0)
        deadline = gevent.Timeout(10)
        with deadline:
            while len(got) < 50:
                gevent.sleep(0.01)
        assert [i for i, _, _ in got] == list(range(50))            # request order
        assert reads.batches == 1 and reads.requests == 50
        assert all(err is None for _, _, err in got)
        a = got[1][1]
        assert a.top == 1 and [e.mid for e in a.offline] == ["m1"] and a.contacts is None
        assert got[3][1].contacts == set()                             # asked for: none
        store.close()
        reads.request("a", True, 10, lambda st, err: got.append((99, st, err)))
        with gevent.Timeout(10):
            while len(got) < 51:
                gevent.sleep(0.01)
        assert got[-1][1] is None and isinstance(got[-1][2], StoreUnavailable)
    finally:
        store.close()
