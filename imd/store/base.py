"""The Store interface: the only durable state of imd (DESIGN.md §6).

Every backend (sqlite, postgresql, null) implements :class:`Store` and passes the
contract suite in ``tests/store/test_contract.py``.

Concurrency contract
--------------------
* **Writes never block the caller.** ``send_message`` and ``add_notices`` put an
  operation on a bounded queue and return at once; they raise :class:`StoreFull`
  when the queue is at its limit (the caller answers ``error`` 503). The result
  arrives later through ``callback(result, error)``, called in the hub thread
  from a greenlet (never from a foreign OS thread). Callbacks must not block.
  Operations are committed in submission order, many per transaction (group
  commit), and a callback runs only after its operation is committed.
* ``set_cursor``, ``touch_user``, ``add_contact``, ``remove_contact`` and
  ``set_password`` are fire-and-forget: they are coalesced in memory and
  written in batches by the same writer. ``flush()`` waits until everything
  submitted before the call is committed.
* **Reads block the calling greenlet** (never the hub): call them from a
  greenlet, not from an io-watcher callback. They are greenlet-safe.

Inbox model (DESIGN.md §3)
--------------------------
Every user has one inbox, numbered by ``seq`` from 1 without reuse. A message
from A to B is one inbox entry in B's inbox (``kind='msg'``) and one in A's inbox
(so A's other devices stay in sync); a notice is one entry in each recipient's
inbox (``kind='notice'``). A device's cursor is the highest seq it acknowledged;
a user's *received seq* is the highest cursor of any of their devices. Offline
entries are the entries *addressed to* the user with seq above the received seq.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

USER_ID_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")

Callback = Callable[[Any, Optional[BaseException]], None]

LAST_SEQS_MAX = 1000         # users per Store.last_seqs call (one query)
# last_sent_to (read receipts) looks at most this many of the recipient's inbox entries back
# from the receipt's seq (both directions count): no receipt scans an inbox of unbounded length
READ_SCAN_MAX = 1000


class StoreError(Exception):
    """Base of store errors."""


class StoreFull(StoreError):
    """The write queue is at its limit; answer the client with error 503."""


class StoreUnavailable(StoreError):
    """The backing database cannot be reached (reads); retry later (503)."""


@dataclass(slots=True)
class Entry:
    """One inbox entry of ``user``.

    ``kind`` is ``'msg'`` or ``'notice'``. For a msg, ``sender`` and ``recipient``
    are set and ``user`` is one of them. For a notice, ``notice_kind`` is the
    reminder kind (e.g. ``booking.confirmed``) and ``sender`` is None.
    ``body`` is a str or a dict (JSON object); ``ctx`` a dict or None; ``ts``
    milliseconds since the epoch. ``client_id`` is the id the sender's client
    gave the message (None for notices and for messages sent without one);
    it is unique per sender only. ``flags`` holds, as bits, what the sender's
    client asked of the recipient's that the envelope has no field for
    (:data:`imd.envelope.RECEIPT_REQUESTED`); the store keeps it and never
    interprets it, and :meth:`envelope` leaves it out.
    """

    user: str
    seq: int
    mid: str
    kind: str
    body: Any
    ts: int
    sender: Optional[str] = None
    recipient: Optional[str] = None
    ctx: Optional[dict] = None
    notice_kind: Optional[str] = None
    client_id: Optional[str] = None
    flags: int = 0

    def envelope(self) -> dict:
        """The server→client envelope of this entry (:func:`entry_envelope`)."""
        return entry_envelope(self.kind, self.mid, self.seq, self.sender, self.recipient, self.body,
                              self.ts, self.ctx, self.notice_kind, self.client_id)


def entry_envelope(kind: str, mid: str, seq: int, sender: Optional[str], recipient: Optional[str],
                   body: Any, ts: int, ctx: Optional[dict], notice_kind: Optional[str],
                   client_id: Optional[str]) -> dict:
    """The server→client envelope of an inbox entry with these fields (DESIGN.md §3);
    a message carries the sender's client id as ``id`` when it had one."""
    if kind == "msg":
        env = {"type": "msg", "mid": mid, "seq": seq, "from": sender, "to": recipient, "body": body, "ts": ts}
        if ctx is not None:
            env["ctx"] = ctx
        if client_id is not None:
            env["id"] = client_id
        return env
    return {"type": "notice", "mid": mid, "seq": seq, "kind": notice_kind, "body": body, "ts": ts}


@dataclass(slots=True)
class MessageResult:
    """Result of ``send_message``: the ack and both inbox entries.

    ``duplicate`` is True when (sender, client_id) was stored before: then
    ``mid``/``ts``/``sender_seq`` are the original ones, ``entries`` is empty and
    nothing new was stored.
    """

    mid: str
    ts: int
    sender_seq: int
    recipient_seq: int
    duplicate: bool = False
    entries: list = field(default_factory=list)   # [sender's Entry, recipient's Entry]


@dataclass(slots=True)
class UserInfo:
    user: str
    role: Optional[str] = None
    last_seen: Optional[int] = None      # ms since epoch
    platform: Optional[str] = None


@dataclass(slots=True)
class AttachState:
    """What attaching a session reads (see ``Store.attach_states``)."""
    top: int                          # the user's inbox top (last_seq)
    contacts: Optional[set] = None    # the user's contacts, when asked for
    offline: Optional[list] = None    # offline entries (``offline``), when asked for


