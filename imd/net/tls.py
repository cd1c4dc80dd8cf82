"""TLS for io-watcher connections: a layer that looks like a non-blocking socket.

Used by every TLS listener (``tls.tcp``, ``tls.comet``, ``tls.admin``,
``listen.xmpps``) and by XMPP STARTTLS. Nothing about the core's design
changes: :class:`TlsSocket` wraps the connection's C-level socket with an
``ssl.SSLObject`` over memory BIOs, so the handshake and the records are
driven by the connection's read watcher and the per-iteration flush, and an
idle TLS connection still has no greenlet. :class:`imd.net.conn.Conn` only
needs ``recv``, ``send``, ``fileno``, ``close``, ``setblocking``,
``getpeername``:

* ``recv(n)`` reads ciphertext from the socket, advances the handshake, and
  returns every byte of plaintext now decrypted (so no plaintext stays hidden
  inside the SSL object where no fd event would announce it); it raises
  ``BlockingIOError`` when nothing is readable yet, returns ``b""`` at EOF or
  on the peer's close_notify; a failed handshake raises ``ssl.SSLError`` (an
  ``OSError``: the Conn closes that connection only);
* ``send(data)`` encrypts and writes. Ciphertext the kernel did not take is
  kept here; to make the caller retry (and arm its write watcher), ``send``
  then reports one byte fewer than it consumed and skips that byte when it is
  offered again. Plaintext written before the handshake completes is
  encrypted once it has.

A client that speaks plaintext to a TLS port (its first byte is not a TLS
handshake record) gets the listener's ``refusal`` bytes in plaintext (e.g.
``HTTP 400``) and is closed. Ciphertext produced while reading (handshake
flights, session tickets) is written at once; what the kernel does not take
then goes out with the next read or write (only a peer that reads nothing at
all can leave it there, and the auth deadline ends such a peer).

:class:`TlsServer` is the TLS side of one listener: its current context
(replaced by :meth:`TlsServer.load` on reload: handshakes begun after it use
the new certificate, established connections keep theirs) and its counters.
Everything runs in the hub and never blocks; not thread-safe.
"""

from __future__ import annotations

import errno
import logging
import os
import ssl
from typing import Optional

log = logging.getLogger("imd.tls")

# TLS 1.2 suites: forward secrecy and AEAD only (TLS 1.3 suites are OpenSSL's defaults, all AEAD).
CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!eNULL"
HANDSHAKE_RECORD = 0x16
ALPN = {"xmpp": ["xmpp-client"], "xmpps": ["xmpp-client"], "comet": ["http/1.1"], "admin": ["http/1.1"]}
FAILURE_REASONS = ("plaintext", "protocol", "incomplete")


