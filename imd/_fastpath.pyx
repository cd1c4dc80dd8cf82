# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Cython hot paths of imd: frame decoding, WebSocket unmasking, the flush's send loop.

The API and behaviour are exactly those of imd/_fastpath_py.py (its module
docstring is the contract; tests/test_fastpath.py runs both). Imports nothing
of imd. Nothing here blocks; decoders are per-connection and not thread-safe.
"""

from cpython.bytearray cimport (PyByteArray_AS_STRING, PyByteArray_FromStringAndSize,
                                PyByteArray_GET_SIZE)
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.errno cimport EINTR, errno
from libc.stdint cimport uint32_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy


cdef extern from "<sys/socket.h>" nogil:
    ssize_t send(int fd, const void *buf, size_t n, int flags)
    int MSG_DONTWAIT
    int MSG_NOSIGNAL


__all__ = ["FrameError", "FrameDecoder", "encode_frame", "WSError", "WSDecoder", "ws_encode",
           "ws_close_payload", "ws_parse_close", "send_many"]


class FrameError(ValueError):
    """A raw-TCP framing violation: ``code`` 400 (malformed) or 413 (too large)."""

    def __init__(self, code, reason):
        super().__init__(code, reason)
        self.code = code
        self.reason = reason

    def __str__(self):
        return f"{self.code} {self.reason}"


class WSError(ValueError):
    """A WebSocket protocol violation: ``code`` is the close code to send (1002, 1007, 1009)."""

    def __init__(self, code, reason):
        super().__init__(code, reason)
        self.code = code
        self.reason = reason

    def __str__(self):
        return f"{self.code} {self.reason}"


cdef inline object _take(object buf, object data):
    """Append ``data`` to the pending bytearray ``buf`` (or start from ``data`` as bytes)."""
    if buf is None:
        return data if type(data) is bytes else bytes(data)
    buf += data
    return buf


cdef inline const unsigned char* _ptr(object data, Py_ssize_t* n):
    """Pointer to and length of a bytes or bytearray."""
    if type(data) is bytes:
        n[0] = PyBytes_GET_SIZE(data)
        return <const unsigned char*>PyBytes_AS_STRING(data)
    n[0] = PyByteArray_GET_SIZE(data)
    return <const unsigned char*>PyByteArray_AS_STRING(data)


cdef object _keep(object data, Py_ssize_t pos, const unsigned char* p, Py_ssize_t n):
    """What stays pending after consuming ``data[:pos]``: None or a bytearray."""
    if pos >= n:
        return None
    if type(data) is bytearray:
        if pos:
            del data[:pos]
        return data
    return PyByteArray_FromStringAndSize(<const char*>p + pos, n - pos)


cdef class FrameDecoder:
    """Splits a raw-TCP byte stream into frame payloads."""

    cdef public Py_ssize_t max_frame
    cdef object _buf
    cdef object _error

    def __init__(self, Py_ssize_t max_frame):
        self.max_frame = max_frame
        self._buf = None
        self._error = None

    @property
    def pending(self):
        return 0 if self._buf is None else len(self._buf)

    def feed(self, data):
        cdef const unsigned char* p
        cdef Py_ssize_t n, pos = 0, end
        cdef uint64_t size
        if self._error is not None:
            raise FrameError(*self._error)
        data = _take(self._buf, data)
        self._buf = None
        p = _ptr(data, &n)
        frames = []
        while n - pos >= 4:
            size = ((<uint32_t>p[pos] << 24) | (<uint32_t>p[pos + 1] << 16)
                    | (<uint32_t>p[pos + 2] << 8) | <uint32_t>p[pos + 3])
            if size == 0:
                self._fail(400, "zero-length frame")
            if size > <uint64_t>self.max_frame:
                self._fail(413, f"frame of {size} bytes exceeds max_frame {self.max_frame}")
            end = pos + 4 + <Py_ssize_t>size
            if end > n:
                break
            frames.append(PyBytes_FromStringAndSize(<const char*>p + pos + 4, <Py_ssize_t>size))
            pos = end
        self._buf = _keep(data, pos, p, n)
        return frames

    cdef int _fail(self, int code, str reason) except -1:
        self._error = (code, reason)
        raise FrameError(code, reason)


def encode_frame(payload):
    """One raw-TCP frame: the 4-byte big-endian length, then ``payload``."""
    cdef Py_ssize_t n
    cdef bytes out
    cdef unsigned char* d
    if type(payload) is not bytes:
        return len(payload).to_bytes(4, "big") + payload
    n = PyBytes_GET_SIZE(payload)
    if <uint64_t>n > 0xFFFFFFFFu:
        raise OverflowError("int too big to convert")
    out = PyBytes_FromStringAndSize(NULL, n + 4)
    d = <unsigned char*>PyBytes_AS_STRING(out)
    d[0] = (n >> 24) & 0xFF
    d[1] = (n >> 16) & 0xFF
    d[2] = (n >> 8) & 0xFF
    d[3] = n & 0xFF
    memcpy(d + 4, PyBytes_AS_STRING(payload), n)
    return out


cdef bytes _unmask(const unsigned char* src, Py_ssize_t n, const unsigned char* mask):
    """XOR ``src[:n]`` with the 4-byte mask, 8 bytes at a time."""
    cdef bytes out = PyBytes_FromStringAndSize(NULL, n)
    cdef unsigned char* dst = <unsigned char*>PyBytes_AS_STRING(out)
    cdef uint32_t m32
    cdef uint64_t m64, word
    cdef Py_ssize_t i = 0
    memcpy(&m32, mask, 4)
    m64 = (<uint64_t>m32 << 32) | m32
    while i + 8 <= n:
        memcpy(&word, src + i, 8)
        word ^= m64
        memcpy(dst + i, &word, 8)
        i += 8
    while i < n:
        dst[i] = src[i] ^ mask[i & 3]
        i += 1
    return out


cdef class WSDecoder:
    """Server-side RFC 6455 frame decoder; see imd/_fastpath_py.py for the contract."""

    cdef public Py_ssize_t max_message
    cdef object _buf
    cdef int _msg_op
    cdef list _parts
    cdef Py_ssize_t _msg_len
    cdef object _error

    def __init__(self, Py_ssize_t max_message):
        self.max_message = max_message
        self._buf = None
        self._msg_op = 0
        self._parts = None
        self._msg_len = 0
        self._error = None

    @property
    def pending(self):
        return (0 if self._buf is None else len(self._buf)) + self._msg_len

    @property
    def idle(self):
        return self._buf is None and self._msg_op == 0 and self._error is None

    def feed(self, data):
        cdef const unsigned char* p
        cdef Py_ssize_t n, pos = 0, head, end, i
        cdef unsigned char b0, b1
        cdef int op, fin
        cdef uint64_t size
        if self._error is not None:
            raise WSError(*self._error)
        data = _take(self._buf, data)
        self._buf = None
        p = _ptr(data, &n)
        out = []
        while n - pos >= 2:
            b0 = p[pos]
            b1 = p[pos + 1]
            op = b0 & 0x0F
            fin = b0 & 0x80
            if b0 & 0x70:
                self._fail(1002, "reserved bits set")
            if not (op <= 2 or 8 <= op <= 10):
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
                size = (<uint64_t>p[pos + 2] << 8) | p[pos + 3]
                head = 4
            elif size == 127:
                if n - pos < 10:
                    break
                size = 0
                for i in range(8):
                    size = (size << 8) | p[pos + 2 + i]
                if size >> 63:
                    self._fail(1002, "64-bit length with the high bit set")
                head = 10
            if op < 8 and size > <uint64_t>(self.max_message - self._msg_len):
                self._fail(1009, f"message of {self._msg_len + <object>size} bytes or more exceeds "
                                 f"max_message {self.max_message}")
            if n - pos < head + 4 or <uint64_t>(n - pos - head - 4) < size:
                break
            end = pos + head + 4 + <Py_ssize_t>size
            payload = _unmask(p + pos + head + 4, <Py_ssize_t>size, p + pos + head) if size else b""
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
                self._msg_len += <Py_ssize_t>size
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
                    (<bytes>payload).decode("utf-8")
                except UnicodeDecodeError:
                    self._fail(1007, "text message is not valid UTF-8")
            out.append((op, payload))
        self._buf = _keep(data, pos, p, n)
        return out

    cdef int _fail(self, int code, str reason) except -1:
        self._error = (code, reason)
        self._parts = None
        self._buf = None
        raise WSError(code, reason)


def ws_encode(opcode, payload):
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


def ws_close_payload(code, reason=""):
    """Payload of a close frame: 2-byte code, then the UTF-8 reason cut to fit 125 bytes."""
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


def send_many(items):
    """For each ``(fd, data)``, one send(2) with MSG_DONTWAIT|MSG_NOSIGNAL, all with the
    GIL released; returns per item the bytes sent or ``-errno``."""
    cdef Py_ssize_t count = len(items), i
    cdef int* fds
    cdef const char** bufs
    cdef size_t* lens
    cdef ssize_t* res
    cdef ssize_t r
    if count == 0:
        return []
    keep = []
    fds = <int*>malloc(count * sizeof(int))
    bufs = <const char**>malloc(count * sizeof(char*))
    lens = <size_t*>malloc(count * sizeof(size_t))
    res = <ssize_t*>malloc(count * sizeof(ssize_t))
    try:
        if not fds or not bufs or not lens or not res:
            raise MemoryError()
        for i in range(count):
            fd, data = items[i]
            if type(data) is not bytes:
                data = bytes(data)
            keep.append(data)
            fds[i] = fd
            bufs[i] = PyBytes_AS_STRING(data)
            lens[i] = <size_t>PyBytes_GET_SIZE(data)
        with nogil:
            for i in range(count):
                while True:
                    r = send(fds[i], bufs[i], lens[i], MSG_DONTWAIT | MSG_NOSIGNAL)
                    if r >= 0 or errno != EINTR:
                        break
                res[i] = r if r >= 0 else -errno
        return [res[i] for i in range(count)]
    finally:
        free(fds)
        free(bufs)
        free(lens)
        free(res)
