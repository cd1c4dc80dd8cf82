"""Pure-Python twin of imd/_fastpath.pyx: the same API and the same behaviour.

Used when the Cython extension is not built or ``IMD_PURE_PYTHON=1``; see
imd/fastpath.py. tests/test_fastpath.py runs every test against both. Imports
nothing of imd.

* ``FrameDecoder`` — raw-TCP frames: 4-byte big-endian length N (1 <= N <=
  max_frame), then N bytes.
* ``WSDecoder`` — server side of RFC 6455 framing: client frames, masked.
* ``ws_encode`` / ``ws_close_payload`` — server frames (FIN set, unmasked);
  ``ws_parse_close`` — a received close payload.
* ``send_many`` — one non-blocking send per (fd, data), for the per-iteration flush.

Decoders are per-connection objects: they hold no buffer while nothing is
pending. Once a decoder has raised, every later ``feed`` raises the same error
again (the connection is to be closed). Frames that precede an error in the
same ``feed`` call are not returned. Nothing here blocks; not thread-safe
(one decoder per connection, used from the hub).
"""

from __future__ import annotations

import os

__all__ = ["FrameError", "FrameDecoder", "encode_frame", "WSError", "WSDecoder", "ws_encode",
           "ws_close_payload", "ws_parse_close", "send_many"]


class FrameError(ValueError):
    """A raw-TCP framing violation: ``code`` 400 (malformed) or 413 (too large)."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(code, reason)
        self.code = code
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.code} {self.reason}"


class WSError(ValueError):
    """A WebSocket protocol violation: ``code`` is the close code to send (1002, 1007, 1009)."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(code, reason)
        self.code = code
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.code} {self.reason}"


def _take(buf, data):
    """Append ``data`` to the pending bytearray ``buf`` (or start from ``data`` as bytes,
    so that a caller's bytearray is never kept or changed)."""
    if buf is None:
        return data if type(data) is bytes else bytes(data)
    buf += data
    return buf


def _keep(data, pos):
    """What stays pending after consuming ``data[:pos]``: None or a bytearray."""
    if pos >= len(data):
        return None
    if type(data) is bytearray:
        if pos:
            del data[:pos]
        return data
    return bytearray(data[pos:])


class FrameDecoder:
    """Splits a raw-TCP byte stream into frame payloads (see module docstring)."""

    __slots__ = ("max_frame", "_buf", "_error")

    def __init__(self, max_frame: int) -> None:
        self.max_frame = max_frame
        self._buf = None
        self._error = None

    @property
    def pending(self) -> int:
        """Bytes received but not yet returned as a frame."""
        return 0 if self._buf is None else len(self._buf)

    def feed(self, data: bytes) -> list:
        """Add received bytes; return the complete frame payloads (bytes), in order."""
        if self._error is not None:
            raise FrameError(*self._error)
        data = _take(self._buf, data)
        self._buf = None
        frames = []
        view = memoryview(data)
        n = len(data)
        pos = 0
        try:
            while n - pos >= 4:
                size = int.from_bytes(view[pos:pos + 4], "big")
                if size == 0:
                    self._fail(400, "zero-length frame")
                if size > self.max_frame:
                    self._fail(413, f"frame of {size} bytes exceeds max_frame {self.max_frame}")
                end = pos + 4 + size
                if end > n:
                    break
                frames.append(view[pos + 4:end].tobytes())
                pos = end
        finally:
            view.release()
        self._buf = _keep(data, pos)
        return frames

    def _fail(self, code: int, reason: str):
        self._error = (code, reason)
        raise FrameError(code, reason)


def encode_frame(payload: bytes) -> bytes:
    """One raw-TCP frame: the 4-byte big-endian length, then ``payload``."""
    return len(payload).to_bytes(4, "big") + payload


def _unmask(payload, mask: bytes) -> bytes:
    """XOR ``payload`` with the 4-byte ``mask`` repeated: whole-buffer integer XOR."""
    n = len(payload)
    if n == 0:
        return b""
    key = (mask * ((n >> 2) + 1))[:n]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(key, "little")).to_bytes(n, "little")


_DATA_OPS = (1, 2)
_CONTROL_OPS = (8, 9, 10)


