"""XMPP elements: a small element type, its serializer, and error builders.

An :class:`Element` is what the stream parser delivers for each stanza and what
the listener builds to answer. Names are split: ``tag`` is the local name,
``ns`` the namespace URI. Attribute keys are plain names (``"to"``) or, for
namespaced attributes, ``"{uri}local"`` (``XML_LANG`` for ``xml:lang``).

:func:`tostring` emits no namespace prefixes for stanza namespaces (RFC 6120
§11.2: never ``ns0:``): an element whose namespace equals its parent's gets no
``xmlns``, another one gets ``xmlns='…'``; only the stream namespace uses the
``stream:`` prefix declared in the stream header. Characters that XML 1.0
forbids (e.g. U+0000–U+0008 from web or JSON input) are dropped, never written.

Everything here is pure computation: nothing blocks, everything is greenlet-safe.
"""

from __future__ import annotations

import re
from typing import Iterator, Optional

CLIENT_NS = "jabber:client"
STREAM_NS = "http://etherx.jabber.org/streams"
STREAMS_ERR_NS = "urn:ietf:params:xml:ns:xmpp-streams"
STANZAS_ERR_NS = "urn:ietf:params:xml:ns:xmpp-stanzas"
XML_NS = "http://www.w3.org/XML/1998/namespace"
XML_LANG = "{" + XML_NS + "}lang"

