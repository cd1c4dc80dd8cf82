"""Turns Result rows into the console table, the PNG plots and docs/benchmarks.md.

Ratios are always "how many times better imd is": peer/imd for lower-is-better metrics,
imd/peer for higher-is-better ones; a ratio above 1 means imd wins.
"""
import itertools
import os
import platform
import subprocess
import sys
import time


def fmt(value, unit):
    if value is None:
        return "n/a"
    if unit == "ms":
        return f"{value:.1f} ms"
    if unit == "cores":
        return f"{value:.3f} cores"
    if unit == "B":
        return f"{value:,.0f} B" if value < 10_000 else f"{value / 1024:,.1f} KB"
    return f"{value:,.0f}{unit if unit.startswith('/') else ' ' + unit}"


def ratio(imd, peer, better):
    if imd is None or peer is None or imd <= 0 or peer <= 0:
        return None
    return peer / imd if better == "lower" else imd / peer


def table_rows(results):
    """One row per (part, metric, subject); each peer row carries its ratio against the imd row
    of the same metric whose protocol matches best (same kind first, else the first imd row)."""
    rows = []
    by_metric = {}
    for r in results:
        by_metric.setdefault((r.part, r.metric), []).append(r)
    for (part, metric), rs in by_metric.items():
        imds = [r for r in rs if r.is_imd]
        for r in rs:
            if r.is_imd:
                rows.append((part, metric, r.subject, fmt(r.value, r.unit), "", r.note))
                continue
            kind = r.subject.split()[-1]
            match = ([i for i in imds if i.subject.endswith(kind) and i.value is not None]
                     or [i for i in imds if i.value is not None])
            ref = match[0] if match else None
            q = ratio(ref.value, r.value, r.better) if ref else None
            rtext = f"{q:.2f}x vs {ref.subject}" if q is not None else "n/a"
            rows.append((part, metric, r.subject, fmt(r.value, r.unit), rtext, r.note))
    return rows


def print_table(results, out=sys.stdout):
    rows = table_rows(results)
    headers = ("part", "metric", "subject", "value", "imd advantage", "note")
    widths = [max(len(str(x[i])) for x in rows + [headers]) for i in range(6)]
    widths[1] = min(widths[1], 48)
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths))
    print(line, file=out)
    print("-" * len(line), file=out)
    for row in rows:
        print("  ".join(str(c)[:w].ljust(w) for c, w in zip(row, widths)), file=out)


def machine():
    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem = int(f.readline().split()[1]) // 1024
    os_name = "?"
    if os.path.exists("/etc/os-release"):
        with open("/etc/os-release") as f:
            for line in f:
                if line.startswith("PRETTY_NAME="):
                    os_name = line.split("=", 1)[1].strip().strip('"')
    return f"{os.cpu_count()} x {cpu}, {mem:,} MB RAM, {os_name}, Linux {platform.release()}"


def peer_versions():
    out = []
    for pkg in ("nginx", "libnginx-mod-nchan", "mosquitto", "prosody"):
        try:
            v = subprocess.run(["dpkg-query", "-W", "-f=${Version}", pkg], capture_output=True,
                               text=True).stdout.strip()
        except OSError:
            v = ""
        out.append(f"{pkg} {v or 'not installed'}")
    return ", ".join(out)


def run_record(command, parts, started, finished, imd_pythons, fastpaths=()):
    """`fastpaths`: the imd.fastpath implementation each of `imd_pythons` ran."""
    return {"command": command, "parts": list(parts), "started": started, "finished": finished,
            "load": loadavg(), "imd_python": [interpreter(p) + (f", fastpath {f}" if f else "")
                                             for p, f in itertools.zip_longest(imd_pythons, fastpaths)]}


def interpreter(python):
    if python == sys.executable:
        return f"`{python}` (Python {platform.python_version()})"
    try:
        v = subprocess.run([python, "-c", "import platform;print(platform.python_version())"],
                           capture_output=True, text=True, timeout=10).stdout.strip()
    except OSError:
        v = "?"
    return f"`{python}` (Python {v})"


