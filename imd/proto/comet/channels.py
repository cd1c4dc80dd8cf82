"""The iComet channel model: channels, subscribers, tokens, presence. No I/O.

This is iComet's ``Server``/``Channel``/``Subscriber`` logic (ideawu/icomet
``src/comet/*.cpp``) as plain objects, so it can be tested without sockets.
The transports (imd/proto/comet/front.py) subclass :class:`Subscriber` and
turn pushed :class:`Message` batches into bytes; the admin port calls
:class:`Registry` for ``/pub /push /broadcast /sign /close /clear /info
/check /psub``.

Semantics kept from iComet: a channel's seq starts at 1 and counts ``data``
and ``broadcast`` messages; a subscriber asking for seq 0 or a seq in the
future gets ``next_seq``; otherwise it gets the buffered messages with
``seq >= `` its seq; ``noop`` after ``polling_timeout`` idle seconds with its
own counter; a long-poll subscriber is done after one batch; a broadcast is
followed by ``next_seq`` (iComet's compatibility quirk); the buffer is
trimmed to ``channel_buffer_size`` once it reaches 1.5 times that; a channel
with no subscriber is freed ``channel_timeout`` seconds after its last use.

Deliberate differences (each documented in docs/icomet.md): tokens are
``secrets.token_hex(16)`` and expire; presence follows subscribers (first
arrives → online, last leaves and none returns within ``presence_grace`` →
offline) instead of channel objects; a new ``/psub`` listener first gets the
channels currently online instead of periodic re-announcements.

Threading: everything here runs in the gevent hub and never blocks; it is
not greenlet-safe across blocking calls (there are none). ``sweep`` is
called by one periodic timer (once a second), never by a timer per channel.
"""

from __future__ import annotations

import hmac
import secrets
import time
from typing import Callable, Dict, List, Optional

SEQ_MASK = 0xFFFFFFFF
MAX_CNAME = 128
MAX_SIGN_EXPIRES = 86400


def seq_gt(a: int, b: int) -> bool:
    """iComet's wrap-safe ``SEQ_GT`` on 32-bit seqs: ``a - b > 0``."""
    d = (a - b) & SEQ_MASK
    return d != 0 and d < 0x80000000


def valid_cname(cname: str) -> bool:
    """1–128 printable characters, no whitespace (our fix: iComet takes any bytes,
    which lets a channel name forge ``/psub`` lines)."""
    return (0 < len(cname) <= MAX_CNAME and cname.isprintable()
            and not any(c.isspace() for c in cname))