_FORBIDDEN = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")
_ATTR_WHITESPACE = re.compile("[\t\n\r]")
_TEXT_SPECIAL = re.compile("[&<>\r\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")
ATTR_SPECIAL = re.compile("[&<>'\"\t\n\r\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


class Element:
    """One XML element: ``tag``, ``ns``, ``attrs`` (dict), ``children`` (list),
    ``text`` (character data before the first child) and ``tail`` (character
    data after this element, inside its parent)."""

    __slots__ = ("tag", "ns", "attrs", "children", "text", "tail")

    def __init__(self, tag: str, ns: str = CLIENT_NS, attrs: Optional[dict] = None,
                 children: Optional[list] = None, text: str = "") -> None:
        self.tag = tag
        self.ns = ns
        self.attrs = attrs if attrs is not None else {}
        self.children = children if children is not None else []
        self.text = text
        self.tail = ""

    # -- building -------------------------------------------------------------
    def add(self, tag: str, ns: Optional[str] = None, attrs: Optional[dict] = None,
            text: str = "") -> "Element":
        """Append a child (in this element's namespace unless ``ns`` is given); return it."""
        child = Element(tag, self.ns if ns is None else ns, attrs, None, text)
        self.children.append(child)
        return child

    def append(self, child: "Element") -> "Element":
        self.children.append(child)
        return child

    # -- reading --------------------------------------------------------------
    def get(self, key: str, default=None):
        return self.attrs.get(key, default)

    def find(self, tag: str, ns: Optional[str] = None) -> Optional["Element"]:
        """The first child with this tag (and namespace, default: this element's)."""
        ns = self.ns if ns is None else ns
        for child in self.children:
            if child.tag == tag and child.ns == ns:
                return child
        return None

    def findtext(self, tag: str, ns: Optional[str] = None, default: Optional[str] = None):
        child = self.find(tag, ns)
        return default if child is None else child.text

    def iter_ns(self, ns: str) -> Iterator["Element"]:
        """Children in namespace ``ns``."""
        return (c for c in self.children if c.ns == ns)

    def copy(self) -> "Element":
        """A deep copy (attributes and children copied, strings shared)."""
        el = Element(self.tag, self.ns, dict(self.attrs), [c.copy() for c in self.children], self.text)
        el.tail = self.tail
        return el

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        return f"<Element {{{self.ns}}}{self.tag} {self.attrs!r}>"

    def __bytes__(self) -> bytes:
        return tostring(self).encode()


# -- serialization ------------------------------------------------------------
def escape_text(s: str) -> str:
    """Character data: ``&``, ``<``, ``>`` escaped, CR written as ``&#13;`` (a parser
    turns a literal CR LF into LF), forbidden characters dropped."""
    if _TEXT_SPECIAL.search(s) is None:
        return s
    if _FORBIDDEN.search(s):
        s = _FORBIDDEN.sub("", s)
    s = s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return s.replace("\r", "&#13;") if "\r" in s else s


def escape_attr(s: str) -> str:
    """An attribute value: as :func:`escape_text` plus both quotes, and TAB, LF, CR
    as character references (attribute-value normalization makes them spaces)."""
    if ATTR_SPECIAL.search(s) is None:
        return s
    if _FORBIDDEN.search(s):
        s = _FORBIDDEN.sub("", s)
    s = (s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
         .replace("'", "&apos;").replace('"', "&quot;"))
    if _ATTR_WHITESPACE.search(s):
        s = s.replace("\t", "&#9;").replace("\n", "&#10;").replace("\r", "&#13;")
    return s


def tostring(el: Element, parent_ns: str = CLIENT_NS) -> str:
    """Serialize ``el`` as it appears inside a parent in namespace ``parent_ns``
    (default: a stanza directly inside a jabber:client stream)."""
    out: list[str] = []
    _write(el, parent_ns, out)
    return "".join(out)


def _write(el: Element, parent_ns: str, out: list) -> None:
    if el.ns == STREAM_NS:
        name = "stream:" + el.tag
        head = "<" + name
        child_ns = parent_ns          # stream:features, stream:error keep the stream's default ns
    else:
        name = el.tag
        head = "<" + name if el.ns == parent_ns else "<" + name + " xmlns='" + escape_attr(el.ns) + "'"
        child_ns = el.ns
    out.append(head)
    n = 0
    for key, value in el.attrs.items():
        if key[0] == "{":
            uri, local = key[1:].split("}", 1)
            if uri == XML_NS:
                key = "xml:" + local
            else:
                n += 1
                out.append(f" xmlns:a{n}='{escape_attr(uri)}'")
                key = f"a{n}:{local}"
        out.append(" " + key + "='" + escape_attr(value) + "'")
    if not el.children and not el.text:
        out.append("/>")
    else:
        out.append(">")
        if el.text:
            out.append(escape_text(el.text))
        for child in el.children:
            _write(child, child_ns, out)
            if child.tail:
                out.append(escape_text(child.tail))
        out.append("</" + name + ">")


# -- stream header and stream errors --------------------------------------------
def stream_header(domain: str, stream_id: str, lang: str = "en", to: Optional[str] = None) -> bytes:
    """The server's stream header (with XML declaration), echoing ``lang``."""
    to_attr = f" to='{escape_attr(to)}'" if to else ""
    return (f"<?xml version='1.0'?><stream:stream from='{escape_attr(domain)}'{to_attr}"
            f" id='{escape_attr(stream_id)}' version='1.0' xml:lang='{escape_attr(lang)}'"
            f" xmlns='{CLIENT_NS}' xmlns:stream='{STREAM_NS}'>").encode()


STREAM_CLOSE = b"</stream:stream>"


def stream_error(condition: str, text: str = "") -> Element:
    """``<stream:error>`` with an RFC 6120 §4.9.3 condition and optional text."""
    err = Element("error", STREAM_NS)
    err.add(condition, STREAMS_ERR_NS)
    if text:
        err.add("text", STREAMS_ERR_NS, {XML_LANG: "en"}, text)
    return err


# -- stanza errors ------------------------------------------------------------
_ERROR_TYPES = {
    "bad-request": "modify", "conflict": "cancel", "feature-not-implemented": "cancel",
    "forbidden": "auth", "gone": "cancel", "internal-server-error": "wait",
    "item-not-found": "cancel", "jid-malformed": "modify", "not-acceptable": "modify",
    "not-allowed": "cancel", "not-authorized": "auth", "policy-violation": "modify",
    "recipient-unavailable": "wait", "redirect": "modify", "registration-required": "auth",
    "remote-server-not-found": "cancel", "remote-server-timeout": "wait",
    "resource-constraint": "wait", "service-unavailable": "cancel",
    "subscription-required": "auth", "undefined-condition": "cancel", "unexpected-request": "wait",
}


def error_reply(stanza: Element, condition: str, text: str = "", by: Optional[str] = None,
                keep_payload: bool = False) -> Element:
    """The error answer to ``stanza`` (RFC 6120 §8.3): same tag, ``type='error'``,
    ``to``/``from`` swapped, ``id`` kept, ``<error>`` with ``condition``.

    ``by`` sets the ``from`` of the reply when the original had no ``to`` (the
    server answers on the account's behalf). Never call this for a stanza whose
    type is already ``error`` (§8.3.1: no error loops).
    """
    attrs = {"type": "error"}
    if "id" in stanza.attrs:
        attrs["id"] = stanza.attrs["id"]
    frm = stanza.attrs.get("to") or by
    if frm:
        attrs["from"] = frm
    if "from" in stanza.attrs:
        attrs["to"] = stanza.attrs["from"]
    reply = Element(stanza.tag, stanza.ns, attrs)
    if keep_payload:
        reply.children = [c.copy() for c in stanza.children]
    err = reply.add("error", attrs={"type": _ERROR_TYPES.get(condition, "cancel")})
    err.add(condition, STANZAS_ERR_NS)
    if text:
        err.add("text", STANZAS_ERR_NS, {XML_LANG: "en"}, text)
    return reply


def iq_result(iq: Element, child: Optional[Element] = None, by: Optional[str] = None) -> Element:
    """The ``type='result'`` answer to ``iq`` (``to``/``from`` swapped, ``id`` kept)."""
    attrs = {"type": "result", "id": iq.attrs.get("id", "")}
    frm = iq.attrs.get("to") or by
    if frm:
        attrs["from"] = frm
    if "from" in iq.attrs:
        attrs["to"] = iq.attrs["from"]
    reply = Element("iq", iq.ns, attrs)
    if child is not None:
        reply.children.append(child)
    return reply
