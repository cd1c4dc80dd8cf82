"""Runs the benchmark suite: `python bench/run.py [part ...]` (parts: idle fanout burst logins chat chat-pg xmpp;
none = all; and, only when named, c1m and xnode: bench/c1m.py, bench/cross_node.py). Shows progress on stderr, prints a table of imd against each peer, and writes
docs/benchmarks.md (with PNG plots beside it) unless --no-write.

imd runs under --imd-python (default: this interpreter); pass Debian's optimized interpreter's
venv (bench/setup.sh makes .venv-debian) to compare builds. Parts that need a piece of imd that is
not in the tree yet print "n/a" for imd and still measure the peers.
"""
import argparse
import os
import shlex
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from bench import c1m, cross_node, parts, report  # noqa: E402

EXTRA_PARTS = {"c1m": c1m.part_c1m, "xnode": cross_node.part_xnode}      # not in the default suite


def interpreter_label(python):
    """A short name for an interpreter path: the venv's directory without dots, or the file name."""
    parts_ = os.path.abspath(python).split(os.sep)
    if len(parts_) >= 3 and parts_[-2] == "bin":
        return parts_[-3].lstrip(".").replace("venv-", "") or parts_[-1]
    return parts_[-1]


def build_fastpath(repo, python):
    """Build imd's Cython extension in place in `repo` (as tests/conftest.py does; a failed build
    leaves the pure-Python twin) and return the fast path `python` will run imd with."""
    subprocess.run([python, "setup.py", "-q", "build_ext", "--inplace"], cwd=repo, capture_output=True)
    return fastpath_of(repo, python)


