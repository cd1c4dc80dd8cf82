"""A delivery checker for fault tests and soaks: every message sent and received,
by id, and what went wrong with them.

    chk = Checker()
    chk.sent("s1", "c-1", to="r1")              # before the send
    chk.acked("s1", "c-1", mid, seq)            # the sender got its ack
    chk.refused("s1", "c-1", 503)               # ... or an error
    chk.expect("r1", "phone")                   # this device must see r1's whole inbox
    chk.connected("r1", "phone")                # each (re)connection starts an epoch
    chk.received("r1", "phone", env, cid)       # each msg/notice envelope it got
    rep = chk.report()                          # Report: lost, duplicated, redelivered, reordered, ...

Definitions (per device = (user, device)):

* **lost** — a message acked to its sender, addressed to a user with an
  expected device, that this device never received.
* **duplicated** — the same mid delivered twice to one device within one
  connection epoch, or in a later epoch but not as part of an in-order replay.
* **redelivered** — the same mid again after a reconnect, in seq order: the
  at-least-once re-delivery the contract allows (DESIGN.md §3). Reported
  apart; not an error.
* **reordered** — within one epoch, an entry whose seq is not above the
  previous one's; or a first delivery whose seq is below one already seen
  (the device saw a later entry before an earlier one). Also per sender →
  recipient device (needs ``cid`` and the entry's ``from``): a message whose
  place in its sender's send order is not after the previous one from that
  sender in this epoch, or, first delivered, before one already seen. This
  is the only order check for entries without a seq (XMPP: ``seq`` None).
  An entry without a mid (XMPP names a message by its sender's client id) is
  known as "sender/cid" and matched to the acked mid of that client id.
* **conflicts** — one seq carrying two different mids for one device (a seq
  reused), or one client id acked with two different mids (stored twice).
* **stored_twice** — one client id delivered under two mids (the sender
  re-sent after a restart and the server stored it again instead of
  answering with the first ack). Needs ``received(..., cid=)``.
* **unacked_delivered** — delivered but its sender never saw an ack (the
  daemon died between storing and acking): allowed, counted for information.

Thread- and greenlet-safe (one lock); no I/O.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field


@dataclass
class Report:
    sent: int = 0
    acked: int = 0
    refused: int = 0
    refused_codes: dict = field(default_factory=dict)  # error code -> how many
    received: int = 0
    lost: list = field(default_factory=list)          # (user, device, mid)
    duplicated: list = field(default_factory=list)    # (user, device, mid, seq)
    redelivered: int = 0
    reordered: list = field(default_factory=list)     # (user, device, seq, previous seq)
    conflicts: list = field(default_factory=list)     # descriptions
    stored_twice: list = field(default_factory=list)  # (cid, mid, other mid)
    unacked_delivered: int = 0

    @property
    def ok(self) -> bool:
        """None lost, none duplicated, none reordered, no conflict."""
        return not (self.lost or self.duplicated or self.reordered or self.conflicts or self.stored_twice)

    def summary(self) -> str:
        return (f"sent={self.sent} acked={self.acked} refused={self.refused} {self.refused_codes or ''} "
                f"received={self.received} "
                f"lost={len(self.lost)} duplicated={len(self.duplicated)} redelivered={self.redelivered} "
                f"reordered={len(self.reordered)} conflicts={len(self.conflicts)} "
                f"stored_twice={len(self.stored_twice)} "
                f"unacked_delivered={self.unacked_delivered}")

    def __str__(self) -> str:
        lines = [self.summary()]
        for name in ("lost", "duplicated", "reordered", "conflicts", "stored_twice"):
            items = getattr(self, name)
            if items:
                lines.append(f"  {name} (first 10): {items[:10]}")
        return "\n".join(lines)


class _Device:
    __slots__ = ("epoch", "seen", "by_seq", "max_seq", "epoch_last", "first_epoch", "from_max", "from_epoch")

    def __init__(self) -> None:
        self.epoch = 0
        self.seen: dict = {}           # mid -> seq
        self.by_seq: dict = {}         # seq -> mid
        self.first_epoch: dict = {}    # mid -> epoch of its first delivery
        self.max_seq = 0
        self.epoch_last = 0            # seq of the previous entry in this epoch
        self.from_max: dict = {}       # sender -> highest send index first delivered
        self.from_epoch: dict = {}     # sender -> send index of the previous entry in this epoch


def _by_cid(sender, cid) -> str:
    """The name of an entry that carries no mid (XMPP: the stanza id is the sender's
    client id): "sender/cid"; acked messages are found under it too."""
    return f"{sender}/{cid}"


class Checker:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sent: dict = {}          # (sender, cid) -> recipient
        self._index: dict = {}         # (sender, cid) -> its place in the sender's send order
        self._acks: dict = {}          # (sender, cid) -> mid
        self._acked_to: dict = {}      # mid -> recipient
        self._refused = 0
        self._alias: dict = {}         # mid -> its "sender/cid" name (entries that carry no mid)
        self._refused_codes: dict = {}
        self._devices: dict = {}       # (user, device) -> _Device
        self._expected: set = set()
        self._dups: list = []
        self._reorders: list = []
        self._conflicts: list = []
        self._redelivered = 0
        self._received = 0
        self._cid_mid: dict = {}       # client id seen in a delivery -> mid
        self._twice: list = []

    # -- senders ------------------------------------------------------------------
    def sent(self, sender: str, cid: str, to: str) -> None:
        with self._lock:
            self._index.setdefault((sender, cid), len(self._index))
            self._sent[(sender, cid)] = to

    def acked(self, sender: str, cid: str, mid: str, seq: int = 0) -> None:
        with self._lock:
            key = (sender, cid)
            old = self._acks.get(key)
            if old is not None and old != mid:
                self._conflicts.append(f"client id {sender}/{cid} acked as {old} and as {mid}")
            self._acks[key] = mid
            self._acked_to[mid] = self._sent.get(key)
            self._alias[mid] = _by_cid(sender, cid)

    def refused(self, sender: str, cid: str, code: int) -> None:
        with self._lock:
            self._refused += 1
            self._refused_codes[code] = self._refused_codes.get(code, 0) + 1

    def is_acked(self, sender: str, cid: str) -> bool:
        with self._lock:
            return (sender, cid) in self._acks

    # -- receivers ----------------------------------------------------------------
    def expect(self, user: str, device: str) -> None:
        """``device`` of ``user`` must receive every acked message addressed to ``user``."""
        with self._lock:
            self._expected.add((user, device))
            self._devices.setdefault((user, device), _Device())

    def connected(self, user: str, device: str) -> None:
        """A new connection of this device: re-delivery is allowed from here on."""
        with self._lock:
            d = self._devices.setdefault((user, device), _Device())
            d.epoch += 1
            d.epoch_last = 0
            d.from_epoch = {}

    def received(self, user: str, device: str, env: dict, cid: str | None = None) -> None:
        """Record one inbox entry (``msg`` or ``notice``) this device got; ``cid``, when
        the caller can tell it (e.g. from the body), is the sender's client id."""
        mid, seq = env.get("mid") or _by_cid(env.get("from"), cid), env["seq"]
        with self._lock:
            self._received += 1
            if cid is not None and env.get("mid"):        # (no mid: named by the cid itself)
                first = self._cid_mid.setdefault(cid, mid)
                if first != mid:
                    self._twice.append((cid, first, mid))
            d = self._devices.setdefault((user, device), _Device())
            sender = env.get("from")
            index = self._index.get((sender, cid))
            if index is not None:
                if index <= d.from_epoch.get(sender, -1) or (mid not in d.seen and index < d.from_max.get(sender, -1)):
                    self._reorders.append((user, device, f"{sender}#{index}",
                                           f"after #{max(d.from_epoch.get(sender, -1), d.from_max.get(sender, -1))}"))
                d.from_epoch[sender] = index
                if mid not in d.seen:
                    d.from_max[sender] = max(index, d.from_max.get(sender, -1))
            if seq is None:                         # no seq (XMPP): by mid and by sender order only
                if mid in d.seen:
                    if d.first_epoch[mid] < d.epoch:
                        self._redelivered += 1
                    else:
                        self._dups.append((user, device, mid, seq))
                d.seen.setdefault(mid, None)
                d.first_epoch[mid] = d.epoch
                return
            other = d.by_seq.get(seq)
            if other is not None and other != mid:
                self._conflicts.append(f"{user}/{device}: seq {seq} carried {other} and {mid}")
            if mid in d.seen:
                if d.first_epoch[mid] < d.epoch and d.seen[mid] == seq:
                    self._redelivered += 1
                    if seq <= d.epoch_last:          # a replay must be in order too
                        self._reorders.append((user, device, seq, d.epoch_last))
                    d.epoch_last = max(d.epoch_last, seq)
                else:
                    self._dups.append((user, device, mid, seq))
                d.first_epoch[mid] = d.epoch     # a third copy in this epoch is a duplicate
                return
            if seq <= d.epoch_last or seq < d.max_seq:
                self._reorders.append((user, device, seq, max(d.epoch_last, d.max_seq)))
            d.epoch_last = max(d.epoch_last, seq)
            d.seen[mid] = seq
            d.by_seq[seq] = mid
            d.first_epoch[mid] = d.epoch
            d.max_seq = max(d.max_seq, seq)

    def received_by(self, user: str, device: str) -> int:
        """How many distinct entries this device has received."""
        with self._lock:
            d = self._devices.get((user, device))
            return 0 if d is None else len(d.seen)

    def missing(self, user: str, device: str, mids) -> list:
        """Those of ``mids`` this device has not received."""
        with self._lock:
            d = self._devices.get((user, device))
            return [m for m in mids if d is None or (m not in d.seen and self._alias.get(m) not in d.seen)]

    def contiguous(self, user: str, device: str) -> int:
        """The highest seq N such that this device saw every seq 1..N (its ``since``)."""
        with self._lock:
            d = self._devices.get((user, device))
            if d is None:
                return 0
            n = 0
            while (n + 1) in d.by_seq:
                n += 1
            return n

    # -- verdict ------------------------------------------------------------------
    def report(self) -> Report:
        with self._lock:
            rep = Report(sent=len(self._sent), acked=len(self._acks), refused=self._refused,
                         refused_codes=dict(self._refused_codes),
                         received=self._received, duplicated=list(self._dups), redelivered=self._redelivered,
                         reordered=list(self._reorders), conflicts=list(self._conflicts),
                         stored_twice=sorted(set(self._twice)))
            for mid, to in self._acked_to.items():
                for (user, device) in self._expected:
                    seen = self._devices[(user, device)].seen
                    if user == to and mid not in seen and self._alias.get(mid) not in seen:
                        rep.lost.append((user, device, mid))
            acked_mids = set(self._acks.values()) | set(self._alias.values())
            for (user, device), d in self._devices.items():
                rep.unacked_delivered += sum(1 for mid in d.seen if mid not in acked_mids
                                             and (user, device) in self._expected)
            return rep
