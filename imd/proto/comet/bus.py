"""iComet channels across nodes: the admin operations go over the engine's bus.

Every node keeps a replica of every channel. ``/pub``, ``/push``,
``/broadcast``, ``/sign``, ``/close`` and ``/clear`` are published as
``comet`` events on the bus channel ``all`` and every node (the one that got
the request too) applies them to its own :class:`Registry` in bus order, so
channel seqs and buffers agree on every node and a long-poll client may
reconnect to any worker. Subscribers stay local. A channel lives while any
node has subscribers on it: with a remote engine each node publishes the
names of its occupied channels every ``channel_timeout / 3`` seconds
(``keep``), which holds them open everywhere.

With the memory engine this is the same code path on one node (the event
comes back from a loop callback). Limits: the bus is at most once, so a lost
publication leaves one node's replica behind (its subscribers see a seq jump,
as iComet clients do after a buffer overflow); ``/psub`` channel presence is
per node.

Core seam used: ``node.comet_handlers`` (imd/node.py routes ``comet`` events
to it) and, until the node offers a publish method for comet events,
``node.engine.subscribe``/``publish`` directly.
"""

from __future__ import annotations

import logging

from imd.engine.base import ALL, Event
from imd.net.conn import bulk_writes
from imd.proto.comet.channels import Refused, Registry

log = logging.getLogger("imd.comet")

KEEP_BATCH = 1000


class CometBus:
    """Publishes iComet admin operations and applies them (hub only, never blocks)."""

    def __init__(self, node, registry: Registry, remote: bool) -> None:
        self.node = node
        self.registry = registry
        self.remote = remote            # a bus to other nodes: channels need keep-alives
        self._last_keep = 0.0
        node.comet_handlers[ALL] = self.apply
        node.engine.subscribe(ALL)

    def publish(self, op: str, **data) -> None:
        data["op"] = op
        self.node.engine.publish(ALL, Event("comet", data))

    def apply(self, d: dict) -> None:
        op, reg = d.get("op"), self.registry
        try:
            if op == "pub":
                ch = reg.get(d["cname"])
                with bulk_writes(len(ch.subs) if ch is not None else 0):
                    reg.publish(d["cname"], d["content"])
            elif op == "broadcast":
                with bulk_writes(reg.subscribers):
                    reg.broadcast(d["content"])
            elif op == "sign":
                reg.sign(d["cname"], d["expires"], d["token"])
            elif op == "close":
                reg.close(d["cname"])
            elif op == "clear":
                reg.clear(d["cname"])
            elif op == "keep":
                reg.keep(d["cnames"])
            else:
                log.warning("unknown comet bus op=%r", op)
        except Refused as r:
            log.warning("comet bus op=%s cname=%s refused here: %s", op, d.get("cname"), r.reason)

    def tick(self, now: float) -> None:
        """From the comet port's sweep: publish ``keep`` for locally occupied channels."""
        if not self.remote or now - self._last_keep < self.registry.channel_timeout / 3:
            return
        self._last_keep = now
        names = self.registry.occupied()
        for i in range(0, len(names), KEEP_BATCH):
            self.publish("keep", cnames=names[i:i + KEEP_BATCH])
