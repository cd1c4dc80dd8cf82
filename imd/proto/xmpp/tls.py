"""STARTTLS for io-watcher connections: a TLS layer that looks like a non-blocking socket.

:class:`TlsSocket` wraps the connection's plain socket with an ``ssl.SSLObject``
over memory BIOs, so the handshake and the records are driven by the same
read watcher and per-iteration flush as plaintext (:class:`imd.net.conn.Conn`
only needs ``recv``, ``send``, ``fileno``, ``close``, ``setblocking``,
``getpeername``):

* ``recv(n)`` reads ciphertext from the socket, advances the handshake, and
  returns every byte of plaintext now decrypted (so no plaintext stays hidden
  inside the SSL object where no fd event would announce it); it raises
  ``BlockingIOError`` when nothing is readable yet, returns ``b""`` at EOF;
* ``send(data)`` encrypts and writes. Ciphertext the kernel did not take is
  kept here; to make the caller retry (and arm its write watcher), ``send``
  then reports one byte fewer than it consumed and skips that byte when it is
  offered again.

Plaintext written before the handshake completes is encrypted once it has.
Never blocks; not thread-safe.
"""

from __future__ import annotations

import ssl
from typing import Optional


def server_context(cert: str, key: str) -> ssl.SSLContext:
    """A server context for XMPP c2s: TLS ≥ 1.2, the given PEM certificate chain and key."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key or None)
    ctx.set_alpn_protocols(["xmpp-client"])
    return ctx


class TlsSocket:
    __slots__ = ("sock", "tls", "_in", "_out", "_cipher", "_owed", "_early", "_handshaken")

    def __init__(self, sock, context: ssl.SSLContext, server_hostname: Optional[str] = None) -> None:
        self.sock = sock
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self.tls = context.wrap_bio(self._in, self._out, server_side=server_hostname is None,
                                    server_hostname=server_hostname)
        self._cipher = b""          # ciphertext not yet taken by the kernel
        self._owed = 0              # plaintext bytes already encrypted but reported unsent
        self._early = []            # plaintext written before the handshake completed
        self._handshaken = False

    def fileno(self) -> int:
        return self.sock.fileno()

    def setblocking(self, flag: bool) -> None:
        self.sock.setblocking(flag)

    def getpeername(self):
        return self.sock.getpeername()

    def close(self) -> None:
        try:
            if self._handshaken:
                self.tls.unwrap()
        except ssl.SSLError:
            pass                    # close_notify is queued; no need to wait for the peer's
        self._push()
        self.sock.close()

    # -- reading ------------------------------------------------------------------
    def recv(self, n: int) -> bytes:
        data = self.sock.recv(n)                # BlockingIOError / OSError propagate
        if not data:
            return b""
        self._in.write(data)
        if not self._handshaken:
            try:
                self.tls.do_handshake()
            except ssl.SSLWantReadError:
                self._push()
                raise BlockingIOError() from None
            self._handshaken = True
            if self._early:
                early, self._early = b"".join(self._early), []
                self.tls.write(early)
            self._push()
        chunks = []
        while True:
            try:
                chunk = self.tls.read(65536)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:       # close_notify from the peer
                break
            if not chunk:
                break
            chunks.append(chunk)
        self._push()                             # e.g. TLS 1.3 key updates
        if not chunks:
            raise BlockingIOError()
        return b"".join(chunks)

    # -- writing ------------------------------------------------------------------
    def send(self, data: bytes) -> int:
        if not self._handshaken:
            self._early.append(bytes(data))
            return len(data)
        if self._cipher and not self._push():
            raise BlockingIOError()
        owed, self._owed = self._owed, 0
        fresh = data[owed:]
        if fresh:
            self.tls.write(fresh)
        if self._push():
            return len(data)
        self._owed = 1                           # ask the caller to come back
        return len(data) - 1

    def _push(self) -> bool:
        """Write pending ciphertext to the socket; True if none is left."""
        if self._out.pending:
            self._cipher += self._out.read()
        while self._cipher:
            try:
                n = self.sock.send(self._cipher)
            except (BlockingIOError, InterruptedError):
                return False
            self._cipher = self._cipher[n:]
            if n == 0:
                return False
        return True
