"""bench/wal_pages.py on a small file: every frame of the measured commits is counted once, by
b-tree, and client ids take the form asked for."""

import pytest

from bench import wal_pages


def test_frames_are_counted_by_btree():
    n, frames = wal_pages.measure(grow=300, batch=10, batches=5, users=20, ids="count")
    assert n == 50
    assert frames["inbox"] >= 1 and frames["messages"] >= 1
    assert sum(frames.values()) >= n // 10          # at least a few frames per commit
    assert set(frames) <= {"inbox", "messages", "users", "messages_ts", "sqlite_schema", "other"} | {
        name for name in frames if name.startswith("sqlite_autoindex_messages_")}


@pytest.mark.parametrize("ids, check", [("count", str.isdigit),
                                        ("padded", lambda c: len(c) == 10 and c.isdigit()),
                                        ("random", lambda c: len(c) == 32)])
def test_client_ids(ids, check):
    ops = wal_pages.Traffic(10, ids).batch(20)
    assert all(check(op.client_id) for op in ops)
    assert len({(op.sender, op.client_id) for op in ops}) == 20      # unique per sender
