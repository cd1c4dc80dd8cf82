"""Backend-neutral planning of one write batch (the ops of one transaction).

:class:`BatchPlan` decides, before any lock is taken, what each op of a batch
stores: dedupe by (sender, client_id) against what is already stored and
within the batch, and which seqs each new entry takes, *relative* to its user
(the k-th seq the batch takes from that user). The backend then reserves
``taken[user]`` seqs per user in its transaction (learning each user's
``base``, the last seq before the batch), inserts ``rows`` with absolute seq
``base + k``, commits, and builds the callbacks' results with
:meth:`BatchPlan.results` (or :func:`batch_results`, where the plan was made in another process).
"""

from __future__ import annotations

from typing import Callable, Optional

from .base import MessageResult
from .rows import message_entries, notice_entry
from .writer import MessageOp

# Columns of ``BatchPlan.rows``; sender_k is None for a notice.
ROW_COLUMNS = ("mid", "kind", "sender", "recipient", "body", "ctx", "ts", "client_id",
               "sender_k", "recipient_k", "notice_kind", "flags")


class BatchPlan:
    """Plan of a batch. ``stored`` maps (sender, client_id) → (mid, ts, sender_seq,
    recipient_seq) for the batch's client ids already stored; ``known_users(role)``
    lists the known users of ``role`` (all known users when None)."""

    __slots__ = ("ops", "plans", "taken", "rows")

    def __init__(self, ops: list, stored: dict, known_users: Callable[[Optional[str]], list]) -> None:
        self.ops = ops
        self.plans: list = []         # per op: ("new", sk, rk) | ("again", index) | ("dup", row)
        self.taken: dict = {}         #         | ("replay", row) | ("notice", [(user, k, mid)])
        self.rows: list = []
        first: dict = {}              # (sender, client_id) -> index of its first op in the batch
        taken, rows, plans = self.taken, self.rows, self.plans      # (one pass per message: locals)
        for n, op in enumerate(ops):
            if isinstance(op, MessageOp):
                sender, recipient, client_id = op.sender, op.recipient, op.client_id
                if client_id is not None:
                    key = (sender, client_id)
                    if key in first:
                        plans.append(("again", first[key]))
                        continue
                    first[key] = n
                    row = stored.get(key)
                    if row is not None:
                        # stored before; with this op's own mid it is this very op, committed
                        # before a connection dropped during COMMIT: ack it as the original
                        plans.append(("replay" if row[0] == op.mid else "dup", row))
                        continue
                taken[sender] = sender_k = taken.get(sender, 0) + 1
                taken[recipient] = recipient_k = taken.get(recipient, 0) + 1
                rows.append((op.mid, "msg", sender, recipient, op.body_json, op.ctx_json,
                             op.ts, client_id, sender_k, recipient_k, None, op.flags))
                plans.append(("new", sender_k, recipient_k))
            else:
                users = op.users if op.users is not None else known_users(op.role)
                notices = []
                for user, mid in zip(users, op.take_mids(len(users))):
                    taken[user] = k = taken.get(user, 0) + 1
                    rows.append((mid, "notice", None, user, op.body_json, None, op.ts, None,
                                 None, k, op.kind, 0))
                    notices.append((user, k, mid))
                plans.append(("notice", notices))

    def results(self, base: dict) -> list:
        """One result per op, given ``base`` (user → last seq before this batch)."""
        return batch_results(self.ops, self.plans, base)


def batch_results(ops: list, plans: list, base: dict) -> list:
    """One result per op of a batch, from its plan's ``plans`` and ``base`` (user → last
    seq before the batch): what :meth:`BatchPlan.results` gives, where only the plans
    and the bases crossed from the process that committed the batch."""
    out = []
    for op, plan in zip(ops, plans):
        kind = plan[0]
        if kind == "new":
            sender_seq, recipient_seq = base[op.sender] + plan[1], base[op.recipient] + plan[2]
            out.append(MessageResult(op.mid, op.ts, sender_seq, recipient_seq, False,
                                     message_entries(op, sender_seq, recipient_seq)))
        elif kind == "notice":
            out.append([notice_entry(op, user, base[user] + k, mid) for user, k, mid in plan[1]])
        elif kind == "again":
            r = out[plan[1]]
            out.append(MessageResult(r.mid, r.ts, r.sender_seq, r.recipient_seq, duplicate=True))
        elif kind == "dup":
            out.append(MessageResult(*plan[1], duplicate=True))
        else:
            mid, ts, sender_seq, recipient_seq = plan[1]
            out.append(MessageResult(mid, ts, sender_seq, recipient_seq,
                                     entries=message_entries(op, sender_seq, recipient_seq)))
    return out


def client_keys(ops: list) -> list:
    """The (sender, client_id) pairs of the batch's messages that have a client id."""
    return [(op.sender, op.client_id) for op in ops
            if isinstance(op, MessageOp) and op.client_id is not None]
