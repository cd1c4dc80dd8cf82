"""Incremental, namespace-aware XMPP stream parser on expat, hardened.

One :class:`StreamParser` per connection. ``feed(data)`` parses bytes as they
arrive (one byte at a time works) and calls its ``handler``'s methods, synchronously:

* ``on_stream_start(attrs)`` for the stream header; ``attrs`` holds the
  header's attributes (``xml:lang`` under ``XML_LANG``);
* ``on_stanza(element)`` for each complete depth-1 element (stanza or nonza);
* ``on_stream_end()`` for ``</stream:stream>``.

Any violation raises :class:`StreamError` out of ``feed`` with an RFC 6120
§4.9.3 condition; the caller sends the stream error and closes. Callbacks may
raise StreamError too; it propagates the same way. Safety (RFC 6120 §11.1):
DOCTYPE, entity declarations, entity references other than the five predefined
ones, comments and processing instructions are refused with ``restricted-xml``
before anything is expanded; a stanza larger than ``max_stanza`` bytes (counted
from the stanza's first byte, and input is handed to expat in pieces of at most
``max_stanza`` bytes, so a 10 MiB token with no ``>`` is refused after about
``max_stanza`` bytes and memory stays bounded) or deeper than ``max_depth`` is refused with
``policy-violation``; bytes that are not UTF-8 XML give ``not-well-formed``.

Stream restarts (after STARTTLS ``<proceed/>`` and SASL ``<success/>``): while
``negotiating`` is true, ``feed`` hands expat one tag at a time (it cuts the
input after each ``>``), so that when a callback calls :meth:`restart`, the
bytes after the stanza that triggered it are known exactly: they are fed to a
fresh expat parser (pipelined clients), or dropped with ``restart(drop=True)``
(after ``<starttls/>``: plaintext sent before the TLS handshake must never be
read as if it came through TLS). Set ``negotiating = False`` after resource
binding to parse whole reads at once.

Between stanzas (:meth:`StreamParser.hibernate`) a bound stream's parser
can be given up for a :class:`Dormant`, shared by every stream whose header
was alike; ``Dormant.wake(handler)`` gives the stream a parser again. A
parser given up between stanzas is in the very state a parser of any stream
with that header would be in (depth 1, nothing pending), so the Dormant keeps
a few of them (``MAX_SPARES``) for the next wakes, of any of its streams;
beyond those the expat parser is freed and a wake makes a new one, replaying
the header (``on_stream_start`` is not called again). Expat's error texts
carry no position (a position would count the bytes of earlier streams).
Element and attribute names are interned in one table shared by all parsers
(bounded), not in one per parser.

Not thread-safe; a parser belongs to one connection and never blocks.
"""

from __future__ import annotations

import sys
from typing import Optional
from xml.parsers import expat

from .stanza import CLIENT_NS, STREAM_NS, XML_NS, Element, escape_attr

SEP = "\x01"
MAX_STANZA = 262144
MAX_STANZA_PREAUTH = 16384
MAX_DEPTH = 32
MAX_NAMES = 4096          # expat names remembered split (shared by all streams; cleared when full)
_NAMES: dict[str, tuple[str, str]] = {}
MAX_INTERNED = 8192       # names in expat's intern table (shared by all parsers; cleared when over)
_INTERNED: dict[str, str] = {}
MAX_DORMANT = 256         # distinct Dormant objects remembered for sharing (cleared when full)
MAX_SPARES = 8            # parsers between stanzas a Dormant keeps for its streams' next wakes
_GAVE_WAY = RuntimeError("this parser gave way to a Dormant: feed the one its wake() returns")
_DORMANT: dict[tuple, "Dormant"] = {}


class StreamError(Exception):
    """A stream-level error: ``condition`` is an RFC 6120 §4.9.3 element name."""

    def __init__(self, condition: str, text: str = "") -> None:
        super().__init__(f"{condition}: {text}" if text else condition)
        self.condition = condition
        self.text = text


def _restricted(what: str):
    def refuse(*_args):
        raise StreamError("restricted-xml", what + " not allowed")
    return refuse


def _split(name: str) -> tuple[str, str]:
    """``'uri\\x01local[\\x01prefix]'`` → (local, uri); a name without namespace → (name, '')."""
    if SEP not in name:
        return name, ""
    parts = name.split(SEP)
    return parts[1], parts[0]


