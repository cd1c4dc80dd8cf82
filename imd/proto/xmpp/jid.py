"""JIDs as imd uses them: ``<user id>@<xmpp.domain>[/<resource>]``.

The localpart is an imd user id (``[A-Za-z0-9_.-]{1,64}``, compared exactly:
imd user ids are case-sensitive, so no PRECIS case mapping is applied); the
domainpart is compared case-insensitively and kept in lower case; the resource
is an opaque string of 1–1023 UTF-8 bytes without control characters (it
names the device). JIDs of other domains parse (so a stanza to them can be
answered with ``remote-server-not-found``) but never name a local user.

Pure functions; greenlet-safe.
"""

from __future__ import annotations

import re
from typing import NamedTuple, Optional

LOCALPART_RE = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
_DOMAIN_RE = re.compile(r"[a-z0-9](?:[a-z0-9\-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9\-]{0,61}[a-z0-9])?)*")
_CONTROL_RE = re.compile("[\x00-\x1f\x7f\ud800-\udfff\ufffe\uffff]")
MAX_RESOURCE_BYTES = 1023
MAX_PARSED = 4096         # JIDs remembered parsed (a JID is immutable; cleared when full)
MAX_PARSED_LEN = 256      # longer ones are parsed each time (bounds the memory: ~1 MB)
_PARSED: dict[str, "JID"] = {}


class JIDError(ValueError):
    """Not a JID we accept (answer ``jid-malformed``)."""


class JID(NamedTuple):
    local: str          # '' for a domain JID
    domain: str
    resource: str       # '' for a bare JID

    @property
    def bare(self) -> str:
        return f"{self.local}@{self.domain}" if self.local else self.domain

    @property
    def full(self) -> str:
        return f"{self.bare}/{self.resource}" if self.resource else self.bare

    def __str__(self) -> str:
        return self.full


def valid_localpart(local: str) -> bool:
    return LOCALPART_RE.fullmatch(local) is not None


def valid_resource(resource: str) -> bool:
    return (0 < len(resource.encode("utf-8", "surrogatepass")) <= MAX_RESOURCE_BYTES
            and _CONTROL_RE.search(resource) is None and resource.strip() != "")


def parse(text: str) -> JID:
    """Parse ``[local@]domain[/resource]``; raises JIDError. Valid JIDs are remembered
    (the same ``to`` comes again and again in a chat)."""
    jid = _PARSED.get(text)
    if jid is None:
        jid = _parse(text)
        if len(text) > MAX_PARSED_LEN:
            return jid
        if len(_PARSED) >= MAX_PARSED:
            _PARSED.clear()
        _PARSED[text] = jid
    return jid


def _parse(text: str) -> JID:
    bare, slash, resource = text.partition("/")
    local, at, domain = bare.rpartition("@")
    if not at:
        local, domain = "", bare
    domain = domain.lower().rstrip(".")
    if _DOMAIN_RE.fullmatch(domain) is None or len(domain) > 1023:
        raise JIDError(f"bad domain in {text!r}")
    if at and not valid_localpart(local):
        raise JIDError(f"bad localpart in {text!r}")
    if slash and not valid_resource(resource):
        raise JIDError(f"bad resource in {text!r}")
    return JID(local, domain, resource)


def local_user(jid: JID, domain: str) -> Optional[str]:
    """The imd user id ``jid`` names on our ``domain``, or None (domain JID or remote)."""
    return jid.local if jid.local and jid.domain == domain else None


def make(user: str, domain: str, resource: str = "") -> str:
    """Format a JID string from trusted parts."""
    return f"{user}@{domain}/{resource}" if resource else f"{user}@{domain}"