def plots(results, outdir):
    """PNG plots (if matplotlib is installed): memory vs connections, deliveries vs subscribers.
    Returns the file names written."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    for part, name, xlabel, ylabel in (
            ("idle", "bench-memory.png", "connections", "server RSS growth (MB)"),
            ("fanout", "bench-fanout.png", "subscribers", "deliveries per server CPU-second"),
            ("xmpp", "bench-xmpp.png", "offered msgs/s", "p99 latency (ms)"),
            ("chat", "bench-chat.png", "offered msgs/s", "ack p99 latency (ms)"),
            ("chat-pg", "bench-chat-pg.png", "offered msgs/s", "ack p99 latency (ms)")):
        series = [r for r in results if r.part == part and len(r.series) > 1]
        if not series:
            continue
        fig, ax = plt.subplots(figsize=(7, 4.2), dpi=100)
        for r in series:
            xs, ys = zip(*r.series)
            ax.plot(xs, ys, marker="o", label=r.subject, linewidth=2.2 if r.is_imd else 1.2)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if part in ("xmpp", "chat", "chat-pg"):
            ax.set_yscale("log")
            ax.axhline({"xmpp": 100, "chat": 20, "chat-pg": 50}[part], color="grey", linestyle=":", linewidth=1)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(outdir, name))
        plt.close(fig)
        written.append(name)
    return written


# Targets of issues 9 and 5 (chat-pg): (part, metric prefix, imd subjects, kind, value) where kind is "max" (imd
# value at most), "min" (at least) or "x<peer>" (at least value times that peer's figure).
TARGETS = [
    ("idle", "server RSS per idle connection", ("imd tcp", "imd ws", "imd sse"), "max", 1024),
    ("idle", "server RSS per idle connection", ("imd xmpp",), "max", 3072),
    ("fanout", "deliveries per server CPU-second", ("imd tcp", "imd sse"), "xnchan sse", 2.0),
    ("fanout", "deliveries per server CPU-second", ("imd tcp", "imd sse"), "xmosquitto", 1.0),
    ("burst", "deliveries per server CPU-second", ("imd tcp", "imd sse"), "min", 1_000_000),
    ("chat", "acked messages per second", ("imd tcp",), "min", 20000),
    ("chat", "ack latency p99", ("imd tcp",), "max", 20),
    ("chat", "sustained acked msgs/s", ("imd tcp",), "min", 10000),
    ("chat-pg", "acked messages per second", ("imd tcp postgresql",), "min", 30000),
    ("chat-pg", "ack latency p99", ("imd tcp postgresql",), "max", 50),
    ("xmpp", "sustained 1:1 msgs/s", ("imd xmpp", "imd xmpp postgresql"), "xprosody xmpp|saturation", 5.0),
    ("xmpp", "sustained 1:1 msgs/s", ("imd xmpp", "imd xmpp postgresql"), "xprosody-debian xmpp|saturation",
     5.0),
    ("logins", "logins per second (wall)", ("imd tcp",), "min", 10000),
]


def target_rows(results):
    """(target text, measured text, verdict) for every target whose part ran."""
    rows = []
    for part, prefix, subjects, kind, want in TARGETS:
        found = {r.subject: r for r in results if r.part == part and r.metric.startswith(prefix)}
        if not found:
            continue
        for subject in subjects:
            r = found.get(subject)
            if kind.startswith("x"):
                peer_name, _, peer_metric = kind[1:].partition("|")
                peer_metric = peer_metric or prefix
                peer = next((p for p in results if p.part == part and p.subject == peer_name
                             and p.metric.startswith(peer_metric)), None)
                text = f"{subject} {prefix} >= {want:g}x {peer_name}" + (
                    f" ({peer_metric})" if peer_metric != prefix else "")
                if r is None or r.value is None or peer is None or peer.value is None:
                    rows.append((text, "n/a", "not measured"))
                    continue
                q = r.value / peer.value
                rows.append((text, f"{q:.2f}x ({fmt(r.value, r.unit)} vs {fmt(peer.value, peer.unit)})",
                             "met" if q >= want else f"missed by {want / q:.2f}x"))
                continue
            unit = r.unit if r else ""
            text = f"{subject} {prefix} {'<=' if kind == 'max' else '>='} {fmt(want, unit)}"
            if r is None or r.value is None:
                rows.append((text, "n/a", "not measured"))
                continue
            ok = r.value <= want if kind == "max" else r.value >= want
            miss = r.value / want if kind == "max" else want / r.value
            rows.append((text, fmt(r.value, r.unit), "met" if ok else f"missed by {miss:.2f}x"))
    return rows


NOTES_MARK = "<!-- analysis below this line is written by hand and kept when bench/run.py rewrites the file -->"


def _kept_notes(path):
    if not os.path.exists(path):
        return ""
    with open(path) as f:
        text = f.read()
    i = text.find(NOTES_MARK)
    return text[i + len(NOTES_MARK):].strip("\n") if i >= 0 else ""


def loadavg():
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def save_json(path, runs, results):
    """The results beside the markdown (PATH.json): runs = [{"command", "parts", "started",
    "finished", "load", "imd_python"}], so a later run of some parts can keep the others."""
    import dataclasses
    import json
    with open(path, "w") as f:
        json.dump({"runs": runs, "results": [dataclasses.asdict(r) for r in results]}, f, indent=1)


def load_json(path):
    """(runs, results) saved by save_json, or ([], []) if there is none."""
    import json
    from bench.parts import Result
    if not os.path.exists(path):
        return [], []
    with open(path) as f:
        data = json.load(f)
    results = [Result(**{**r, "series": [tuple(x) for x in r["series"]]}) for r in data["results"]]
    return data["runs"], results


def write_markdown(path, results, runs, notes=()):
    """docs/benchmarks.md from `results`; `runs` says which command measured which parts."""
    kept = _kept_notes(path)
    outdir = os.path.dirname(os.path.abspath(path))
    os.makedirs(outdir, exist_ok=True)
    images = plots(results, outdir)
    rows = table_rows(results)
    lines = [
        "# Benchmarks",
        "",
        "Written by `bench/run.py` on this machine; every figure below was measured by the runs",
        "listed (servers and load generator side by side on the same cores, loopback only). Other",
        "work on the machine shows in wall-clock rates and latencies, less in per-CPU-second figures.",
        "",
        f"- machine: {machine()}",
        f"- bench interpreter: {interpreter(sys.executable)}",
        f"- peers (Debian packages, run by the bench with generated configs): {peer_versions()}",
    ]
    for run in runs:
        lines += [f"- `{run['command']}` — parts {', '.join(run['parts'])}; {run['started']} – "
                  f"{run['finished']} UTC, load average at the end {run['load']}; imd ran on "
                  + "; rows labelled imd/…: ".join(run["imd_python"])]
    lines += [
        "",
        "Method: server memory is the VmRSS delta of the server's processes (nginx: its worker) between",
        "a baseline (after 200 warm-up connections were opened and closed) and N idle connections;",
        "kernel memory is the Slab delta of /proc/meminfo and counts both ends of each loopback socket.",
        "CPU is utime+stime of the server's processes from /proc/<pid>/stat. The load generator",
        "(bench/loadgen.py) runs in separate processes (≤ 19,000 sockets each, epoll, source",
        "addresses 127.0.0.2–40). Fan-out publishes one message at a time and waits for the server's",
        "answer (HTTP response or MQTT PUBACK). 'imd advantage' is how many times better imd is than",
        "the peer (above 1 = imd wins). XMPP peers: `prosody` loads only the modules this traffic",
        "uses, `prosody-gengc` the same with Lua's generational GC, `prosody-debian` the modules and",
        "the c2s rate limit of the package's own /etc/prosody/prosody.cfg.lua (carbons, smacks,",
        "blocklist, limits, csi_simple, pep, ...); all three without TLS or s2s, accounts internal_plain.",
        "",
        "| part | metric | subject | value | imd advantage | note |",
        "|---|---|---|---:|---|---|",
    ]
    for part, metric, subject, value, rtext, note in rows:
        lines.append(f"| {part} | {metric} | {subject} | {value} | {rtext} | {note} |")
    lines.append("")
    targets = target_rows(results)
    if targets:
        lines += ["## Targets (issues 9 and 5)", "", "| target | measured | verdict |", "|---|---|---|"]
        lines += [f"| {t} | {m} | {v} |" for t, m, v in targets]
        lines.append("")
    for img in images:
        lines += [f"![{img}]({img})", ""]
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    lines += [NOTES_MARK, ""]
    if kept:
        lines += [kept, ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return images


def now_utc():
    return time.strftime("%Y-%m-%d %H:%M", time.gmtime())
