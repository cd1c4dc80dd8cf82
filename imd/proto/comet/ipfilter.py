"""The admin port's IP allow/deny lists, with iComet's order of checks.

Entries: ``all`` or ``*``; a full address (exact match); a dotted IPv4 prefix
such as ``192.168`` (matches whole components: ``192.168.1.7`` but not
``192.1680.0.1`` — iComet compared raw string prefixes); or, beyond iComet, a
CIDR network such as ``10.0.0.0/8`` or ``fd00::/8``. IPv4-mapped IPv6
addresses are checked as IPv4. Order (iComet ``IpFilter::check_pass``): no
entries at all → pass; an allow entry matches → pass; a deny entry matches →
refuse; ``deny all`` → refuse; ``allow all`` → pass; otherwise refuse.
Pure, no I/O.
"""

from __future__ import annotations

import ipaddress
from typing import Iterable, List, Tuple


class IpFilter:
    __slots__ = ("allow", "deny", "allow_all", "deny_all", "empty")

    def __init__(self, allow: Iterable[str] = (), deny: Iterable[str] = ()) -> None:
        self.allow_all, self.allow = _compile(allow)
        self.deny_all, self.deny = _compile(deny)
        self.empty = not (self.allow or self.deny or self.allow_all or self.deny_all)

    def check(self, ip: str) -> bool:
        """May ``ip`` use the admin port?"""
        if self.empty:
            return True
        ip = _normal(ip)
        if _hit(self.allow, ip):
            return True
        if _hit(self.deny, ip):
            return False
        if self.deny_all:
            return False
        return self.allow_all


def _normal(ip: str) -> str:
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return ip
    mapped = getattr(addr, "ipv4_mapped", None)
    return str(mapped or addr)


def _compile(entries: Iterable[str]) -> Tuple[bool, List[object]]:
    every = False
    out: List[object] = []
    for entry in entries:
        entry = entry.strip()
        if entry in ("all", "*"):
            every = True
        elif "/" in entry:
            out.append(ipaddress.ip_network(entry, strict=False))
        elif entry:
            out.append(_normal(entry))
    return every, out


def _hit(entries: List[object], ip: str) -> bool:
    addr = None
    for entry in entries:
        if isinstance(entry, str):
            if ip == entry or ("." in ip and ip.startswith(entry.rstrip(".") + ".")):
                return True
        else:
            if addr is None:
                try:
                    addr = ipaddress.ip_address(ip)
                except ValueError:
                    return False
            if addr.version == entry.version and addr in entry:
                return True
    return False
