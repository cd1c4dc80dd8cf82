"""The Redis engine: the cluster bus and the cluster's presence (DESIGN.md §7).

Bus. One pub/sub connection per node carries a subscription per bus channel
the node wants (``u:<user>`` per local user, ``c:<cname>`` per local comet
channel, ``all``). ``subscribe``/``unsubscribe`` only record the wish (for a
user channel, the user string the sessions hold: no channel string per user);
the subscriber greenlet sends SUBSCRIBE/UNSUBSCRIBE in batches of up to
``SUB_BATCH`` channels for the channels whose wish changed, so a login storm
costs a few commands, not one round trip each. What the connection has is
not tracked per channel (a repeated SUBSCRIBE or an UNSUBSCRIBE of a channel
never subscribed is harmless); Redis's replies give the count. ``publish``
queues; the publisher greenlet pipelines everything queued on its own
connection. The reader greenlet decodes each message with
:meth:`Event.decode` and calls the handler.

Own publications. A node receives each of its own publications exactly once,
as with the memory engine, in one of two ways:

- on a user channel (``u:...``) it is handed to the local handler at once
  (from a loop callback, as the memory engine does) and its echo from Redis
  is dropped: traffic between two users of one node does not wait for Redis
  and keeps flowing while Redis is down. Order across publishers does not
  matter there: sessions order inbox entries by seq.
- on every other channel (``all``, ``c:<cname>``) it comes back through
  Redis like everyone else's, so every node, the publisher included, sees
  the publications of all nodes in the one order Redis gives them (the comet
  channels' replicas assign seqs in that order).

Wire format: the message of a publication is ``<tag> <Event.encode()>``; the
tag is the publishing node's id for a user channel (so the echo is dropped
undecoded), ``-<node>:<n>`` for an ordered publication whose ``applied``
callback waits for it to come back, and ``-`` otherwise. Commands are packed
by hiredis.

Reconnects: when the pub/sub connection is lost the reader reconnects with
exponential backoff (0.1 s to 5 s) and re-subscribes every current channel in
batches; once Redis has confirmed them (a ``PING resync`` marker comes back
behind them) the handler gets a local ``resync`` event so the node can fetch
from the store what was published while it was not listening. The publisher
keeps its queue across reconnects (bounded by ``max_queue_bytes``, 256 MiB by
default: a million queued inbox entries; beyond that the oldest publications
are dropped and counted: the bus is at most once).

Per-node records (presence, comet channel counts). Keys, all under
``prefix``:

  ``p:<user>``   hash, field node id → JSON ``{"status","platforms"}``
  ``cc:<cname>`` hash, field node id → number of local subscribers
  ``nu:<node>``, ``nc:<node>``  sets: the users / channels a node has records for
  ``n:<node>``   the node's liveness key, expires after 3/4 of ``presence_ttl``
  ``nodes``      set of the node ids that have records
  ``reap:<node>``, ``reaped:<node>``  which node removes a dead node's records; that it was done

A node's records carry no TTL of their own: one liveness key per node is
refreshed every ``presence_ttl``/4, which costs one command per node instead
of one per user (a million users would otherwise mean a million refreshes per
period). Readers ignore the fields of nodes whose liveness key is gone, so a
crashed node's users read as offline as soon as its key expires (at most
3/4 of ``presence_ttl`` after its last refresh); the next tick of any live node then
"reaps" it: removes its fields and hands the affected users to the local
handler as a ``nodes_lost`` event, so presence announces them offline to
their contacts. Writes are queued and pipelined by the writer greenlet;
readers see this node's own records from memory, so a write is visible to its
writer at once. When a node finds its own liveness key missing (Redis
restarted empty, or it was paused longer than the TTL and reaped) it writes
all its records again; if it had been reaped the handler gets
``presence_restore`` so presence re-announces those users.

Concurrency: every method except ``presence_get`` and ``channel_counts``
never blocks. Those two block the calling greenlet for one pipelined round
trip; when Redis is unreachable they answer from this node's own records
(for a second after each failure, without trying Redis) and log a warning.
Needs Redis >= 6.2 (``SET ... GET``). Must run under gevent with sockets
monkey-patched.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import Iterable, Optional

import gevent
import orjson
import redis
from gevent.event import Event as GEvent
from hiredis import pack_command

from imd.envelope import dumps_kept

from .base import ALL, Engine, Event, user_channel

log = logging.getLogger("imd.engine.redis")

SUB_BATCH = 1000            # channels per SUBSCRIBE / UNSUBSCRIBE command
PUB_BATCH = 2000            # publications per pipelined write
WRITE_BATCH = 1000          # per-node record writes per pipeline
BACKOFF_MIN, BACKOFF_MAX = 0.1, 5.0
PING_INTERVAL = 5.0         # keepalive on the pub/sub connection while idle
READ_DEAD_AFTER = 3 * PING_INTERVAL + 5.0
RESYNC_MARK = b"imd-resync"
ORDERED_TAG = b"- "         # publications every node (the publisher too) takes from Redis
WAIT_MAX = 30.0             # an ``applied`` callback gets False after this long
READ_PAUSE = 1.0            # after a failed read, answer from memory for this long


class _Records:
    """This node's records of one kind (presence or channel counts): the values
    it holds, and the keys that still have to be written to Redis. (Values are
    not shared between keys: a presence record names its user's devices.)"""

    __slots__ = ("hash_prefix", "index_key", "values", "dirty")

    def __init__(self, hash_prefix: str, index_key: str) -> None:
        self.hash_prefix = hash_prefix      # e.g. "imd:p:"
        self.index_key = index_key          # e.g. "imd:nu:<node>"
        self.values: dict[str, bytes] = {}
        self.dirty: set[str] = set()

    def set(self, key: str, value: Optional[bytes]) -> None:
        if value is None:
            if self.values.pop(key, None) is None and key not in self.dirty:
                return
        else:
            if self.values.get(key) == value:
                return
            self.values[key] = value
        self.dirty.add(key)


class RedisEngine(Engine):
    name = "redis"

    def __init__(self, url: str, presence_ttl: float = 30, prefix: str = "imd:",
                 max_queue_bytes: int = 256 << 20) -> None:
        self.url = url
        self.presence_ttl = float(presence_ttl)
        self.tick_interval = self.presence_ttl / 4
        self.prefix = prefix
        self.max_queue_bytes = max_queue_bytes
        self.node_id = ""
        self._handler = None
        self._pool = redis.ConnectionPool.from_url(url, protocol=2, socket_connect_timeout=3,
                                                   socket_timeout=10, max_connections=32)
        self._cmd = redis.Redis(connection_pool=self._pool)
        self._prefix_b = prefix.encode()
        # bus
        self._subs: set[str] = set()        # channels the node wants, but users'
        self._users: dict[str, None] = {}   # users whose channel (u:<user>) the node wants (a dict: smaller than a set)
        self._sub_dirty: set[str] = set()   # channels whose wish changed since sent
        self._subscribed = 0                # channels subscribed on the connection (Redis's count)
        self._sub_wake = GEvent()
        self._pubq: deque = deque()         # packed PUBLISH commands
        self._pubq_bytes = 0
        self._pub_wake = GEvent()
        self._local: deque = deque()
        self._local_scheduled = False
        self._ps_conn = None
        self._last_rx = 0.0
        self._resync_pending = False
        # per-node records
        self._presence: Optional[_Records] = None
        self._counts: Optional[_Records] = None
        self._write_wake = GEvent()
        self._first_tick_done = GEvent()
        self._known_nodes: list[str] = []
        self._reads_paused_until = 0.0
        self._waiting: dict[int, tuple] = {}    # n → (applied callback, monotonic time)
        self._waiting_n = 0
        self._greenlets: list = []
        self._running = False
        # counters for state()
        self.connected = False
        self.publisher_connected = False
        self.published = self.received = self.echoes = self.dropped = 0
        self.reconnects = 0
        self.reaped_nodes = 0

    # -- lifecycle ----------------------------------------------------------------
    def start(self, node_id: str, handler) -> None:
        """Start the reader, subscriber, publisher, writer and tick greenlets (never blocks)."""
        self.node_id = node_id
        self._tag = node_id.encode() + b" "
        self._handler = handler
        self._presence = _Records(self.prefix + "p:", self._key("nu:" + node_id))
        self._counts = _Records(self.prefix + "cc:", self._key("nc:" + node_id))
        self._running = True
        self._greenlets = [gevent.spawn(self._pubsub_loop), gevent.spawn(self._publish_loop),
                           gevent.spawn(self._write_loop), gevent.spawn(self._tick_loop)]

    def stop(self) -> None:
        """Flush queued publications and records (bounded wait), drop this node's
        liveness key so that another node reaps its records at its next tick (and
        presence announces its users offline), or, when it holds no records, remove
        every trace of it; close the connections."""
        if not self._running:
            return
        deadline = time.monotonic() + 2.0
        while (self._pubq or self._presence.dirty or self._counts.dirty) and time.monotonic() < deadline:
            gevent.sleep(0.02)
        self._running = False
        gevent.killall(self._greenlets, block=True, timeout=2)
        self._handler = None
        try:
            if self._presence.values or self._counts.values:
                self._cmd.delete(self._key("n:" + self.node_id))
            else:                       # nothing for another node to announce: leave no trace
                self._remove_node_records(self.node_id)
        except redis.RedisError as e:
            log.warning("could not drop this node's liveness key on stop: %s", e)
        self._pool.disconnect()

    def _connection(self, **overrides):
        """A dedicated connection (pub/sub, publisher), outside the command pool."""
        kwargs = dict(self._pool.connection_kwargs)
        kwargs.update(overrides)
        return self._pool.connection_class(**kwargs)

    def _key(self, name: str) -> str:
        return self.prefix + name

    # -- bus: subscriptions ----------------------------------------------------------
    def subscribe(self, channel: str) -> None:
        if not self.subscribed(channel):
            self._subs.add(channel)
            self._changed(channel)

    def unsubscribe(self, channel: str) -> None:
        if self.subscribed(channel):
            self._subs.discard(channel)
            if channel.startswith("u:"):
                self._users.pop(channel[2:], None)
            self._changed(channel)

    def subscribe_user(self, user: str) -> None:
        if user not in self._users:
            self._users[user] = None
            self._changed(user_channel(user))

    def unsubscribe_user(self, user: str) -> None:
        self.unsubscribe(user_channel(user))

    def subscribed(self, channel: str) -> bool:
        return channel in self._subs or (channel.startswith("u:") and channel[2:] in self._users)

    def _changed(self, channel: str) -> None:
        self._sub_dirty.add(channel)
        self._sub_wake.set()

    def _pubsub_loop(self) -> None:
        """Own the pub/sub connection: connect, re-subscribe, read; on loss, back off."""
        backoff = BACKOFF_MIN
        ever = False
        while self._running:
            conn = self._connection(socket_timeout=None, client_name=f"imd:{self.node_id}:pubsub")
            try:
                conn.connect()
            except redis.RedisError as e:
                log.warning("redis pub/sub connect failed url=%s error=%s retry_in=%.1fs", self.url, e, backoff)
                gevent.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)
                continue
            backoff = BACKOFF_MIN
            if ever:
                self.reconnects += 1
                log.info("redis pub/sub reconnected channels=%d", len(self._subs))
            self._ps_conn = conn
            self._subscribed = 0
            self._sub_dirty = self._subs | {user_channel(u) for u in self._users}
            # After a reconnect, or a first connection made while sessions were already
            # attached (Redis was down at start), publications may have been missed.
            self._resync_pending = ever or bool(self._subs)
            self._last_rx = time.monotonic()
            self.connected = True
            sender = gevent.spawn(self._send_subscriptions, conn)
            try:
                self._read(conn)
            except (redis.RedisError, OSError) as e:
                if self._running:
                    log.warning("redis pub/sub connection lost: %s", e)
            except Exception:
                log.exception("redis pub/sub reader failed")
            finally:
                self.connected = False
                self._ps_conn = None
                sender.kill(block=False)
                conn.disconnect()
            ever = True

    def _send_subscriptions(self, conn) -> None:
        """Send the subscription changes in batches; keep the connection alive."""
        wire = self._prefix_b
        try:
            while True:
                if not self._sub_dirty:
                    if self._resync_pending:
                        conn.send_command("PING", RESYNC_MARK)
                        self._resync_pending = False
                    self._sub_wake.clear()
                    if not self._sub_wake.wait(PING_INTERVAL):
                        if time.monotonic() - self._last_rx > READ_DEAD_AFTER:
                            log.warning("redis pub/sub silent for %.0fs: dropping the connection",
                                        time.monotonic() - self._last_rx)
                            conn.disconnect()
                            return
                        conn.send_command("PING")
                    continue
                dirty, wanted = self._sub_dirty, self.subscribed
                add, remove = [], []
                for _ in range(min(SUB_BATCH, len(dirty))):
                    ch = dirty.pop()
                    (add if wanted(ch) else remove).append(ch)
                cmds = []
                if add:
                    cmds.append(pack_command((b"SUBSCRIBE",) + tuple(wire + ch.encode() for ch in add)))
                if remove:
                    cmds.append(pack_command((b"UNSUBSCRIBE",) + tuple(wire + ch.encode() for ch in remove)))
                if cmds:
                    conn.send_packed_command(cmds, check_health=False)
                gevent.sleep(0)
        except (redis.RedisError, OSError) as e:
            log.warning("redis subscribe failed: %s", e)
            conn.disconnect()
        except Exception:
            log.exception("redis subscriber failed: dropping the connection")
            conn.disconnect()

    def _read(self, conn) -> None:
        """Read pub/sub messages until the connection fails (raises then)."""
        cut = len(self._prefix_b)
        tag = self._tag
        wait_tag = b"-" + tag[:-1] + b":"
        while self._running:
            reply = conn.read_response(disconnect_on_error=False)
            self._last_rx = time.monotonic()
            kind = reply[0]
            if kind == b"message":
                self.received += 1
                raw = reply[2]
                if raw.startswith(tag):
                    self.echoes += 1            # our own publication: delivered locally already
                    continue
                try:
                    space = raw.index(b" ")
                    event = Event.decode(raw[space + 1:])
                except (ValueError, KeyError, TypeError):
                    log.warning("undecodable bus message on %r", reply[1])
                    continue
                waiter = None
                if raw.startswith(wait_tag):
                    waiter = self._waiting.pop(int(raw[len(wait_tag):space]), None)
                channel = reply[1][cut:].decode()
                handler = self._handler
                if handler is not None and self.subscribed(channel):
                    handler(channel, event)
                if waiter is not None:
                    waiter[0](True)
            elif kind == b"subscribe" or kind == b"unsubscribe":
                self._subscribed = reply[2]
            elif kind == b"pong" and len(reply) > 1 and reply[1] == RESYNC_MARK:
                log.info("redis pub/sub resubscribed channels=%d: resync", self._subscribed)
                self._emit(Event("resync", {}, self.node_id))

    def _emit(self, event: Event) -> None:
        """Hand a locally made event (resync, nodes_lost, presence_restore) to the handler."""
        handler = self._handler
        if handler is not None:
            try:
                handler(ALL, event)
            except Exception:
                log.exception("handler failed on %s", event.kind)

    # -- bus: publishing ---------------------------------------------------------------
    def publish(self, channel: str, event: Event, applied=None) -> None:
        """Deliver locally (if subscribed here) and queue the packed PUBLISH command;
        only bytes wait in the queue (~0.3 KB each for an inbox entry)."""
        if not event.origin:
            event.origin = self.node_id
        self.published += 1
        if channel.startswith("u:"):
            tag = self._tag
            if channel[2:] in self._users or channel in self._subs or applied is not None:
                self._local.append((channel, event, applied))
                if not self._local_scheduled:
                    self._local_scheduled = True
                    gevent.get_hub().loop.run_callback(self._deliver_local)
        elif applied is None:
            tag = ORDERED_TAG
        elif not self.subscribed(channel):
            tag = ORDERED_TAG
            gevent.get_hub().loop.run_callback(applied, True)
        else:
            # an ordered publication someone waits for: numbered, recognised when it comes back
            self._waiting_n += 1
            self._waiting[self._waiting_n] = (applied, time.monotonic())
            tag = b"-%s:%d " % (self._tag[:-1], self._waiting_n)
        cmd = pack_command((b"PUBLISH", self._prefix_b + channel.encode(), tag + event.encode()))
        self._pubq.append(cmd)
        self._pubq_bytes += len(cmd)
        if self._pubq_bytes > self.max_queue_bytes:
            self._shed()
        self._pub_wake.set()

    def _shed(self) -> None:
        """The queue is over its byte limit: drop the oldest publications."""
        q = self._pubq
        while self._pubq_bytes > self.max_queue_bytes and q:
            self._pubq_bytes -= len(q.popleft())
            self.dropped += 1

    def _deliver_local(self) -> None:
        self._local_scheduled = False
        q, subscribed = self._local, self.subscribed
        while q and self._handler is not None:
            channel, event, applied = q.popleft()
            if subscribed(channel):
                self._handler(channel, event)
            if applied is not None:
                applied(True)

    def _publish_loop(self) -> None:
        backoff = BACKOFF_MIN
        conn = None
        q = self._pubq
        while self._running:
            if not q:
                self._pub_wake.clear()
                self._pub_wake.wait()
                continue
            if conn is None:
                conn = self._connection(client_name=f"imd:{self.node_id}:publish")
                try:
                    conn.connect()
                    self.publisher_connected = True
                    backoff = BACKOFF_MIN
                except redis.RedisError as e:
                    log.warning("redis publisher connect failed error=%s queued=%d", e, len(q))
                    conn = None
                    gevent.sleep(backoff)
                    backoff = min(backoff * 2, BACKOFF_MAX)
                    continue
            batch = [q.popleft() for _ in range(min(PUB_BATCH, len(q)))]
            size = sum(map(len, batch))
            self._pubq_bytes -= size
            try:
                conn.send_packed_command([b"".join(batch)], check_health=False)
                for _ in batch:
                    conn.read_response()
            except Exception as e:
                # Not knowing what Redis got, publish the batch again: a duplicate
                # carries the same seq and is dropped by the session.
                if isinstance(e, (redis.RedisError, OSError)):
                    log.warning("redis publish failed: %s; requeued=%d", e, len(batch))
                else:
                    log.exception("redis publisher failed; requeued=%d", len(batch))
                    gevent.sleep(backoff)
                    backoff = min(backoff * 2, BACKOFF_MAX)
                q.extendleft(reversed(batch))
                self._pubq_bytes += size
                self._shed()
                conn.disconnect()
                conn = None
                self.publisher_connected = False

    # -- per-node records -------------------------------------------------------------------
    def presence_set(self, user: str, state: Optional[dict]) -> None:
        """Record (None: remove) this node's presence for ``user``; never blocks,
        written to Redis by the writer greenlet, visible to this node's reads at once.
        The record kept is a right-sized copy of orjson's output (:func:`imd.envelope.dumps_kept`)."""
        self._presence.set(user, None if state is None else dumps_kept(state))
        self._write_wake.set()

    def presence_get(self, users: Iterable[str]) -> dict[str, list[dict]]:
        users = list(users)
        out = {u: [] for u in users}
        for u, node, raw in self._read_records(self._presence, users):
            rec = orjson.loads(raw)
            rec["node"] = node
            out[u].append(rec)
        return out

    def channel_count_set(self, cname: str, count: int) -> None:
        """Record how many local subscribers comet channel ``cname`` has here (0 removes)."""
        self._counts.set(cname, str(count).encode() if count > 0 else None)
        self._write_wake.set()

    def channel_counts(self, cnames: Iterable[str]) -> dict[str, int]:
        cnames = list(cnames)
        out = dict.fromkeys(cnames, 0)
        for c, _node, raw in self._read_records(self._counts, cnames):
            out[c] += int(raw)
        return out

    def _read_records(self, recs: _Records, keys: list):
        """(key, node, value) for the live records of ``keys``: this node's from
        memory, the others' from Redis (one pipelined round trip)."""
        me = self.node_id
        found = []
        for k in keys:
            v = recs.values.get(k)
            if v is not None:
                found.append((k, me, v))
        if not keys:
            return found
        known = [n for n in self._known_nodes if n != me]
        if time.monotonic() < self._reads_paused_until:
            return found
        try:
            pipe = self._cmd.pipeline(transaction=False)
            for k in keys:
                pipe.hgetall(recs.hash_prefix + k)
            if known:
                pipe.mget([self._key("n:" + n) for n in known])
            res = pipe.execute()
        except redis.RedisError as e:
            # Don't make every caller wait for a connect timeout while Redis is away.
            self._reads_paused_until = time.monotonic() + READ_PAUSE
            log.warning("redis unavailable for a read (%s): answering from this node only for %.0fs",
                        e, READ_PAUSE)
            return found
        dead = set()
        if known:
            dead = {n for n, alive in zip(known, res[-1]) if alive is None}
        for k, fields in zip(keys, res):
            for node_b, v in fields.items():
                node = node_b.decode()
                if node != me and node not in dead:
                    found.append((k, node, v))
        return found

    def _write_loop(self) -> None:
        """Write dirty records to Redis in pipelined batches; retry after errors."""
        backoff = BACKOFF_MIN
        me = self.node_id
        self._first_tick_done.wait()
        while self._running:
            if not (self._presence.dirty or self._counts.dirty):
                self._write_wake.clear()
                self._write_wake.wait()
                continue
            try:
                for recs in (self._presence, self._counts):
                    while recs.dirty:
                        keys = [recs.dirty.pop() for _ in range(min(WRITE_BATCH, len(recs.dirty)))]
                        try:
                            self._write_records(recs, keys, me)
                        except BaseException:
                            recs.dirty.update(keys)
                            raise
                backoff = BACKOFF_MIN
            except redis.RedisError as e:
                log.warning("redis record write failed: %s; retry in %.1fs", e, backoff)
                gevent.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)

    def _write_records(self, recs: _Records, keys: list, me: str) -> None:
        pipe = self._cmd.pipeline(transaction=False)
        added, removed = [], []
        for k in keys:
            v = recs.values.get(k)
            if v is None:
                pipe.hdel(recs.hash_prefix + k, me)
                removed.append(k)
            else:
                pipe.hset(recs.hash_prefix + k, me, v)
                added.append(k)
        if added:
            pipe.sadd(recs.index_key, *added)
        if removed:
            pipe.srem(recs.index_key, *removed)
        pipe.sadd(self._key("nodes"), me)
        pipe.execute()

    # -- liveness and reaping ------------------------------------------------------------------
    def _tick_loop(self) -> None:
        while self._running:
            try:
                if not self._first_tick_done.is_set():
                    # Records left by an earlier process with this node id (a worker
                    # restarted after a crash) are stale: remove them, and let presence
                    # announce those users offline unless they are back.
                    stale = self._remove_node_records(self.node_id)
                    self._cmd.delete(self._key("reaped:" + self.node_id))
                    if stale:
                        log.warning("removed stale records of an earlier %s users=%d", self.node_id, len(stale))
                        self._emit(Event("nodes_lost", {"nodes": [self.node_id], "users": stale}, self.node_id))
                self._tick()
                self._first_tick_done.set()
            except redis.RedisError as e:
                log.warning("redis liveness tick failed: %s", e)
            gevent.sleep(self.tick_interval)

    def _expire_waiters(self) -> None:
        """Publications waited for that never came back (dropped, Redis lost them)."""
        limit = time.monotonic() - WAIT_MAX
        for n, (applied, t) in list(self._waiting.items()):
            if t < limit:
                del self._waiting[n]
                applied(False)

    def _tick(self) -> None:
        self._expire_waiters()
        me = self.node_id
        live_ms = int(self.presence_ttl * 750)
        pipe = self._cmd.pipeline(transaction=False)
        pipe.set(self._key("n:" + me), b"1", px=live_ms, get=True)
        pipe.sadd(self._key("nodes"), me)
        pipe.smembers(self._key("nodes"))
        pipe.get(self._key("reaped:" + me))
        was, _, nodes, reaped = pipe.execute()
        if was is None:
            self._rewrite_all(reaped is not None)
        others = sorted(n.decode() for n in nodes if n.decode() != me)
        self._known_nodes = others
        if not others:
            return
        alive = self._cmd.mget([self._key("n:" + n) for n in others])
        for node, a in zip(others, alive):
            if a is None:
                self._reap(node)

    def _rewrite_all(self, reaped: bool) -> None:
        """Our liveness key was missing: write every record again."""
        users = list(self._presence.values)
        if users or self._counts.values:
            log.info("redis records of this node missing (%s): rewriting users=%d channels=%d",
                     "reaped by another node" if reaped else "new node or Redis lost its data",
                     len(users), len(self._counts.values))
        self._presence.dirty.update(users)
        self._counts.dirty.update(self._counts.values)
        self._write_wake.set()
        if reaped:
            self._cmd.delete(self._key("reaped:" + self.node_id))
            if users:
                self._emit(Event("presence_restore", {"users": users}, self.node_id))

    def _reap(self, node: str) -> None:
        """Remove a dead node's records (one live node wins the right to) and tell
        the local handler which users lost a presence record."""
        if not self._cmd.set(self._key("reap:" + node), self.node_id, nx=True, ex=30):
            return
        users = self._remove_node_records(node)
        self._cmd.set(self._key("reaped:" + node), b"1", ex=86400)
        self.reaped_nodes += 1
        log.warning("node %s is gone (no liveness for %.0fs): removed its records users=%d",
                    node, self.presence_ttl * 0.75, len(users))
        if users:
            self._emit(Event("nodes_lost", {"nodes": [node], "users": users}, self.node_id))

    def _remove_node_records(self, node: str) -> list:
        """Delete every record of ``node``; returns the users it had (blocks)."""
        users_key, counts_key = self._key("nu:" + node), self._key("nc:" + node)
        users = [u.decode() for u in self._cmd.smembers(users_key)]
        cnames = [c.decode() for c in self._cmd.smembers(counts_key)]
        for prefix, keys in ((self.prefix + "p:", users), (self.prefix + "cc:", cnames)):
            for i in range(0, len(keys), WRITE_BATCH):
                pipe = self._cmd.pipeline(transaction=False)
                for k in keys[i:i + WRITE_BATCH]:
                    pipe.hdel(prefix + k, node)
                pipe.execute()
        self._cmd.delete(users_key, counts_key, self._key("n:" + node))
        self._cmd.srem(self._key("nodes"), node)
        return users

    # -- status -----------------------------------------------------------------------------------
    def state(self) -> dict:
        return {"backend": self.name, "connected": self.connected,
                "publisher_connected": self.publisher_connected,
                "channels": len(self._subs) + len(self._users), "subscribed": self._subscribed,
                "pending_subscriptions": len(self._sub_dirty), "publish_queue": len(self._pubq),
                "publish_queue_bytes": self._pubq_bytes,
                "published": self.published, "received": self.received, "echoes": self.echoes,
                "dropped": self.dropped, "reconnects": self.reconnects,
                "presence_records": len(self._presence.values) if self._presence else 0,
                "records_unwritten": (len(self._presence.dirty) + len(self._counts.dirty))
                if self._presence else 0,
                "nodes": len(self._known_nodes) + 1, "reaped_nodes": self.reaped_nodes}