class Refused(Exception):
    """A subscribe or create that iComet answers in-band: ``kind`` is the message
    type (``"401"`` or ``"429"``), ``reason`` its content."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


class Message:
    """One message as subscribers see it; encoded lazily, once, per format
    (``_cache`` maps a format key to bytes; see formats.py)."""

    __slots__ = ("type", "cname", "seq", "content", "_cache")

    def __init__(self, type: str, cname: str, seq: int, content: str = "") -> None:
        self.type = type
        self.cname = cname
        self.seq = seq
        self.content = content
        self._cache: Optional[dict] = None

    def encoded(self, key: str, make: Callable[["Message"], bytes]) -> bytes:
        """``make(self)`` computed once per ``key`` and kept with the message."""
        cache = self._cache
        if cache is None:
            cache = self._cache = {}
        data = cache.get(key)
        if data is None:
            data = cache[key] = make(self)
        return data

    def __repr__(self) -> str:
        return f"Message({self.type!r}, {self.cname!r}, {self.seq}, {self.content!r})"


class Subscriber:
    """One subscriber connection as the model sees it. Transports subclass it.

    ``push(msgs, array)`` delivers a batch (``array`` is True where iComet
    frames a long-poll batch as a JSON array: backlogs and broadcasts);
    ``end()`` is called when the model drops the subscriber on its own
    (long-poll answered, channel closed or expired): the transport then ends
    the response. When the client goes away the transport calls
    :meth:`Registry.unsubscribe` instead, and ``end`` is not called.
    Both run in the hub and must not block.
    """

    __slots__ = ("channel", "seq_next", "seq_noop", "idle_until")
    oneshot = False          # True for long-poll: done after the first batch

    def __init__(self, seq: int = 0, noop: int = 0) -> None:
        self.channel: Optional[Channel] = None
        self.seq_next = seq & SEQ_MASK
        self.seq_noop = noop & SEQ_MASK
        self.idle_until = 0.0

    def push(self, msgs: List[Message], array: bool = False) -> None:
        raise NotImplementedError

    def end(self) -> None:
        raise NotImplementedError


class Channel:
    """A named channel: seq counter, bounded buffer, subscribers, token, deadline."""

    __slots__ = ("name", "seq_next", "buffer", "subs", "expires_at", "tokens", "online",
                 "vacant_since")

    def __init__(self, name: str, expires_at: float) -> None:
        self.name = name
        self.seq_next = 1
        self.buffer: List[Message] = []
        self.subs: List[Subscriber] = []         # few (max_subscribers_per_channel)
        self.expires_at = expires_at             # freed at this time if still vacant
        self.tokens: Optional[Dict[str, float]] = None   # /sign tokens → valid until
        self.online = False                      # as last reported to /psub
        self.vacant_since = 0.0

    def seq_min(self) -> int:
        """Oldest seq still buffered, or ``seq_next`` (``/sign``'s ``seq``; iComet
        hard-codes 10 here, we use the real buffer)."""
        return self.buffer[0].seq if self.buffer else self.seq_next


class Registry:
    """All channels of this node plus ``/psub`` listeners.

    ``clock`` returns seconds (monotonic); tests pass their own.
    """

    def __init__(self, *, auth: str = "none", max_channels: int = 100000,
                 max_subscribers_per_channel: int = 16, channel_buffer_size: int = 10,
                 channel_timeout: float = 30, polling_timeout: float = 30,
                 presence_grace: float = 5,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.configure(auth=auth, max_channels=max_channels,
                       max_subscribers_per_channel=max_subscribers_per_channel,
                       channel_buffer_size=channel_buffer_size, channel_timeout=channel_timeout,
                       polling_timeout=polling_timeout, presence_grace=presence_grace)
        self.clock = clock
        self.channels: Dict[str, Channel] = {}
        self.subscribers = 0
        self.listeners: Dict[object, None] = {}     # /psub: objects with presence(online, cname)
        self._vacant: Dict[Channel, None] = {}      # channels with no subscriber
        self._noop_wheel: Dict[int, List[Subscriber]] = {}
        self._wheel_tick = int(clock())

    def configure(self, *, auth: str, max_channels: int, max_subscribers_per_channel: int,
                  channel_buffer_size: int, channel_timeout: float, polling_timeout: float,
                  presence_grace: float) -> None:
        """Set the options (at start, and again on a config reload: they apply to
        what happens next; existing buffers are trimmed by their next message)."""
        if auth not in ("none", "token"):
            raise ValueError("comet.auth must be 'none' or 'token'")
        if polling_timeout <= 0:
            raise ValueError("comet.polling_timeout must be > 0")
        self.auth = auth
        self.max_channels = max_channels
        self.max_subs = max_subscribers_per_channel
        self.buffer_size = max(1, channel_buffer_size)
        self.channel_timeout = channel_timeout if channel_timeout > 0 else polling_timeout / 2
        self.polling_timeout = polling_timeout
        self.presence_grace = presence_grace

    # -- channels ---------------------------------------------------------

    def get(self, cname: str) -> Optional[Channel]:
        return self.channels.get(cname)

    def create(self, cname: str, ttl: Optional[float] = None) -> Channel:
        """The channel ``cname``, created (vacant, alive ``ttl`` or
        ``channel_timeout`` seconds) if missing. Raises Refused 429."""
        ch = self.channels.get(cname)
        if ch is not None:
            return ch
        if len(self.channels) >= self.max_channels:
            raise Refused("429", "Too many channels")
        now = self.clock()
        ch = Channel(cname, now + (self.channel_timeout if ttl is None else ttl))
        ch.vacant_since = now
        self.channels[cname] = ch
        self._vacant[ch] = None
        return ch

    def _free(self, ch: Channel) -> None:
        """Drop a channel: its subscribers are ended, presence goes offline."""
        del self.channels[ch.name]
        for sub in list(ch.subs):
            self._detach(sub)
            sub.end()
        self._vacant.pop(ch, None)
        self._announce(ch, False)

    def _keep(self, ch: Channel, seconds: float) -> None:
        ch.expires_at = max(ch.expires_at, self.clock() + seconds)

    # -- publishing -------------------------------------------------------

    def publish(self, cname: str, content: str, type: str = "data") -> Channel:
        """``/pub`` and ``/push``: create the channel if needed, append, deliver."""
        ch = self.create(cname)
        self._keep(ch, self.channel_timeout)
        self._send(ch, type, content)
        return ch

    def broadcast(self, content: str) -> int:
        """``/broadcast``: one ``broadcast`` message in every channel; returns the count."""
        chans = list(self.channels.values())
        for ch in chans:
            self._keep(ch, self.channel_timeout)
            self._send(ch, "broadcast", content)
        return len(chans)

    def _send(self, ch: Channel, type: str, content: str) -> Message:
        msg = Message(type, ch.name, ch.seq_next, content)
        counted = type == "data" or type == "broadcast"
        if counted:
            ch.buffer.append(msg)
            ch.seq_next = (ch.seq_next + 1) & SEQ_MASK
            if len(ch.buffer) >= self.buffer_size * 1.5:
                del ch.buffer[:-self.buffer_size]
        if ch.subs:
            follow = (Message("next_seq", ch.name, ch.seq_next),) if type == "broadcast" else ()
            batch = [msg, *follow]
            idle_until = self.clock() + self.polling_timeout
            array, seq_next = bool(follow), ch.seq_next
            for sub in list(ch.subs):        # _deliver, inlined: this loop is the fan-out
                if counted:
                    sub.seq_next = seq_next
                sub.idle_until = idle_until
                sub.push(batch, array)
                if sub.oneshot and sub.channel is not None:
                    self._detach(sub)
                    sub.end()
        return msg

    def _deliver(self, sub: Subscriber, batch: List[Message], array: bool) -> None:
        sub.idle_until = self.clock() + self.polling_timeout
        sub.push(batch, array)
        if sub.oneshot and sub.channel is not None:
            self._detach(sub)
            sub.end()

    # -- subscribers ------------------------------------------------------

    def subscribe(self, cname: str, sub: Subscriber, token: str = "") -> Channel:
        """Attach ``sub`` (iComet ``Server::sub`` + ``Subscriber::start``).

        Raises Refused("429"/"401") before attaching; then pushes ``next_seq``
        or the backlog (a long-poll subscriber may be ended right away).
        """
        ch = self.channels.get(cname)
        if ch is None and self.auth == "none":
            ch = self.create(cname)
        if ch is None or (self.auth == "token" and not self._token_ok(ch, token)):
            raise Refused("401", "Token error")
        if len(ch.subs) >= self.max_subs:
            raise Refused("429", "Too many subscribers")
        now = self.clock()
        ch.subs.append(sub)
        sub.channel = ch
        self.subscribers += 1
        self._vacant.pop(ch, None)
        self._announce(ch, True)
        sub.idle_until = now + self.polling_timeout
        self._schedule(sub, sub.idle_until)
        if ch.tokens and token in ch.tokens:
            ch.tokens[token] = max(ch.tokens[token], now + self.channel_timeout)
        if sub.seq_next == 0 or seq_gt(sub.seq_next, ch.seq_next):
            sub.seq_next = ch.seq_next
            self._deliver(sub, [Message("next_seq", ch.name, ch.seq_next)], False)
        elif ch.buffer and sub.seq_next != ch.seq_next:
            self._backlog(ch, sub)
        return ch

    def _backlog(self, ch: Channel, sub: Subscriber) -> None:
        start = sub.seq_next
        msgs = [m for m in ch.buffer if not seq_gt(start, m.seq)]
        if not msgs:
            return
        if sub.oneshot:
            batch: List[Message] = []
            for m in msgs:
                batch.append(m)
                if m.type == "broadcast":
                    batch.append(Message("next_seq", ch.name, (m.seq + 1) & SEQ_MASK))
            sub.seq_next = (msgs[-1].seq + 1) & SEQ_MASK
            self._deliver(sub, batch, True)
            return
        for m in msgs:
            sub.seq_next = (m.seq + 1) & SEQ_MASK
            if m.type == "broadcast":
                self._deliver(sub, [m, Message("next_seq", ch.name, sub.seq_next)], True)
            else:
                self._deliver(sub, [m], False)

    def unsubscribe(self, sub: Subscriber) -> None:
        """The client went away (or the transport gave up on it). Idempotent."""
        if sub.channel is not None:
            self._detach(sub)

    def _detach(self, sub: Subscriber) -> None:
        ch = sub.channel
        sub.channel = None
        ch.subs.remove(sub)
        self.subscribers -= 1
        if not ch.subs:
            now = self.clock()
            ch.vacant_since = now
            ch.expires_at = max(ch.expires_at, now + self.channel_timeout)
            self._vacant[ch] = None

    # -- admin operations ---------------------------------------------------

    def close(self, cname: str) -> Optional[int]:
        """``/close``: ``close`` to every subscriber, end them, free the channel.
        Returns the channel's seq_next, or None if there is no such channel."""
        ch = self.channels.get(cname)
        if ch is None:
            return None
        seq = ch.seq_next
        closing = Message("close", ch.name, seq)
        for sub in list(ch.subs):
            sub.push([closing], False)
        self._free(ch)
        return seq

    def clear(self, cname: str) -> Optional[int]:
        """``/clear``: empty the buffer, keep seq_next. None if no such channel."""
        ch = self.channels.get(cname)
        if ch is None:
            return None
        ch.buffer.clear()
        return ch.seq_next

    def info(self, cname: str = "") -> dict:
        """``/info``: totals, or one channel's subscriber count (0 if missing)."""
        if cname:
            ch = self.channels.get(cname)
            return {"cname": cname, "subscribers": len(ch.subs) if ch else 0}
        return {"channels": len(self.channels), "subscribers": self.subscribers}

    def check(self, cname: str) -> bool:
        """``/check``: does the channel exist?"""
        return cname in self.channels

    # -- tokens (/sign) -------------------------------------------------------

    def sign(self, cname: str, expires: int = 0, token: Optional[str] = None) -> tuple:
        """``/sign``: create the channel if needed, keep it ``expires`` seconds
        (default ``channel_timeout``); returns ``(channel, token)``.

        Tokens are unpredictable; re-signing while a token is valid returns the
        same one (iComet: tabs of one user share it) and extends it. A token
        expires ``expires`` seconds after its last sign or ``channel_timeout``
        after its last use by a subscriber, whichever is later. ``token`` is
        given when another node signed (imd/proto/comet/bus.py): a channel may
        then hold several valid tokens. Raises Refused 429.
        """
        expires = self.sign_expiry(expires)
        ch = self.create(cname, ttl=expires)
        now = self.clock()
        tokens = ch.tokens
        if tokens:
            for t, until in list(tokens.items()):
                if until <= now:
                    del tokens[t]
        else:
            tokens = ch.tokens = {}
        if token is None:
            token = next(reversed(tokens), None) or secrets.token_hex(16)
        tokens[token] = max(tokens.get(token, 0.0), now + expires)
        ch.expires_at = now + expires
        return ch, token

    def sign_expiry(self, expires: int) -> int:
        """The ``expires`` a sign gets: the asked one, or ``channel_timeout``, at most a day."""
        if expires <= 0:
            return int(self.channel_timeout)
        return min(expires, MAX_SIGN_EXPIRES)

    def _token_ok(self, ch: Channel, token: str) -> bool:
        if not ch.tokens or not token:
            return False
        now = self.clock()
        given = token.encode("utf-8", "replace")
        ok = False
        for t, until in ch.tokens.items():
            if hmac.compare_digest(t.encode(), given) and until > now:
                ok = True
        return ok

    def keep(self, cnames) -> None:
        """Subscribers elsewhere in the cluster use these channels: keep them
        (and the tokens they hold) alive for another ``channel_timeout``."""
        until = self.clock() + self.channel_timeout
        for cname in cnames:
            ch = self.channels.get(cname)
            if ch is not None:
                ch.expires_at = max(ch.expires_at, until)

    def occupied(self) -> List[str]:
        """Names of the channels that have subscribers on this node."""
        return [name for name, ch in self.channels.items() if ch.subs]

    # -- presence (/psub) -----------------------------------------------------

    def add_listener(self, listener) -> List[str]:
        """Register a ``/psub`` listener (``presence(online, cname)``); returns the
        channels online right now, which the transport sends first."""
        self.listeners[listener] = None
        return [ch.name for ch in self.channels.values() if ch.online]

    def remove_listener(self, listener) -> None:
        self.listeners.pop(listener, None)

    def _announce(self, ch: Channel, online: bool) -> None:
        if ch.online == online:
            return
        ch.online = online
        for listener in list(self.listeners):
            listener.presence(online, ch.name)

    # -- the periodic sweep ---------------------------------------------------

    def sweep(self) -> None:
        """Run once a second: expire vacant channels, report vacant channels
        offline after ``presence_grace``, send ``noop`` to idle subscribers."""
        now = self.clock()
        for ch in list(self._vacant):
            if now >= ch.expires_at:
                self._free(ch)
            elif ch.online and now - ch.vacant_since >= self.presence_grace:
                self._announce(ch, False)
        self._noops(now)

    def _schedule(self, sub: Subscriber, when: float) -> None:
        tick = max(int(when) + 1, self._wheel_tick)
        self._noop_wheel.setdefault(tick, []).append(sub)

    def _noops(self, now: float) -> None:
        """A timing wheel of one-second slots: each subscriber sits in the slot of
        its idle deadline; a slot that comes due re-files the subscribers that
        sent something since, and sends ``noop`` to the others."""
        end = int(now)
        while self._wheel_tick <= end:
            due = self._noop_wheel.pop(self._wheel_tick, None)
            self._wheel_tick += 1
            for sub in due or ():
                ch = sub.channel
                if ch is None:
                    continue
                if sub.idle_until > now:
                    self._schedule(sub, sub.idle_until)
                    continue
                noop = Message("noop", ch.name, sub.seq_noop)
                sub.seq_noop = (sub.seq_noop + 1) & SEQ_MASK
                self._deliver(sub, [noop], False)
                if sub.channel is not None:
                    self._schedule(sub, sub.idle_until)

    def shutdown(self) -> None:
        """End every subscriber (daemon stop); channels are dropped."""
        for ch in list(self.channels.values()):
            self._free(ch)


__all__ = ["Channel", "Message", "Refused", "Registry", "Subscriber", "seq_gt",
           "valid_cname"]