def _attr_key(name: str) -> str:
    if SEP not in name:
        return name
    parts = name.split(SEP)
    return "{" + parts[0] + "}" + parts[1]


_REFUSERS = {
    "StartDoctypeDeclHandler": _restricted("DOCTYPE"),
    "EntityDeclHandler": _restricted("entity declaration"),
    "UnparsedEntityDeclHandler": _restricted("entity declaration"),
    "NotationDeclHandler": _restricted("notation declaration"),
    "ElementDeclHandler": _restricted("element declaration"),
    "AttlistDeclHandler": _restricted("attribute list declaration"),
    "CommentHandler": _restricted("comment"),
    "ProcessingInstructionHandler": _restricted("processing instruction"),
    "SkippedEntityHandler": _restricted("entity reference"),
    "ExternalEntityRefHandler": _restricted("external entity"),
}


class StreamParser:
    """See the module docstring. ``max_stanza`` may be changed between feeds
    (e.g. raised from the pre-auth limit after SASL success)."""

    __slots__ = ("handler", "max_stanza", "max_depth",
                 "negotiating", "_parser", "_stack", "_depth", "_fed", "_mark", "_restart",
                 "_ns_decls", "_closed", "_error", "_paused", "_backlog", "_feeding", "_chunks",
                 "_text_el", "_text_tail", "_root", "_clean", "_ended", "_replaying", "_dormant")

    def __init__(self, handler, max_stanza: int = MAX_STANZA_PREAUTH,
                 max_depth: int = MAX_DEPTH) -> None:
        self.handler = handler                 # on_stream_start / on_stanza / on_stream_end
        self.max_stanza = max_stanza
        self.max_depth = max_depth
        self.negotiating = True
        self._error: Optional[StreamError] = None
        self._paused = False
        self._backlog = b""
        self._feeding = False
        self._text_el: Optional[Element] = None
        self._text_tail = False
        self._replaying = False
        self._dormant: Optional[Dormant] = None     # the one it gives way to (cached)
        self._new_parser()

    # -- public ---------------------------------------------------------------
    def feed(self, data: bytes) -> None:
        """Parse ``data``; raises StreamError. After an error the parser is dead.
        While paused, ``data`` is only kept (up to ``max_stanza`` bytes)."""
        if self._error is not None:
            raise self._error
        if self._paused:
            self._backlog += data
            if len(self._backlog) > self.max_stanza:
                self._error = StreamError("policy-violation", "too much data while busy")
                raise self._error
            return
        if len(_INTERNED) > MAX_INTERNED:
            _INTERNED.clear()                   # hostile names: the table is shared, keep it bounded
        self._feeding = True
        try:
            while data:
                if self._closed:
                    return                      # bytes after </stream:stream> are ignored
                cut = self.max_stanza
                if self.negotiating:
                    cut = min(cut, data.find(b">") + 1 or cut)
                chunk, data = data[:cut], data[cut:]
                base = self._fed
                fed = self._fed = base + len(chunk)     # callbacks read it; only restart() resets it
                try:
                    self._parser.Parse(chunk, False)
                except expat.ExpatError as e:
                    raise self._expat_error(e) from None
                if fed - self._mark > self.max_stanza:
                    raise StreamError("policy-violation", "stanza too big")
                ended = self._ended
                if ended >= 0:                  # a stanza ended in this chunk: what follows it?
                    self._ended = -1
                    rest = chunk[ended - base:] if ended > base else chunk
                    if ended < base or rest[:2] == b"</":
                        rest = rest[rest.find(b">") + 1:] if b">" in rest else b"<"   # skip the end tag
                    self._clean = not rest.strip()
                elif self._clean and chunk.strip():
                    self._clean = False
                if self._restart is not None:
                    drop = self._restart
                    self._new_parser()
                    if drop:
                        return
                if self._paused:
                    self._backlog = data
                    return
        except StreamError as e:
            self._error = e
            raise
        finally:
            self._feeding = False

    def restart(self, drop: bool = False) -> None:
        """Start a new stream (new expat parser, expect a new header) after the
        current stanza: call it from ``on_stanza``, or while paused. ``drop=True``
        discards the bytes already received after that stanza. Requires
        ``negotiating``."""
        if not self.negotiating:
            raise RuntimeError("restart() needs negotiating mode")
        if self._feeding:
            self._restart = drop
            return
        self._new_parser()
        if drop:
            self._backlog = b""

    def pause(self) -> None:
        """Call from ``on_stanza`` (negotiating mode): stop after this stanza and
        keep the rest until :meth:`resume` (the stanza's handling must wait)."""
        if not self.negotiating:
            raise RuntimeError("pause() needs negotiating mode")
        self._paused = True

    def resume(self) -> None:
        """Parse what arrived while paused; raises StreamError like ``feed``."""
        self._paused = False
        data, self._backlog = self._backlog, b""
        if data:
            self.feed(data)

    def hibernate(self) -> Optional["Dormant"]:
        """Give this parser up between stanzas: return the :class:`Dormant` to
        keep instead (about 10 KB less per idle connection); its
        ``wake(handler)`` gives the stream a parser again. This parser is kept
        as one of the Dormant's spares, or its expat parser is freed; either
        way the caller must not feed it again. Returns None, and changes nothing,
        unless everything fed after the last stanza's end tag is whitespace
        (nothing that expat may still hold is lost), at depth 1, bound (not
        negotiating), not paused and without an error."""
        if (self._depth != 1 or self.negotiating or self._paused or not self._clean
                or self._root is None or self._error is not None):
            return None
        dormant = self._dormant
        if dormant is None:
            decls = self._ns_decls
            key = (self._root, tuple(decls.items()), self.max_stanza, self.max_depth)
            dormant = _DORMANT.get(key)
            if dormant is None:
                if len(_DORMANT) >= MAX_DORMANT:
                    _DORMANT.clear()            # the sessions keep theirs; only sharing is lost
                dormant = _DORMANT[key] = Dormant(self._root, decls, self.max_stanza, self.max_depth)
            self._dormant = dormant
        self.handler = None
        self._error = _GAVE_WAY
        if len(dormant.spares) < MAX_SPARES:
            dormant.spares.append(self)
        else:
            self._parser = self._stack = self._chunks = None      # its handlers referred to us
        return dormant

    @property
    def depth(self) -> int:
        """Open elements: 0 before the header, 1 between stanzas."""
        return self._depth

    # -- internals ------------------------------------------------------------
    def _new_parser(self) -> None:
        p = expat.ParserCreate("UTF-8", SEP, intern=_INTERNED)
        if hasattr(p, "SetReparseDeferralEnabled"):
            p.SetReparseDeferralEnabled(False)   # expat ≥ 2.6 would hold back split tokens
        p.namespace_prefixes = True          # names carry the prefix: the header can be replayed
        p.ordered_attributes = False
        p.specified_attributes = True
        for handler, refuse in _REFUSERS.items():
            setattr(p, handler, refuse)
        p.XmlDeclHandler = self._xml_decl
        p.StartNamespaceDeclHandler = self._ns_decl
        p.StartElementHandler = self._start
        p.EndElementHandler = self._end
        p.CharacterDataHandler = self._text
        self._parser = p
        self._stack: list[Element] = []
        self._chunks: list[str] = []       # character data of the element being filled
        self._depth = 0
        self._fed = 0          # bytes given to this expat parser
        self._mark = 0         # byte index where the current stanza (or the gap) began
        self._restart: Optional[bool] = None
        self._ns_decls: dict[str, str] = {}
        self._closed = False
        self._root: Optional[str] = None     # the prefix of the client's stream element
        self._clean = True                    # nothing but whitespace fed after the last stanza
        self._ended = -1                      # byte index of a stanza end tag seen in this chunk

    def _expat_error(self, e: expat.ExpatError) -> StreamError:
        if e.code in (expat.errors.codes[expat.errors.XML_ERROR_UNDEFINED_ENTITY],
                      expat.errors.codes[expat.errors.XML_ERROR_EXTERNAL_ENTITY_HANDLING],
                      expat.errors.codes[expat.errors.XML_ERROR_RECURSIVE_ENTITY_REF]):
            return StreamError("restricted-xml", "entity references not allowed")
        if e.code == expat.errors.codes[expat.errors.XML_ERROR_UNKNOWN_ENCODING]:
            return StreamError("unsupported-encoding", "only UTF-8 is supported")
        return StreamError("not-well-formed", expat.ErrorString(e.code))

    def _xml_decl(self, version, encoding, standalone) -> None:
        if encoding is not None and encoding.upper() not in ("UTF-8", "UTF8"):
            raise StreamError("unsupported-encoding", "only UTF-8 is supported")

    def _ns_decl(self, prefix, uri) -> None:
        if self._depth == 0:
            self._ns_decls[prefix or ""] = uri or ""

    def _start(self, name: str, attrs: dict) -> None:
        depth = self._depth + 1
        if depth > self.max_depth:
            raise StreamError("policy-violation", "nesting too deep")
        self._depth = depth
        if self._chunks:
            self._flush_text()
        if depth == 1:
            if self._replaying:
                return
            tag, ns = _split(name)
            parts = name.split(SEP)
            self._root = sys.intern(parts[2]) if len(parts) == 3 else ""
            if ns != STREAM_NS or tag != "stream":
                raise StreamError("invalid-namespace", "not a stream header")
            if self._ns_decls.get("", "") != CLIENT_NS:
                raise StreamError("invalid-namespace", "default namespace must be jabber:client")
            self._mark = self._fed
            self.handler.on_stream_start({_attr_key(k): v for k, v in attrs.items()})
            return
        split = _NAMES.get(name)
        if split is None:
            if len(_NAMES) >= MAX_NAMES:
                _NAMES.clear()
            split = _NAMES[name] = _split(name)
        for key in attrs:                     # expat's dict is fresh: kept unless a key is namespaced
            if SEP in key:
                attrs = {_attr_key(k): v for k, v in attrs.items()}
                break
        el = Element(split[0], split[1], attrs)
        if depth == 2:
            self._mark = self._parser.CurrentByteIndex
        else:
            self._stack[-1].children.append(el)
        self._stack.append(el)

    def _end(self, name: str) -> None:
        depth = self._depth
        self._depth = depth - 1
        if self._chunks:
            self._flush_text()
        if depth == 1:
            self._closed = True
            self.handler.on_stream_end()
            return
        el = self._stack.pop()
        if depth == 2:
            self._mark = self._fed
            self._ended = self._parser.CurrentByteIndex   # at "</", or just after "/>"
            self.handler.on_stanza(el)

    def _text(self, data: str) -> None:
        depth = self._depth
        if depth >= 2:
            if not self._chunks:
                el = self._stack[-1]
                if el.children:
                    self._text_el, self._text_tail = el.children[-1], True
                else:
                    self._text_el, self._text_tail = el, False
            self._chunks.append(data)
        elif depth == 1:
            if not data.isspace():
                raise StreamError("bad-format", "text between stanzas")
            self._mark = self._fed         # whitespace keepalives never add up to a limit


    def _flush_text(self) -> None:
        text = "".join(self._chunks)
        self._chunks.clear()
        el = self._text_el
        self._text_el = None
        if self._text_tail:
            el.tail += text
        else:
            el.text += text