class Store:
    """Interface; see the module docstring for the concurrency contract."""

    name = "base"
    read_scan_max = READ_SCAN_MAX     # last_sent_to's window (tests make it small)

    # -- lifecycle ---------------------------------------------------------
    def open(self) -> None:
        """Connect, apply migrations, start the writer. Blocks the calling greenlet."""
        raise NotImplementedError

    def close(self, timeout: float = 10.0) -> None:
        """Flush what is queued (up to ``timeout``), stop the writer, disconnect."""
        raise NotImplementedError

    # -- writes (queued; see module docstring) -----------------------------
    def send_message(self, sender: str, recipient: str, client_id: str, body: Any,
                     ctx: Optional[dict], mid: str, ts: int, callback: Callback,
                     flags: int = 0) -> None:
        """Store a message in both inboxes; ``callback(MessageResult, None)`` after commit.
        ``flags`` (see :class:`Entry`) is stored with it and comes back in its entries.

        Raises StoreFull if the queue is full.
        """
        raise NotImplementedError

    def add_notices(self, users: Optional[Iterable[str]], role: Optional[str], kind: str,
                    body: Any, mids: Callable[[], str], ts: int, callback: Callback) -> None:
        """Append a notice to the inbox of each user in ``users``; or, when ``users``
        is None, of every known user with ``role`` (every known user if ``role`` is
        None too). ``mids()`` makes one new mid per recipient. ``callback(list[Entry],
        None)`` after commit. Raises StoreFull if the queue is full."""
        raise NotImplementedError

    def set_cursor(self, user: str, device: str, seq: int) -> None:
        """Record that ``device`` of ``user`` holds every entry up to ``seq`` (monotonic)."""
        raise NotImplementedError

    def touch_user(self, user: str, role: Optional[str], platform: Optional[str], ts: int) -> None:
        """Record the user as known, with role, last platform and last-seen time."""
        raise NotImplementedError

    def add_contact(self, user: str, contact: str) -> None:
        """Make ``user`` and ``contact`` mutual contacts."""
        raise NotImplementedError

    def remove_contact(self, user: str, contact: str) -> None:
        raise NotImplementedError

    def set_password(self, user: str, credentials: Optional[dict]) -> None:
        """Store (or, with None, delete) the user's SCRAM credentials (a JSON-able dict)."""
        raise NotImplementedError

    def flush(self, timeout: Optional[float] = None) -> bool:
        """Block until everything submitted before this call is committed. True if it was."""
        raise NotImplementedError

    # -- reads (block the calling greenlet) --------------------------------
    def inbox(self, user: str, since: int, limit: int) -> list[Entry]:
        """Entries of ``user`` with seq > ``since``, ascending, at most ``limit``."""
        raise NotImplementedError

    def offline(self, user: str, limit: int) -> list[Entry]:
        """Entries addressed to ``user`` (not sent by them) above their received seq."""
        raise NotImplementedError

    def last_seq(self, user: str) -> int:
        """The highest seq in ``user``'s inbox (0 if empty)."""
        raise NotImplementedError

    def last_seqs(self, users: list) -> dict:
        """``{user: last_seq}`` for many users in one query (0 for a user without
        an inbox); at most LAST_SEQS_MAX users per call."""
        raise NotImplementedError

    def attach_states(self, requests: list) -> list:
        """For each ``(user, want_contacts, offline_limit)`` an :class:`AttachState`:
        ``last_seq``, then ``contacts`` (if wanted) and ``offline`` up to the limit
        (if > 0), read in that order. A backend overrides this to serve many logins
        with one round trip (SQLite: one threadpool job); this default reads one
        by one."""
        return [AttachState(self.last_seq(user), self.contacts(user) if want_contacts else None,
                            self.offline(user, limit) if limit else None)
                for user, want_contacts, limit in requests]

    def cursor(self, user: str, device: str) -> int:
        raise NotImplementedError

    def received_seq(self, user: str) -> int:
        raise NotImplementedError

    def contacts(self, user: str) -> set[str]:
        raise NotImplementedError

    def users_info(self, users: Iterable[str]) -> dict[str, UserInfo]:
        """Known users among ``users`` → their UserInfo (unknown users are absent)."""
        raise NotImplementedError

    def password(self, user: str) -> Optional[dict]:
        raise NotImplementedError

    def stored_ack(self, sender: str, client_id: str) -> Optional[tuple[str, int, int]]:
        """``(mid, sender_seq, ts)`` of the message ``sender`` stored with ``client_id``, or
        None if none is stored: what the ack of a re-send of it carries. A read: it never
        waits behind queued writes (the router asks when the write queue is full)."""
        raise NotImplementedError

    def last_sent_to(self, sender: str, recipient: str,
                     upto_recipient_seq: int) -> Optional[tuple[int, str, Optional[str]]]:
        """For read receipts: of the messages ``sender`` sent to ``recipient`` whose
        seq in the recipient's inbox is <= ``upto_recipient_seq`` and within
        ``read_scan_max`` of it (> ``upto_recipient_seq - read_scan_max``), the newest
        one's (seq in the sender's inbox, mid, client id or None); None if there is
        none. The window bounds the read: a receipt normally covers a message from
        the very peer it goes to, the first entry looked at."""
        raise NotImplementedError

    # -- observability -----------------------------------------------------
    def stats(self) -> dict:
        """Counters for metrics: at least ``queue`` (ops waiting), ``batches``,
        ``committed`` (ops), ``retries``, ``last_batch`` (ops in the last commit)."""
        raise NotImplementedError