def server_context(cert: str, key: str, alpn: Optional[list] = None) -> ssl.SSLContext:
    """A server context: TLS ≥ 1.2, AEAD suites with forward secrecy, no renegotiation,
    the PEM certificate chain ``cert`` (leaf first) and its ``key``, ``alpn`` protocols.
    Raises OSError / ssl.SSLError when the files are unreadable or do not match."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(CIPHERS)
    ctx.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_COMPRESSION
    ctx.load_cert_chain(cert, key)
    if alpn:
        ctx.set_alpn_protocols(alpn)
    return ctx


def check_pair(cert: str, key: str) -> Optional[tuple[str, str]]:
    """Why ``cert`` and ``key`` cannot serve TLS: ``(which, reason)`` with which being
    "cert" or "key", or None when they load and match. Used by imd.config."""
    for which, path in (("cert", cert), ("key", key)):
        try:
            with open(path, "rb") as f:
                f.read(1)
        except OSError as e:
            return which, f"cannot read {path}: {e.strerror}"
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.load_cert_chain(cert, key)
    except ssl.SSLError as e:
        text = str(e)
        if "KEY_VALUES_MISMATCH" in text or "key values mismatch" in text:
            return "key", f"{key} does not match the certificate in {cert}"
        if "PEM" in text or "NO_START_LINE" in text or "CA_MD_TOO_WEAK" in text or "EE_KEY_TOO_SMALL" in text:
            return "cert", f"{cert} / {key}: not a usable PEM certificate chain and private key ({e.reason or text})"
        return "cert", f"{cert} / {key}: {text}"
    return None


def cert_pair(cfg, listener: str) -> Optional[tuple[str, str]]:
    """The absolute (cert, key) paths a listener uses, or None when none is set:
    XMPP (STARTTLS and direct TLS) uses ``xmpp.cert``/``xmpp.key`` when set, every
    listener ``tls.cert``/``tls.key`` otherwise."""
    if listener in ("xmpp", "xmpps") and cfg.xmpp.cert:
        return cfg.path(cfg.xmpp.cert), cfg.path(cfg.xmpp.key)
    if cfg.tls.cert:
        return cfg.path(cfg.tls.cert), cfg.path(cfg.tls.key)
    return None


class TlsServer:
    """The TLS side of one listener: context, ALPN, plaintext refusal, counters."""

    __slots__ = ("name", "alpn", "refusal", "context", "source", "handshakes", "failures")

    def __init__(self, name: str, refusal: bytes = b"") -> None:
        self.name = name
        self.alpn = ALPN.get(name)
        self.refusal = refusal
        self.context: Optional[ssl.SSLContext] = None
        self.source: Optional[tuple[str, str]] = None
        self.handshakes = 0
        self.failures = dict.fromkeys(FAILURE_REASONS, 0)

    def load(self, cert: str, key: str) -> None:
        """Use the certificate and key in these files for new handshakes; raises
        (OSError, ssl.SSLError) and keeps the current context if they are unusable."""
        self.use(self.context_for(cert, key), (cert, key))

    def context_for(self, cert: str, key: str) -> ssl.SSLContext:
        """A context for this listener from these files (raises as :func:`server_context`)."""
        return server_context(cert, key, self.alpn)

    def use(self, context: ssl.SSLContext, source: tuple[str, str]) -> None:
        """Handshakes that start from now on use ``context``; established connections keep theirs."""
        self.context, self.source = context, source
        log.info("tls certificate loaded listener=%s cert=%s mtime=%d", self.name, source[0],
                 int(os.stat(source[0]).st_mtime))

    def wrap(self, sock) -> "TlsSocket":
        return TlsSocket(sock, self)

    def handle(self, inner):
        """A listener hook that wraps each accepted socket before ``inner`` sees it."""
        def handle(sock, addr):
            inner(TlsSocket(sock, self), addr)
        return handle


NEW, HANDSHAKING, OPEN, FAILED = 0, 1, 2, 3


class TlsSocket:
    __slots__ = ("sock", "server", "tls", "_in", "_out", "_cipher", "_owed", "_early", "_state")

    def __init__(self, sock, server: TlsServer) -> None:
        self.sock = sock
        self.server = server
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self.tls = server.context.wrap_bio(self._in, self._out, server_side=True)
        self._cipher = b""          # ciphertext not yet taken by the kernel
        self._owed = 0              # plaintext bytes already encrypted but reported unsent
        self._early = None          # plaintext written before the handshake completed
        self._state = NEW

    @property
    def established(self) -> bool:
        return self._state == OPEN

    def fileno(self) -> int:
        return self.sock.fileno()

    def setblocking(self, flag: bool) -> None:
        self.sock.setblocking(flag)

    def getpeername(self):
        return self.sock.getpeername()

    def close(self) -> None:
        if self._state == OPEN:
            try:
                self.tls.unwrap()
            except ssl.SSLError:
                pass                # close_notify is queued; no need to wait for the peer's
            try:
                self._push()
            except OSError:
                pass
        elif self._state != FAILED:
            self._fail("incomplete")    # closed (EOF, deadline, refusal) before the handshake ended
        self.sock.close()

    def _fail(self, reason: str) -> None:
        self._state = FAILED
        self.server.failures[reason] += 1

    # -- reading ------------------------------------------------------------------
    def recv(self, n: int) -> bytes:
        data = self.sock.recv(n)                # BlockingIOError / OSError propagate
        if not data:
            return b""
        if self._state != OPEN:
            self._handshake(data)               # raises BlockingIOError until it is done
        else:
            self._in.write(data)
        chunks = []
        eof = False
        while True:
            try:
                chunk = self.tls.read(65536)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                eof = True
                break
            if not chunk:                        # close_notify from the peer
                eof = True
                break
            chunks.append(chunk)
        self._push()                             # e.g. TLS 1.3 key updates
        if chunks:
            return b"".join(chunks)
        if eof:
            return b""
        raise BlockingIOError()

    def _handshake(self, data: bytes) -> None:
        if self._state == NEW:
            if data[0] != HANDSHAKE_RECORD:
                self._fail("plaintext")
                if self.server.refusal:
                    try:
                        self.sock.send(self.server.refusal)
                    except OSError:
                        pass
                raise OSError(errno.EPROTO, "not TLS: plaintext on a TLS port")
            self._state = HANDSHAKING
        self._in.write(data)
        try:
            self.tls.do_handshake()
        except ssl.SSLWantReadError:
            self._push()
            raise BlockingIOError() from None
        except ssl.SSLError as e:
            self._fail("protocol")
            log.debug("tls handshake failed listener=%s reason=%s", self.server.name, e.reason or e)
            try:
                self._push()                     # the alert, e.g. protocol_version
            except OSError:
                pass
            raise
        self._state = OPEN
        self.server.handshakes += 1
        if self._early:
            early, self._early = b"".join(self._early), None
            self.tls.write(early)
        self._push()

    # -- writing ------------------------------------------------------------------
    def send(self, data: bytes) -> int:
        if self._state != OPEN:
            if self._early is None:
                self._early = []
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