class Dormant:
    """A hibernated stream (:meth:`StreamParser.hibernate`): the prefix and
    namespace declarations of its header, and its limits. Immutable, and shared
    by the streams whose headers were alike (the usual header: one object)."""

    __slots__ = ("root", "header", "max_stanza", "max_depth", "spares")

    def __init__(self, root: str, decls: dict, max_stanza: int, max_depth: int) -> None:
        self.root = root
        self.header = ("<" + (root + ":" if root else "") + "stream" + "".join(
            f" xmlns:{p}='{escape_attr(u)}'" if p else f" xmlns='{escape_attr(u)}'"
            for p, u in decls.items()) + ">").encode()
        self.max_stanza = max_stanza
        self.max_depth = max_depth
        self.spares: list[StreamParser] = []     # given up between stanzas, ready for any of our streams

    def wake(self, handler) -> StreamParser:
        """A parser (bound mode, at depth 1) for ``handler``'s stream: a spare, or
        the header replayed into a new one (``on_stream_start`` not called)."""
        if self.spares:
            parser = self.spares.pop()
            parser.handler = handler
            parser._error = None
            return parser
        parser = StreamParser(handler, self.max_stanza, self.max_depth)
        parser._dormant = self
        parser.negotiating = False
        parser._root = self.root
        parser._replaying = True
        try:
            parser._parser.Parse(self.header, False)
        finally:
            parser._replaying = False
        parser._fed = parser._mark = len(self.header)
        return parser


__all__ = ["StreamParser", "StreamError", "Dormant", "MAX_STANZA", "MAX_STANZA_PREAUTH", "MAX_DEPTH", "XML_NS"]
