"""imd's CPU cost per XMPP chat message at fixed rates (the `xmpp` part's setup, no sweep).

    python bench/xmpp_cost.py [--rate 4000] [--seconds 10] [--repeat 2] [--spy OUT.txt]
                              [--imd-repo TREE ...] [--rounds N] [--workers N --engine redis]
                              [--attach CMD] [--cprofile OUT]

Starts imd as the `xmpp` part does (SQLite store, synchronous = full), connects 2,000
clients in pairs through bench.loadgen, offers each rate in `--rate` (comma separated) open
loop for `--seconds`, `--repeat` times, and prints per step: delivered/sent, p50/p99
delivery latency, imd CPU-seconds per 1,000 delivered messages (and of its main thread alone: the
gevent loop; the rest is the store's threads and its SQLite writer process), the busiest load-generator
process's CPU share, the load average, and imd's full garbage collections and collector pauses over
50 ms (from /metrics, when the tree has them). Several `--imd-repo` trees are measured in turn,
`--rounds` times (a before/after comparison under the same load). `--spy OUT` records the
last step of the first rate of the first tree with py-spy (--nonblocking) into OUT (raw
collapsed stacks) and prints the top own-time and inclusive functions;
`python bench/xmpp_cost.py --top OUT` prints them again. `--attach CMD` runs a profiler or
tracer of your choice over that step instead (``{pid}``, ``{seconds}`` filled in).
"""

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request

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


def _py_spy():
    """py-spy next to the interpreter (the venv's), else the one on PATH."""
    here = os.path.join(os.path.dirname(sys.executable), "py-spy")
    return here if os.path.exists(here) else (shutil.which("py-spy") or here)


def gc_figures(peer):
    """imd's collections by generation and its collector pauses by histogram bound, from /metrics
    ({} when the tree has no such metrics, or imd runs several workers)."""
    if peer.workers > 1 or "admin" not in peer.ports:
        return {}
    text = urllib.request.urlopen(f"http://127.0.0.1:{peer.ports['admin']}/metrics", timeout=10).read().decode()
    return {m.group(1): float(m.group(2)) for m in re.finditer(
        r'^(python_gc_collections_total\{generation="\d"\}|imd_gc_pause_seconds_bucket\{le="[^"]+"\}'
        r'|imd_gc_pause_seconds_count) (\S+)$', text, re.M)}


def gc_note(before, after):
    """', collector: N full collections, M pauses over 50 ms' for one step ('' without figures)."""
    if not after:
        return ""
    d = {k: v - before.get(k, 0) for k, v in after.items()}
    slow = d.get("imd_gc_pause_seconds_count", 0) - d.get('imd_gc_pause_seconds_bucket{le="0.05"}', 0)
    full = d.get('python_gc_collections_total{generation="2"}', 0)
    return f", collector: {full:.0f} full collections, {slow:.0f} pauses over 50 ms"


def measure(repo, rates, seconds, repeat, clients, spy=None, attach=None, workers=1, engine="memory",
            cprofile=None):
    """One imd from `repo`: connect the clients, then each rate `repeat` times; prints a line
    per step and returns the CPU-s per 1k of each step."""
    out = []
    peer = peers.Imd(os.path.abspath(repo), python=sys.executable, secret=parts.SECRET, workers=workers,
                     engine=engine, profile=cprofile).start()
    try:
        spec = parts._spec_for("xmpp", peer, pairs=True, password="pw", domain="localhost", roster=True)
        with lg.Fleet(spec, processes=2, deadline=600) as fleet:
            ok, failed, _ = fleet.connect(clients, timeout=180)
            if failed:
                raise SystemExit(f"{failed} clients failed: {fleet.errors()[:1]}")
            pids = peer.pids()                   # (the workers, when several, and writer processes)
            loops = peer.pids(writers=False)     # the processes whose main thread is a gevent loop
            time.sleep(1)
            fleet.traffic(500, 0, 2)             # warm-up
            time.sleep(0.5)
            for i, rate in enumerate(rates):
                for k in range(repeat):
                    recorder = None
                    if spy and i == 0 and k == repeat - 1:
                        recorder = subprocess.Popen(
                            [_py_spy(), "record",
                             "--pid", str(loops[0]), "--format", "raw", "--nonblocking", "--rate", "200",
                             "--duration", str(int(seconds)), "--output", spy],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                    elif attach and i == 0 and k == repeat - 1:
                        recorder = subprocess.Popen(attach.format(pid=loops[0], seconds=int(seconds)), shell=True)
                    gc0 = gc_figures(peer)              # (scraped outside the CPU measured)
                    cpu0, main0 = peers.cpu_seconds(pids), peers.cpu_seconds(loops, main_thread=True)
                    sent, got, wall, lat = fleet.traffic(rate, 0, seconds)
                    cpu = peers.cpu_seconds(pids) - cpu0
                    main = peers.cpu_seconds(loops, main_thread=True) - main0
                    lat = sorted(lat)
                    load = open("/proc/loadavg").read().split()[0]
                    out.append(1000 * cpu / max(got, 1))
                    print(f"{repo}: rate {rate:,}/s: {got:,}/{sent:,} delivered, p50 "
                          f"{lg.quantile(lat, .5) / 1000:.1f} ms p99 {lg.quantile(lat, .99) / 1000:.1f} ms, "
                          f"imd CPU-s per 1k {out[-1]:.4f} (main thread {1000 * main / max(got, 1):.4f}), imd CPU {cpu / wall:.0%} of the sending time, "
                          f"load generator {fleet.client_load:.0%}, load average {load}"
                          f"{gc_note(gc0, gc_figures(peer))}", flush=True)
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
    ap.add_argument("--workers", type=int, default=1, help="node.workers (several need --engine redis)")
    ap.add_argument("--engine", default="memory", help="engine.backend: memory or redis")
    ap.add_argument("--attach", help="instead of --spy: a shell command run during that step, with {pid} "
                    "and {seconds} filled in (e.g. 'timeout {seconds} strace -c -f -p {pid} -o OUT', "
                    "'perf record -g -p {pid} -o OUT -- sleep {seconds}')")
    ap.add_argument("--cprofile", help="run the first tree's first round under cProfile into this file (its "
                    "top functions go to FILE.txt when imd stops; the whole run, logins included)")
    ap.add_argument("--imd-repo", action="append", help="imd tree(s); several are measured in turn")
    a = ap.parse_args()
    repos = a.imd_repo or [ROOT]
    rates = [int(r) for r in a.rate.split(",")]
    costs = {r: [] for r in repos}
    for n in range(a.rounds):
        for repo in repos:
            costs[repo] += measure(repo, rates, a.seconds, a.repeat, a.clients,
                                   a.spy if n == 0 and repo == repos[0] else None,
                                   a.attach if n == 0 and repo == repos[0] else None, a.workers, a.engine,
                                   a.cprofile if n == 0 and repo == repos[0] else None)
    for repo, c in costs.items():
        print(f"{repo}: imd CPU-s per 1k, median of {len(c)} steps: {sorted(c)[len(c) // 2]:.4f}")
    if a.spy and os.path.exists(a.spy):
        top(a.spy)


if __name__ == "__main__" and sys.argv[1:2] == ["--top"]:
    top(sys.argv[2])
elif __name__ == "__main__":
    main()
