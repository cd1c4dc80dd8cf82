"""Coverage-guided fuzzing of imd's parsers with atheris (libFuzzer for Python).

    PYTHONPATH=. python bench/fuzz/run.py TARGET [-runs N] [-max_total_time S] [libFuzzer flags...]
    PYTHONPATH=. python bench/fuzz/run.py --list

TARGET is one of bench/fuzz/targets.py's TARGETS: frames, frames_cython,
envelope, ws, ws_cython, http, xmpp. Without -runs or -max_total_time the run
is bounded to 60 s. The corpus lives in ``$IMD_FUZZ_DIR/TARGET`` (default
/tmp/imd-fuzz/TARGET), seeded from targets.SEEDS on first use; crashes are
written to ``$IMD_FUZZ_DIR/crashes/`` (libFuzzer's ``-artifact_prefix``). To
replay a crash: ``run.py TARGET path/to/crash-file``.

Coverage is of Python code only (atheris instruments the imported imd
modules' bytecode); the Cython ``_fastpath`` targets run the compiled code
uninstrumented, so for them the fuzzer is guided by the pure-Python twin's
branches only through the shared input format (they are differential in spirit:
the same invariants on the compiled decoder). Requires ``pip install atheris``.
"""

from __future__ import annotations

import importlib
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import atheris  # noqa: E402

with atheris.instrument_imports(include=["imd", "targets"]):
    import targets  # noqa: E402


def _join_values(args: list) -> list:
    """``-runs N`` / ``-max_total_time S`` (as documented) to libFuzzer's ``-runs=N``."""
    out, i = [], 0
    while i < len(args):
        a = args[i]
        if a.startswith("-") and "=" not in a and i + 1 < len(args) and args[i + 1].lstrip("-").isdigit():
            out.append(f"{a}={args[i + 1]}")
            i += 2
        else:
            out.append(a)
            i += 1
    return out


def main() -> int:
    args = sys.argv[1:]
    if not args or args[0] in ("-h", "--help", "--list"):
        print(__doc__)
        print("targets:", ", ".join(targets.TARGETS))
        return 0 if args else 2
    name, flags = args[0], _join_values(args[1:])
    if name not in targets.TARGETS:
        print(f"unknown target {name!r}; one of: {', '.join(targets.TARGETS)}", file=sys.stderr)
        return 2
    try:
        with atheris.instrument_imports(include=["imd"]):
            importlib.import_module(targets.MODULES[name])
    except ImportError as e:
        print(f"target {name}: {targets.MODULES[name]} is not available here ({e})", file=sys.stderr)
        return 3
    base = os.environ.get("IMD_FUZZ_DIR", "/tmp/imd-fuzz")
    corpus = os.path.join(base, name)
    crashes = os.path.join(base, "crashes") + os.sep
    os.makedirs(corpus, exist_ok=True)
    os.makedirs(crashes, exist_ok=True)
    if not os.listdir(corpus):
        for i, seed in enumerate(targets.SEEDS.get(name, [])):
            with open(os.path.join(corpus, f"seed-{i}"), "wb") as f:
                f.write(seed)
    replay = [a for a in flags if not a.startswith("-")]
    if not replay:
        if not any(a.startswith(("-runs=", "-max_total_time=")) for a in flags):
            flags.append("-max_total_time=60")
        flags = flags + [f"-artifact_prefix={crashes}", corpus]
    atheris.Setup([sys.argv[0], *flags], targets.TARGETS[name])
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main())
