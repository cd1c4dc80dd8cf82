"""CPU microseconds of imd's hub work per raw-TCP chat message, in process (real sockets, no store).

    python bench/tcp_path_bench.py [--pairs 200] [--batch 25] [--n 40000] [--rounds 5] [--imd-repo TREE ...]

The open-loop chat path of one message as `bench/chat_store.py` sends it, each message arriving
alone: the sender's frame is read by the poller (one recv), decoded, validated and routed to a
stub store; the stub answers ``--batch`` messages at a time, as the writer does after a commit
(the ack, both inbox entries published through the memory engine, the delivery), and the flusher
writes the ack and the delivery (one send each). The stub store costs nothing, so the figure is
the hub's own code plus its recv/send system calls, and the client side (socketpair ends: one send
per message, recvs to drain) — the same for every tree. Each tree runs in its own child process
(PYTHONPATH = the tree), ``--rounds`` times in turn; prints the median per tree in CPU µs per
message (process time).
"""

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = r'''
import gevent.monkey
gevent.monkey.patch_all()
import _socket, json, struct, sys, time
import gevent, orjson
from imd.config import load_dict
from imd.engine.memory import MemoryEngine
from imd.node import Node
from imd.proto.tcp import TcpSession
from imd.router import Router
from imd.session import LIVE
from imd.store.base import Entry, MessageResult

PAIRS, BATCH, N = (int(x) for x in sys.argv[1:4])


class Store:
    """Answers nothing until the bench says so (a commit of the ops waiting)."""

    def __init__(self):
        self.ops = []
        self.seqs = {}

    def send_message(self, sender, recipient, client_id, body, ctx, mid, ts, callback, flags=0):
        self.ops.append((sender, recipient, client_id, body, ctx, mid, ts, callback))

    def commit(self):
        ops, self.ops = self.ops, []
        for sender, recipient, cid, body, ctx, mid, ts, callback in ops:
            s = self.seqs[sender] = self.seqs.get(sender, 0) + 1
            r = self.seqs[recipient] = self.seqs.get(recipient, 0) + 1
            entries = [Entry(sender, s, mid, "msg", body, ts, sender, recipient, ctx, None, cid),
                       Entry(recipient, r, mid, "msg", body, ts, sender, recipient, ctx, None, cid)]
            callback(MessageResult(mid, ts, s, r, False, entries), None)

    def set_cursor(self, *a):
        pass

    def touch_user(self, *a):
        pass


cfg = load_dict({"auth": {"secret": "x" * 32}, "limits": {"msg_rate": 0}})
store = Store()
node = Node("b1", MemoryEngine(), store, 1.0)
node.engine.start(node.id, node.on_event)
router = Router(cfg, node, store)
clients = []
for i in range(2 * PAIRS):
    a, b = _socket.socketpair()   # the C-level sockets the listener gives imd
    a.setblocking(False)
    s = TcpSession(router, b, None)
    s.user, s.role, s.platform, s.device = f"u{i}", "host", "ios", "d"
    s.state = LIVE
    node.sessions[s.user] = s
    node.engine.subscribe_user(s.user)
    clients.append(a)
frames = []
for i in range(2 * PAIRS):
    to = f"u{i ^ 1}"
    frames.append([orjson.dumps({"type": "msg", "id": f"c{k}", "to": to,
                                 "body": f"hello from {i} ~ts1234567890123456789;"})
                   for k in range(N // (2 * PAIRS) + BATCH + 1)])
frames = [[struct.pack(">I", len(f)) + f for f in fs] for fs in frames]


def drain(touched):
    """Read what the clients of this batch (senders and recipients) were sent."""
    for j in touched:
        c = clients[j]
        try:
            while True:
                c.recv(65536)
        except BlockingIOError:
            pass


def run(n):
    sent = 0
    k = 0
    i = 0
    while sent < n:
        touched = set()
        for _ in range(BATCH):
            clients[i].send(frames[i][k])
            touched.add(i)
            touched.add(i ^ 1)
            i += 1
            if i == len(clients):
                i, k = 0, k + 1
            gevent.idle()           # the hub reads it: one message per loop iteration
        sent += BATCH
        while len(store.ops) < BATCH:
            gevent.idle()
        store.commit()
        gevent.idle()               # the acks and deliveries are written
        gevent.idle()
        drain(touched)
    return k


run(2000)
t = time.process_time()
run(N)
print(json.dumps({"us_per_msg": 1e6 * (time.process_time() - t) / N}))
'''


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=200)
    ap.add_argument("--batch", type=int, default=25)
    ap.add_argument("--n", type=int, default=40000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--imd-repo", action="append")
    a = ap.parse_args()
    repos = [os.path.abspath(r) for r in (a.imd_repo or [ROOT])]
    got = {r: [] for r in repos}
    for _ in range(a.rounds):
        for repo in repos:
            out = subprocess.run([sys.executable, "-c", CHILD, str(a.pairs), str(a.batch), str(a.n)],
                                 check=True, capture_output=True, text=True, cwd=repo,
                                 env=dict(os.environ, PYTHONPATH=repo))
            got[repo].append(json.loads(out.stdout.strip().splitlines()[-1])["us_per_msg"])
    load = open("/proc/loadavg").read().split()[0]
    for repo, runs in got.items():
        runs.sort()
        print(f"{repo}: {runs[len(runs) // 2]:.2f} us per message (median of {len(runs)}: "
              f"{', '.join(f'{r:.2f}' for r in runs)}; load average {load})")


if __name__ == "__main__":
    main()
