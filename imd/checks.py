"""Value checks for the declarative settings in imd/config.py.

A :class:`Check` validates (and, for numbers, normalises) one TOML value and
raises :class:`Invalid` with its "must be ..." phrase, which ConfigError puts
after the key and the generated docs show as the allowed values. Also ``parse_addr`` for
"host:port" settings and ``show`` which renders a value as TOML would.
"""

from __future__ import annotations

import ipaddress
import math
import re
from typing import Any, Callable
from urllib.parse import urlsplit

NOTHING = object()   # "no value to show" marker for ConfigError


class Invalid(ValueError):
    """The value breaks the check; the message is the "must be ..." phrase."""


class Check:
    """``check(value) -> normalised value`` or raises Invalid(must)."""

    __slots__ = ("must", "_ok")

    def __init__(self, must: str, ok: Callable[[Any], Any]) -> None:
        self.must = must
        self._ok = ok      # returns the normalised value; raises ValueError/TypeError if bad

    def __call__(self, value: Any) -> Any:
        try:
            return self._ok(value)
        except (ValueError, TypeError):
            raise Invalid(self.must) from None


def show(value: Any) -> str:
    """A value as it would be written in TOML (strings double-quoted)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        out = value.replace("\\", "\\\\").replace('"', '\\"')
        return '"' + "".join(ch if ch >= " " and ch != "\x7f" else f"\\u{ord(ch):04x}" for ch in out) + '"'
    if isinstance(value, list):
        return "[" + ", ".join(show(v) for v in value) + "]"
    if isinstance(value, dict):
        return "a table"
    return str(value)


def _need(cond: bool) -> None:
    if not cond:
        raise ValueError


def integer(lo: int, hi: int | None = None) -> Check:
    must = f"must be an integer between {lo} and {hi}" if hi is not None else f"must be an integer >= {lo}"

    def ok(v):
        _need(type(v) is int and v >= lo and (hi is None or v <= hi))
        return v
    return Check(must, ok)


def number(lo: float, exclusive: bool = False) -> Check:
    """Seconds and the like: an integer or a float, returned as float."""
    must = f"must be a number {'>' if exclusive else '>='} {lo}"

    def ok(v):
        _need(type(v) in (int, float) and math.isfinite(v) and (v > lo if exclusive else v >= lo))
        return float(v)
    return Check(must, ok)


def boolean() -> Check:
    def ok(v):
        _need(type(v) is bool)
        return v
    return Check("must be true or false", ok)


def string(empty: bool = False) -> Check:
    def ok(v):
        _need(type(v) is str and (empty or v != "") and "\x00" not in v)
        return v
    return Check("must be a string" if empty else "must be a non-empty string", ok)


def path(empty: bool = False) -> Check:
    check = string(empty)
    return Check('must be a path or ""' if empty else "must be a non-empty path", check._ok)


def choice(*options: str) -> Check:
    def ok(v):
        _need(v in options and type(v) is str)
        return v
    return Check("must be one of " + ", ".join(show(o) for o in options), ok)


_IDENT = re.compile(r"[A-Za-z0-9_.\-]{1,64}")


def ident() -> Check:
    def ok(v):
        _need(type(v) is str and _IDENT.fullmatch(v) is not None)
        return v
    return Check("must be 1-64 characters of [A-Za-z0-9_.-]", ok)


_HOSTNAME = re.compile(r"(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                       r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*")


def domain() -> Check:
    def ok(v):
        _need(type(v) is str and _HOSTNAME.fullmatch(v) is not None)
        return v
    return Check("must be a domain name like \"example.com\"", ok)


def parse_addr(text: str) -> tuple[str, int] | None:
    """``"host:port"`` → ``(host, port)``; ``"[::1]:8900"`` → ``("::1", 8900)``;
    ``""`` → None (listener disabled). Raises ValueError if malformed.
    Port 0 is allowed (the kernel picks a free port)."""
    if text == "":
        return None
    host, sep, port = text.rpartition(":")
    if not sep or not (port.isascii() and port.isdigit()) or len(port) > 5 or int(port) > 65535:
        raise ValueError(f"bad address {text!r}: needs host:port with a port 0-65535")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        ipaddress.IPv6Address(host)          # raises ValueError
    elif re.fullmatch(r"[0-9.]+", host):
        ipaddress.IPv4Address(host)
    elif not _HOSTNAME.fullmatch(host):
        raise ValueError(f"bad address {text!r}: bad host {host!r}")
    return host, int(port)


def address() -> Check:
    def ok(v):
        _need(type(v) is str)
        parse_addr(v)
        return v
    return Check('must be "host:port" (IPv6 as "[addr]:port", port 0-65535) or "" to disable', ok)


def redis_url() -> Check:
    def ok(v):
        _need(type(v) is str and urlsplit(v).scheme in ("redis", "rediss", "unix"))
        return v
    return Check('must be a Redis URL ("redis://host:port/db", "rediss://..." or "unix:///path")', ok)


ORIGIN = re.compile(r"\*|https?://[^/\s]+")
IP_PREFIX = re.compile(r"all|\*|[0-9A-Fa-f.:]+")


def str_list(item: re.Pattern, item_desc: str) -> Check:
    def ok(v):
        _need(type(v) is list and all(type(x) is str and item.fullmatch(x) for x in v))
        return list(v)
    return Check(f"must be a list of strings, each {item_desc}", ok)
