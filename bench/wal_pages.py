"""WAL frames per stored message, by b-tree, as the SQLite store's file grows (issue 9).

    python bench/wal_pages.py [--grow 0,20000,80000,215000] [--batch 36] [--batches 200]
                              [--users 1000] [--ids count|padded|random]

For each size in ``--grow``: a new file set up by the store's own writer connection (its
migrations and pragmas), that many messages written first in batches of 1,000, the WAL
checkpointed and truncated, then ``--batches`` batches of ``--batch`` messages, each one
transaction of the writer (``SqliteWriter._apply_sync``, what the writer process runs). The
users are ``--users`` users in pairs sending to each other at random, with client ids that
count up per sender as the load generator's do (``--ids padded``: zero-padded, so they sort in
sending order; ``random``: 128 random bits in hex, as a UUID). Every WAL frame those batches appended is
mapped to its b-tree (the page number in the frame's header, the ``dbstat`` table) and a
table prints frames per message by b-tree (``sqlite_autoindex_messages_1`` is the mid key,
``_2`` the ``(sender, client_id)`` dedupe). Pages, not time: no server runs, and the numbers
are the same on any machine for the same arguments (the random choices are seeded).
Each frame costs a 4 KiB write in the commit and another in the checkpoint that copies it
back (docs/store.md, session 6).
"""

import argparse
import collections
import os
import random
import struct
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from imd.ids import MidGen  # noqa: E402
from imd.store.sqlite_writer import SqliteWriter  # noqa: E402
from imd.store.writer import MessageOp  # noqa: E402

WAL_HEADER = 32
FRAME_HEADER = 24
GROW_BATCH = 1000
T0_MS = 1_760_000_000_000


class Traffic:
    """Messages between ``users`` users in pairs (u0 and u1, u2 and u3, ...), senders at random."""

    def __init__(self, users: int, ids: str = "count", seed: int = 1) -> None:
        self.users = users
        self.ids = ids
        self.rnd = random.Random(seed)
        self.sent = collections.Counter()
        self.mids = MidGen()
        self.n = 0

    def batch(self, k: int) -> list:
        ops = []
        for _ in range(k):
            s = self.rnd.randrange(self.users)
            self.sent[s] += 1
            self.n += 1
            ts = T0_MS + self.n
            ops.append(MessageOp(f"u{s}", f"u{s ^ 1}", self.client_id(s), "hello", None,
                                 self.mids.at(ts), ts, None))
        return ops


    def client_id(self, sender: int) -> str:
        if self.ids == "random":
            return "%032x" % self.rnd.getrandbits(128)
        return ("%010d" if self.ids == "padded" else "%d") % self.sent[sender]


def wal_pages(wal: str, page_size: int) -> list:
    """The page number of every frame in the WAL file ``wal``."""
    with open(wal, "rb") as f:
        data = f.read()
    step = FRAME_HEADER + page_size
    return [struct.unpack_from(">I", data, off)[0]
            for off in range(WAL_HEADER, len(data) - step + 1, step)]


def measure(grow: int, batch: int, batches: int, users: int, ids: str) -> tuple:
    """(messages measured, Counter of b-tree name → WAL frames) for one size."""
    with tempfile.TemporaryDirectory(prefix="imd-walpages-") as tmp:
        writer = SqliteWriter(os.path.join(tmp, "imd.sqlite3"), "normal")
        con, _ = writer._connect_writer()
        writer._wcon = con
        try:
            con.execute("PRAGMA wal_autocheckpoint = 0")     # every frame stays for counting
            traffic = Traffic(users, ids)
            left = grow
            while left:
                k = min(left, GROW_BATCH)
                writer._apply_sync(traffic.batch(k), None)
                left -= k
            con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            for _ in range(batches):
                writer._apply_sync(traffic.batch(batch), None)
            page_size = con.execute("PRAGMA page_size").fetchone()[0]
            owner = dict(con.execute("SELECT pageno, name FROM dbstat"))
            frames = collections.Counter(owner.get(p, "other") for p in wal_pages(writer.file + "-wal", page_size))
        finally:
            con.close()
    return batch * batches, frames


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--grow", default="0,20000,80000,215000",
                    help="comma-separated: messages stored before measuring")
    ap.add_argument("--batch", type=int, default=36, help="messages per measured transaction")
    ap.add_argument("--batches", type=int, default=200)
    ap.add_argument("--users", type=int, default=1000)
    ap.add_argument("--ids", default="count", choices=("count", "padded", "random"),
                    help="client ids: a counter per sender, the same zero-padded, or random")
    a = ap.parse_args(argv)
    rows = []
    for grow in (int(g) for g in a.grow.split(",")):
        n, frames = measure(grow, a.batch, a.batches, a.users, a.ids)
        rows.append((grow, n, frames))
        print(f"{grow:,} stored first: {sum(frames.values()) / n:.2f} WAL frames per message", flush=True)
    names = sorted({name for _, _, frames in rows for name in frames},
                   key=lambda name: -sum(frames[name] for _, _, frames in rows))
    print(f"\nWAL frames per message, batches of {a.batch}, {a.users:,} users in pairs, client ids: {a.ids}")
    print("| stored first | all | " + " | ".join(names) + " |")
    print("|---:|---:|" + "---:|" * len(names))
    for grow, n, frames in rows:
        print(f"| {grow:,} | {sum(frames.values()) / n:.2f} | "
              + " | ".join(f"{frames[name] / n:.2f}" for name in names) + " |")


if __name__ == "__main__":
    main()