class WSDecoder:
    """Server-side RFC 6455 frame decoder (see module docstring).

    ``feed`` returns ``[(opcode, payload), ...]``: data messages reassembled
    (opcode of the first frame: 1 text, 2 binary), control frames (8 close,
    9 ping, 10 pong) as they arrive. Raises WSError on violations.
    """

    __slots__ = ("max_message", "_buf", "_msg_op", "_parts", "_msg_len", "_error")

    def __init__(self, max_message: int) -> None:
        self.max_message = max_message
        self._buf = None
        self._msg_op = 0            # opcode of the fragmented message in progress, 0 = none
        self._parts = None          # its payloads so far
        self._msg_len = 0
        self._error = None

    @property
    def pending(self) -> int:
        """Bytes received but not yet returned (partial frame plus partial message)."""
        return (0 if self._buf is None else len(self._buf)) + self._msg_len

    @property
    def idle(self) -> bool:
        """No partial frame, no message in progress, no error: a fresh decoder
        would decode the rest of the stream the same way (so it can be dropped)."""
        return self._buf is None and self._msg_op == 0 and self._error is None

    def feed(self, data: bytes) -> list:
        if self._error is not None:
            raise WSError(*self._error)
        data = _take(self._buf, data)
        self._buf = None
        out = []
        n = len(data)
        pos = 0
        while n - pos >= 2:
            b0 = data[pos]
            b1 = data[pos + 1]
            op = b0 & 0x0F
            fin = b0 & 0x80
            if b0 & 0x70:
                self._fail(1002, "reserved bits set")
            if op not in _DATA_OPS and op not in _CONTROL_OPS and op != 0:
                self._fail(1002, f"unknown opcode {op}")
            if not b1 & 0x80:
                self._fail(1002, "client frame not masked")
            size = b1 & 0x7F
            if op >= 8:
                if not fin:
                    self._fail(1002, "fragmented control frame")
                if size > 125:
                    self._fail(1002, "control frame payload over 125 bytes")
            elif op == 0:
                if not self._msg_op:
                    self._fail(1002, "continuation frame without a message")
            elif self._msg_op:
                self._fail(1002, "new data frame inside a fragmented message")
            head = 2
            if size == 126:
                if n - pos < 4:
                    break
                size = int.from_bytes(data[pos + 2:pos + 4], "big")
                head = 4
            elif size == 127:
                if n - pos < 10:
                    break
                size = int.from_bytes(data[pos + 2:pos + 10], "big")
                if size >> 63:
                    self._fail(1002, "64-bit length with the high bit set")
                head = 10
            if op < 8 and self._msg_len + size > self.max_message:
                self._fail(1009, f"message of {self._msg_len + size} bytes or more exceeds "
                                 f"max_message {self.max_message}")
            end = pos + head + 4 + size
            if end > n:
                break
            payload = _unmask(data[pos + head + 4:end], data[pos + head:pos + head + 4])
            pos = end
            if op >= 8:
                out.append((op, payload))
                continue
            if not fin:
                if op:
                    self._msg_op = op
                    self._parts = [payload]
                else:
                    self._parts.append(payload)
                self._msg_len += size
                continue
            if op == 0:
                self._parts.append(payload)
                op = self._msg_op
                payload = b"".join(self._parts)
                self._msg_op = 0
                self._parts = None
                self._msg_len = 0
            if op == 1:
                try:
                    payload.decode("utf-8")
                except UnicodeDecodeError:
                    self._fail(1007, "text message is not valid UTF-8")
            out.append((op, payload))
        self._buf = _keep(data, pos)
        return out

    def _fail(self, code: int, reason: str):
        self._error = (code, reason)
        self._parts = None
        self._buf = None
        raise WSError(code, reason)


def ws_encode(opcode: int, payload: bytes) -> bytes:
    """One server frame: FIN set, unmasked, with a 7-, 16- or 64-bit length.
    ValueError for an opcode outside 0-15 or a control payload over 125 bytes."""
    n = len(payload)
    if not 0 <= opcode <= 15:
        raise ValueError(f"bad opcode {opcode}")
    if opcode >= 8 and n > 125:
        raise ValueError("control frame payload over 125 bytes")
    if n < 126:
        head = bytes((0x80 | opcode, n))
    elif n < 65536:
        head = bytes((0x80 | opcode, 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 127)) + n.to_bytes(8, "big")
    return head + payload


def ws_close_payload(code: int, reason: str = "") -> bytes:
    """Payload of a close frame: 2-byte code, then the UTF-8 reason cut to fit 125 bytes
    (never inside a character)."""
    raw = reason.encode("utf-8")[:123].decode("utf-8", "ignore").encode("utf-8")
    return code.to_bytes(2, "big") + raw


def ws_parse_close(payload):
    """``(code, reason)`` of a received close frame's payload; ``(1005, "")`` when it is
    empty (no status). WSError 1002 for a 1-byte payload or a code a peer may not
    send (RFC 6455 §7.4), 1007 for a reason that is not UTF-8."""
    if len(payload) == 0:
        return 1005, ""
    if len(payload) == 1:
        raise WSError(1002, "close frame payload of 1 byte")
    code = int.from_bytes(payload[:2], "big")
    if not (1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999):
        raise WSError(1002, f"close code {code} is not allowed")
    try:
        return code, bytes(payload[2:]).decode("utf-8")
    except UnicodeDecodeError:
        raise WSError(1007, "close reason is not valid UTF-8") from None


def send_many(items) -> list:
    """For each ``(fd, data)``, write once without blocking; return per item the bytes
    sent or ``-errno`` (-11 EAGAIN: kernel buffer full; -32 EPIPE / -104 ECONNRESET:
    peer gone).

    This twin uses ``os.write``: the fds must be non-blocking sockets (gevent's
    always are), and a write to a dead peer raises EPIPE instead of killing the
    process only because SIGPIPE is ignored (Python ignores it at start-up, and
    imd never restores it). The Cython version calls send(2) with
    MSG_DONTWAIT|MSG_NOSIGNAL, so it needs neither.
    """
    out = []
    for fd, data in items:
        try:
            out.append(os.write(fd, data))
        except OSError as e:
            out.append(-e.errno)
    return out
