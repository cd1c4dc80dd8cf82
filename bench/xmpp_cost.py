"""imd's CPU cost per XMPP chat message at fixed rates (the `xmpp` part's setup, no sweep).

    python bench/xmpp_cost.py [--rate 4000] [--seconds 10] [--repeat 2] [--spy OUT.txt]

Starts imd as the `xmpp` part does (SQLite store, synchronous = full), connects 2,000
clients in pairs through bench.loadgen, offers each rate in `--rate` (comma separated) open
loop for `--seconds`, `--repeat` times, and prints per step: delivered/sent, p50/p99
delivery latency, imd CPU-seconds per 1,000 delivered messages, the busiest load-generator
process's CPU share, and the load average. `--spy OUT` records the last step of the first
rate with py-spy (--idle off, --nonblocking) into OUT (collapsed stacks) and prints the
top own-time and cumulative functions.
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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rate", default="4000")
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--clients", type=int, default=2000)
    ap.add_argument("--spy")
    ap.add_argument("--imd-repo", default=ROOT)
    a = ap.parse_args()
    peer = peers.Imd(os.path.abspath(a.imd_repo), python=sys.executable, secret=parts.SECRET).start()
    try:
        spec = parts._spec_for("xmpp", peer, pairs=True, password="pw", domain="localhost", roster=True)
        pids = peer.pids()
        with lg.Fleet(spec, processes=2, deadline=600) as fleet:
            ok, failed, _ = fleet.connect(a.clients, timeout=180)
            if failed:
                raise SystemExit(f"{failed} clients failed: {fleet.errors()[:1]}")
            time.sleep(1)
            fleet.traffic(500, 0, 2)             # warm-up
            time.sleep(0.5)
            for i, rate in enumerate(int(r) for r in a.rate.split(",")):
                for k in range(a.repeat):
                    spy = None
                    if a.spy and i == 0 and k == a.repeat - 1:
                        spy = subprocess.Popen(
                            [os.path.join(os.path.dirname(sys.executable), "py-spy"), "record",
                             "--pid", str(pids[0]), "--format", "raw", "--nonblocking", "--rate", "200",
                             "--duration", str(int(a.seconds)), "--output", a.spy],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                    cpu0 = peers.cpu_seconds(pids)
                    sent, got, wall, lat = fleet.traffic(rate, 0, a.seconds)
                    cpu = peers.cpu_seconds(pids) - cpu0
                    lat = sorted(lat)
                    load = open("/proc/loadavg").read().split()[0]
                    print(f"rate {rate:,}/s: {got:,}/{sent:,} delivered, p50 "
                          f"{lg.quantile(lat, .5) / 1000:.1f} ms p99 {lg.quantile(lat, .99) / 1000:.1f} ms, "
                          f"imd CPU-s per 1k {1000 * cpu / max(got, 1):.4f}, imd CPU {cpu / wall:.0%}, "
                          f"load generator {fleet.client_load:.0%}, load average {load}", flush=True)
                    if spy is not None:
                        spy.wait(60)
                    time.sleep(0.5)
    finally:
        peer.stop()
    if a.spy and os.path.exists(a.spy):
        top(a.spy)


if __name__ == "__main__" and sys.argv[1:2] == ["--top"]:
    top(sys.argv[2])
elif __name__ == "__main__":
    main()
