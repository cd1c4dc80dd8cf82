"""Process metrics in the Prometheus text format.

Counters and histograms are plain Python numbers updated in the hub (no
locks: one thread touches them). Gauges, and counters kept elsewhere (e.g. the
store writer's), are callables read at scrape time.
"""

from __future__ import annotations

import bisect
import os
import resource
from collections import defaultdict
from typing import Callable

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Histogram:
    __slots__ = ("buckets", "counts", "sum", "count")

    def __init__(self, buckets=LATENCY_BUCKETS):
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1


_type_labels: dict[str, tuple] = {}


def _type_label(type_: str) -> tuple:
    """The labels tuple ``(("type", type_),)``, made once per envelope type."""
    labels = _type_labels.get(type_)
    if labels is None:
        labels = _type_labels[type_] = (("type", type_),)
    return labels


class Metrics:
    """The registry of one process."""

    def __init__(self) -> None:
        self.counters: dict[str, dict[tuple, float]] = defaultdict(lambda: defaultdict(float))
        self.help: dict[str, str] = {}
        self.gauges: dict[str, tuple[str, Callable[[], dict]]] = {}
        self.counter_fns: dict[str, tuple[str, Callable[[], dict]]] = {}
        self.histograms: dict[str, Histogram] = {}
        self._in = self.counters["imd_messages_in_total"]
        self._out = self.counters["imd_messages_out_total"]

    def inc(self, name: str, labels: tuple = (), value: float = 1) -> None:
        """``labels`` is a tuple of (key, value) pairs."""
        self.counters[name][labels] += value

    # shorthands for the hot paths (one per delivery: no allocation once a type was seen)
    def msg_in(self, type_: str) -> None:
        self._in[_type_labels.get(type_) or _type_label(type_)] += 1

    def out(self, type_: str, n: int = 1) -> None:
        """``n`` envelopes of ``type_`` written (a fan-out counts once, with its total)."""
        self._out[_type_labels.get(type_) or _type_label(type_)] += n

    def gauge(self, name: str, help: str, read: Callable[[], dict]) -> None:
        """``read()`` returns {labels tuple: value}."""
        self.gauges[name] = (help, read)

    def counter_fn(self, name: str, help: str, read: Callable[[], dict]) -> None:
        """A counter whose value lives elsewhere; ``read()`` returns {labels tuple: value}."""
        self.counter_fns[name] = (help, read)

    def histogram(self, name: str, help: str, kept: Histogram | None = None) -> Histogram:
        """The histogram ``name``, made on first use, or ``kept`` (one updated elsewhere)."""
        h = self.histograms.get(name)
        if h is None:
            h = self.histograms[name] = kept if kept is not None else Histogram()
            self.help[name] = help
        return h

    def describe(self, name: str, help: str) -> None:
        self.help[name] = help

    def render(self) -> str:
        lines = []
        for name, series in sorted(self.counters.items()):
            lines.append(f"# HELP {name} {self.help.get(name, name)}")
            lines.append(f"# TYPE {name} counter")
            for labels, v in sorted(series.items()):
                lines.append(f"{name}{_labels(labels)} {_num(v)}")
        for kind, fns in (("counter", self.counter_fns), ("gauge", self.gauges)):
            for name, (help, read) in sorted(fns.items()):
                lines.append(f"# HELP {name} {help}")
                lines.append(f"# TYPE {name} {kind}")
                for labels, v in sorted(read().items()):
                    lines.append(f"{name}{_labels(labels)} {_num(v)}")
        for name, h in sorted(self.histograms.items()):
            lines.append(f"# HELP {name} {self.help.get(name, name)}")
            lines.append(f"# TYPE {name} histogram")
            acc = 0
            for bound, c in zip(h.buckets, h.counts):
                acc += c
                lines.append(f'{name}_bucket{{le="{bound}"}} {acc}')
            lines.append(f'{name}_bucket{{le="+Inf"}} {h.count}')
            lines.append(f"{name}_sum {_num(h.sum)}")
            lines.append(f"{name}_count {h.count}")
        return "\n".join(lines) + "\n"


def _labels(labels: tuple) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{k}="{_esc(str(v))}"' for k, v in labels)
    return "{" + inner + "}"


def _esc(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else repr(float(v))


# -- process figures (Linux /proc; 0 where unavailable) ---------------------------
def open_fds() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return 0


def max_fds() -> int:
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0
