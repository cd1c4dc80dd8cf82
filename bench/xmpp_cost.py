"""imd's CPU cost per XMPP chat message at fixed rates (the `xmpp` part's setup, no sweep).

    python bench/xmpp_cost.py [--rate 4000] [--seconds 10] [--repeat 2] [--spy OUT.txt]
                              [--imd-repo TREE ...] [--rounds N]

Starts imd as the `xmpp` part does (SQLite store, synchronous = full), connects 2,000
clients in pairs through bench.loadgen, offers each rate in `--rate` (comma separated) open
loop for `--seconds`, `--repeat` times, and prints per step: delivered/sent, p50/p99
delivery latency, imd CPU-seconds per 1,000 delivered messages, the busiest load-generator
process's CPU share, and the load average. Several `--imd-repo` trees are measured in turn,
`--rounds` times (a before/after comparison under the same load). `--spy OUT` records the
last step of the first rate of the first tree with py-spy (--nonblocking) into OUT (raw
collapsed stacks) and prints the top own-time and inclusive functions;
`python bench/xmpp_cost.py --top OUT` prints them again.
"""

import argparse
import collections
import re
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from bench import loadgen as lg  # noqa: E402
from bench import parts, peers  # noqa: E402


def top(collapsed, n=30):
    """Own-sample and inclusive-sample shares of the functions (lines merged) in a py-spy
    raw (collapsed) file."""
    own, incl, total = collections.Counter(), collections.Counter(), 0
    with open(collapsed) as f:
        for line in f:
            stack, _, count = line.rstrip().rpartition(" ")
            count = int(count)
            total += count
            frames = [re.sub(r":\d+\)$", ")", fr) for fr in stack.split(";")]   # per function
            own[frames[-1]] += count
            for fr in set(frames):
                incl[fr] += count
    for title, c in (("own", own), ("inclusive", incl)):
        print(f"-- {title} ({total} samples)")
        for fr, k in c.most_common(n):
            print(f"{100 * k / total:5.1f}%  {fr}")


def measure(repo, rates, seconds, repeat, clients, spy=None):
    """One imd from `repo`: connect the clients, then each rate `repeat` times; prints a line
    per step and returns the CPU-s per 1k of each step."""
    out = []
    peer = peers.Imd(os.path.abspath(repo), python=sys.executable, secret=parts.SECRET).start()
    try:
        spec = parts._spec_for("xmpp", peer, pairs=True, password="pw", domain="localhost", roster=True)
        pids = peer.pids()
        with lg.Fleet(spec, processes=2, deadline=600) as fleet:
            ok, failed, _ = fleet.connect(clients, timeout=180)
            if failed:
                raise SystemExit(f"{failed} clients failed: {fleet.errors()[:1]}")
            time.sleep(1)
            fleet.traffic(500, 0, 2)             # warm-up
            time.sleep(0.5)
            for i, rate in enumerate(rates):
                for k in range(repeat):
                    recorder = None
                    if spy and i == 0 and k == repeat - 1:
                        recorder = subprocess.Popen(
                            [os.path.join(os.path.dirname(sys.executable), "py-spy"), "record",
                             "--pid", str(pids[0]), "--format", "raw", "--nonblocking", "--rate", "200",
                             "--duration", str(int(seconds)), "--output", spy],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                    cpu0 = peers.cpu_seconds(pids)
                    sent, got, wall, lat = fleet.traffic(rate, 0, seconds)
                    cpu = peers.cpu_seconds(pids) - cpu0
                    lat = sorted(lat)
                    load = open("/proc/loadavg").read().split()[0]
                    out.append(1000 * cpu / max(got, 1))
                    print(f"{repo}: rate {rate:,}/s: {got:,}/{sent:,} delivered, p50 "
                          f"{lg.quantile(lat, .5) / 1000:.1f} ms p99 {lg.quantile(lat, .99) / 1000:.1f} ms, "
                          f"imd CPU-s per 1k {out[-1]:.4f}, imd CPU {cpu / wall:.0%} of the sending time, "
                          f"load generator {fleet.client_load:.0%}, load average {load}", flush=True)
                    if recorder is not None:
                        recorder.wait(60)
                    time.sleep(0.5)
    finally:
        peer.stop()
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rate", default="4000")
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=1, help="alternate the trees this many times")
    ap.add_argument("--clients", type=int, default=2000)
    ap.add_argument("--spy", help="py-spy output of the first tree's first round")
    ap.add_argument("--imd-repo", action="append", help="imd tree(s); several are measured in turn")
    a = ap.parse_args()
    repos = a.imd_repo or [ROOT]
    rates = [int(r) for r in a.rate.split(",")]
    costs = {r: [] for r in repos}
    for n in range(a.rounds):
        for repo in repos:
            costs[repo] += measure(repo, rates, a.seconds, a.repeat, a.clients,
                                   a.spy if n == 0 and repo == repos[0] else None)
    for repo, c in costs.items():
        print(f"{repo}: imd CPU-s per 1k, median of {len(c)} steps: {sorted(c)[len(c) // 2]:.4f}")
    if a.spy and os.path.exists(a.spy):
        top(a.spy)


if __name__ == "__main__" and sys.argv[1:2] == ["--top"]:
    top(sys.argv[2])
elif __name__ == "__main__":
    main()