def fastpath_of(repo, python):
    """"cython" or "python": what imd.fastpath picks under `python` with `repo` first on the path."""
    out = subprocess.run([python, "-c", "from imd.fastpath import IMPL; print(IMPL)"], cwd=repo,
                         env=dict(os.environ, PYTHONPATH=repo), capture_output=True, text=True)
    return out.stdout.strip() or "unknown"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("parts", nargs="*", metavar="part", help="idle | fanout | burst | logins | chat | chat-pg | xmpp (default: all of these) | c1m | xnode")
    ap.add_argument("--imd-python", default=sys.executable, help="interpreter that runs imd")
    ap.add_argument("--also-imd-python", metavar="PYTHON",
                    help="run imd's side of the parts a second time under this interpreter "
                         "(e.g. .venv-debian/bin/python); its rows are labelled imd/<name>")
    ap.add_argument("--imd-only", action="store_true", help="skip the peers (imd's side only)")
    ap.add_argument("--imd-repo", default=REPO, help="source tree of imd (default: this one)")
    ap.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    ap.add_argument("--idle-conns", type=int, help="connections per subject in `idle` (15000)")
    ap.add_argument("--heartbeat", type=float, default=0, help="`idle`: ping every N s per conn")
    ap.add_argument("--idle-kinds", default=",".join(parts.IDLE_KINDS),
                    help="`idle`: imd's kinds to measure, comma-separated (tcp,ws,sse,xmpp)")
    ap.add_argument("--idle-engine", choices=("memory", "redis"), default="memory",
                    help="`idle`: imd's engine; redis = a private redis-server per imd start, "
                         "its memory per connection reported too")
    ap.add_argument("--idle-workers", type=int, default=1,
                    help="`idle`: node.workers (more than 1 needs --idle-engine redis)")
    ap.add_argument("--subscribers", type=int, help="`fanout` subscribers (10000)")
    ap.add_argument("--messages", type=int, help="`fanout` messages (200)")
    ap.add_argument("--c1m-conns", type=int, help="`c1m` connections (1000000)")
    ap.add_argument("--c1m-mode", choices=("nodes", "workers"), default="workers",
                    help="`c1m`: one imd with node.workers (default), or independent imd processes")
    ap.add_argument("--c1m-engine", choices=("memory", "redis"), default="redis",
                    help="`c1m`: redis (a private redis-server) or memory (nodes mode only)")
    ap.add_argument("--c1m-budget", type=int, default=1500,
                    help="`c1m`: seconds after which everything is stopped (default 1500)")
    ap.add_argument("--xnode-pairs", type=int, help="`xnode`: chat pairs (30)")
    ap.add_argument("--xnode-msgs", type=int, help="`xnode`: messages per pair (500)")
    ap.add_argument("--imd-profile", metavar="DIR",
                    help="run imd under cProfile; DIR/imd-NN.prof(.txt) per imd start")
    ap.add_argument("--out", default=os.path.join(REPO, "docs", "benchmarks.md"))
    ap.add_argument("--no-write", action="store_true", help="print the table only")
    ap.add_argument("--keep-other-parts", action="store_true",
                    help="keep the results of the parts not run now from the previous run (OUT.json)")
    args = ap.parse_args(argv)

    chosen = args.parts or list(parts.PARTS)
    runners = dict(parts.PARTS, **EXTRA_PARTS)
    unknown = [p for p in chosen if p not in runners]
    if unknown:
        ap.error(f"unknown part(s) {', '.join(unknown)}; choose from {', '.join(runners)}")
    idle_kinds = [k for k in args.idle_kinds.split(",") if k]
    if set(idle_kinds) - set(parts.IDLE_KINDS):
        ap.error(f"--idle-kinds: choose from {','.join(parts.IDLE_KINDS)}")
    if args.idle_workers > 1 and args.idle_engine != "redis":
        ap.error("--idle-workers > 1 needs --idle-engine redis")
    if os.sep in args.imd_python:
        args.imd_python = os.path.abspath(args.imd_python)
    if args.also_imd_python and os.sep in args.also_imd_python:
        args.also_imd_python = os.path.abspath(args.also_imd_python)
    ctx = parts.Context(os.path.abspath(args.imd_repo), args.imd_python, quick=args.quick,
                        profile_dir=args.imd_profile, imd_only=args.imd_only)
    if not ctx.imd_available():
        print("note: imd daemon not in this tree yet: imd rows are n/a", file=sys.stderr)
    pythons = [args.imd_python] + ([args.also_imd_python] if args.also_imd_python else [])
    fastpaths = [build_fastpath(ctx.repo, args.imd_python)] + [fastpath_of(ctx.repo, p) for p in pythons[1:]]
    for python, impl in zip(pythons, fastpaths):
        print(f"imd fast path under {python}: {impl}", file=sys.stderr)
    started = report.now_utc()
    passes = [ctx]
    if args.also_imd_python:
        passes.append(parts.Context(ctx.repo, args.also_imd_python, quick=args.quick,
                                    profile_dir=args.imd_profile, imd_only=True,
                                    label="imd/" + interpreter_label(args.also_imd_python)))
    results = []
    for name, pass_ctx in [(n, c) for n in chosen for c in passes]:
        print(f"[{name}]" + ("" if pass_ctx is ctx else f" {pass_ctx.label}"), file=sys.stderr, flush=True)
        kwargs = {}
        if name == "idle":
            kwargs = {"n": args.idle_conns, "heartbeat": args.heartbeat, "engine": args.idle_engine,
                      "workers": args.idle_workers, "kinds": idle_kinds}
        elif name in ("fanout", "burst"):
            kwargs = {"subscribers": args.subscribers, "messages": args.messages}
        elif name == "c1m":
            kwargs = {"conns": args.c1m_conns, "mode": args.c1m_mode, "engine": args.c1m_engine,
                      "heartbeat": args.heartbeat or 120.0, "budget": args.c1m_budget}
        elif name == "xnode":
            kwargs = {"pairs": args.xnode_pairs, "msgs": args.xnode_msgs}
        results += runners[name](pass_ctx, **kwargs)
    json_path = os.path.splitext(args.out)[0] + ".json"
    command = "python bench/run.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    runs = [report.run_record(command.strip(), chosen, started, report.now_utc(), pythons, fastpaths)]
    if args.keep_other_parts:
        old_runs, old_results = report.load_json(json_path)
        kept = [r for r in old_results if r.part not in chosen]
        results = kept + results
        runs = [r for r in old_runs if set(r["parts"]) - set(chosen)] + runs
    order = list(parts.PARTS) + list(EXTRA_PARTS)
    results.sort(key=lambda r: order.index(r.part))
    print()
    report.print_table(results)
    targets = report.target_rows(results)
    if targets:
        print("\ntargets (issues 9 and 5):")
        for text, measured, verdict in targets:
            print(f"  {verdict:<18} {text}: {measured}")
    if not args.no_write:
        report.save_json(json_path, runs, results)
        images = report.write_markdown(args.out, results, runs)
        print(f"\nwrote {args.out}" + (f" and {', '.join(images)}" if images else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
