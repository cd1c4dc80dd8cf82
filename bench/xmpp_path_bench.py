"""CPU microseconds of imd's XMPP per-message code, in process (no sockets, no store).

    python bench/xmpp_path_bench.py [--n 30000] [--rounds 5] [--imd-repo TREE ...]

Three stages of one 1:1 chat message as the `xmpp` part sends it (no id, a 37-character
body): the stream parser's ``feed`` of the stanza into an Element (expat and the parser's
callbacks), ``XmppSession.on_message`` on that Element up to ``router.receive`` (a stub), and
``render.message_bytes`` of the inbox entry for the recipient. Each tree given runs in its own
child process (cwd and PYTHONPATH = the tree: ``python -c`` imports from its cwd first), `--rounds` times in turn (so a before/after comparison sees the same load);
prints the median of each stage per tree, in CPU microseconds (process time).
"""

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = r'''
import json, sys, time, types
from imd.proto.xmpp import render, session as S
from imd.proto.xmpp.parser import StreamParser

N = int(sys.argv[1])
HDR = (b"<?xml version='1.0'?><stream:stream to='localhost' version='1.0' xmlns='jabber:client' "
       b"xmlns:stream='http://etherx.jabber.org/streams'>")
MSG = b"<message to='u1@localhost' type='chat'><body>hello from 0 ~ts1234567890123456789;</body></message>"


class Router:
    limits = types.SimpleNamespace(max_body=16384)

    def receive(self, session, env):
        pass


class Handler:
    last = None

    def on_stream_start(self, attrs):
        pass

    def on_stanza(self, el):
        self.last = el

    def on_stream_end(self):
        pass


def per_call(fn):
    t = time.process_time()
    for _ in range(N):
        fn()
    return 1e6 * (time.process_time() - t) / N


h = Handler()
p = StreamParser(h)
p.feed(HDR)
p.negotiating = False
sess = types.SimpleNamespace(proto=types.SimpleNamespace(domain="localhost"), full_jid="u0@localhost/bench",
                             user="u0", id="n1.1f", node_id="n1", serial=0x1f, router=Router(), pending=None,
                             recent=None,
                             write=lambda el: None)
sess.target = types.MethodType(S.XmppSession.target, sess)
sess.read_marker = types.MethodType(S.XmppSession.read_marker, sess)
on_message = types.MethodType(S.XmppSession.on_message, sess)
els = []
feed = per_call(lambda: p.feed(MSG))
p.handler = types.SimpleNamespace(on_stanza=els.append)
for _ in range(N):
    p.feed(MSG)
it = iter(els)


def handle():
    on_message(next(it))
    sess.pending = None


handled = per_call(handle)
env = {"type": "msg", "from": "u0", "to": "u1", "id": "x.n1.1f.7", "mid": "m1", "ts": 1,
       "body": "hello from 0 ~ts1234567890123456789;"}
rendered = per_call(lambda: render.message_bytes(env, "localhost", "u1@localhost", False, False))
print(json.dumps({"feed": feed, "on_message": handled, "message_bytes": rendered}))
'''


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=30000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--imd-repo", action="append")
    a = ap.parse_args()
    repos = a.imd_repo or [ROOT]
    repos = [os.path.abspath(r) for r in repos]
    got = {r: [] for r in repos}
    for _ in range(a.rounds):
        for repo in repos:
            out = subprocess.run([sys.executable, "-c", CHILD, str(a.n)], check=True, capture_output=True,
                                 text=True, cwd=repo, env=dict(os.environ, PYTHONPATH=repo))
            got[repo].append(json.loads(out.stdout))
    load = open("/proc/loadavg").read().split()[0]
    for repo, runs in got.items():
        med = {k: sorted(r[k] for r in runs)[len(runs) // 2] for k in runs[0]}
        print(f"{repo}: " + ", ".join(f"{k} {v:.2f} us" for k, v in med.items())
              + f", sum {sum(med.values()):.2f} us (median of {len(runs)}; load average {load})")


if __name__ == "__main__":
    main()
