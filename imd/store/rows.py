"""Row ↔ object helpers shared by the SQL backends."""

from __future__ import annotations

from typing import Optional

import orjson

from .base import Entry

# The columns every inbox read selects, in this order (``i`` = inbox, ``m`` = messages).
ENTRY_COLUMNS = "i.seq, m.mid, m.kind, m.sender, m.recipient, m.body, m.ctx, m.ts, m.notice_kind, m.client_id, m.flags"


def entry_from_row(user: str, row) -> Entry:
    """An Entry of ``user`` from a row of ENTRY_COLUMNS (body/ctx as JSON text)."""
    seq, mid, kind, sender, recipient, body, ctx, ts, notice_kind, client_id, flags = row
    return Entry(user=user, seq=seq, mid=mid, kind=kind, body=orjson.loads(body), ts=ts,
                 sender=sender, recipient=recipient,
                 ctx=None if ctx is None else orjson.loads(ctx), notice_kind=notice_kind,
                 client_id=client_id, flags=flags)


def message_entries(op, sender_seq: int, recipient_seq: int) -> list:
    """[sender's Entry, recipient's Entry] of a stored MessageOp (positional arguments: this
    runs once per acked message, and keyword construction cost 7x more)."""
    mid, body, ts, sender, recipient, ctx, cid, flags = (op.mid, op.body, op.ts, op.sender,
                                                         op.recipient, op.ctx, op.client_id, op.flags)
    return [Entry(sender, sender_seq, mid, "msg", body, ts, sender, recipient, ctx, None, cid, flags),
            Entry(recipient, recipient_seq, mid, "msg", body, ts, sender, recipient, ctx, None, cid, flags)]


def notice_entry(op, user: str, seq: int, mid: str) -> Entry:
    return Entry(user=user, seq=seq, mid=mid, kind="notice", body=op.body, ts=op.ts,
                 recipient=user, notice_kind=op.kind)


def load_json(text: Optional[str]):
    return None if text is None else orjson.loads(text)
