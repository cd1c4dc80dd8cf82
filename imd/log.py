"""Logging: one line per event, ``key=value`` text or JSON (``log.format``).

Conventions every log call follows (docs/operations.md):

- the message is a short event name followed by ``key=value`` pairs:
  ``log.info("session closed conn=%s user=%s reason=%s", s.id, s.user, reason)``;
- a line about a connection carries ``conn=<Session.id>`` (e.g. ``conn=n1.2a``)
  so one connection's history can be grepped out of a busy log;
- message bodies (and tokens, secrets) are never logged at info level or above.

Text lines look like ``2026-01-31T12:00:00.123Z info imd.daemon listening name=tcp addr=127.0.0.1:8900``.
JSON lines are one object per line with ``ts``, ``level``, ``logger``, ``msg`` (the
whole message) and every ``key=value`` pair of the message as its own field.

Writing a log line blocks the hub for one write(2), like any logging call.
"""

from __future__ import annotations

import logging
import re
import sys
import time

import orjson

LEVELS = ("debug", "info", "warning", "error")
_PAIR = re.compile(r'(?:^|\s)([a-z_][a-z0-9_]*)=("[^"]*"|\S+)')
_RESERVED = frozenset({"ts", "level", "logger", "msg", "exc"})


def _timestamp(record: logging.LogRecord) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = f"{_timestamp(record)} {record.levelname.lower()} {record.name} {record.getMessage()}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        obj = {"ts": _timestamp(record), "level": record.levelname.lower(), "logger": record.name, "msg": msg}
        for key, value in _PAIR.findall(msg):
            if key not in _RESERVED and key not in obj:
                obj[key] = value[1:-1] if value.startswith('"') else value
        if record.exc_info:
            obj["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(obj).decode()


def setup(level: str = "info", fmt: str = "text", path: str = "") -> logging.Handler:
    """Configure the root logger (replacing and closing its handlers); returns the
    new handler (a file one is reopened by :func:`reopen` on USR1)."""
    handler = logging.FileHandler(path, encoding="utf-8") if path else logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
        if h is not handler:
            h.close()
    root.addHandler(handler)
    set_level(level)
    return handler


def set_level(level: str) -> None:
    """Change the least severe level logged; ValueError for an unknown level."""
    if level not in LEVELS:
        raise ValueError(f"log level must be one of {', '.join(LEVELS)}")
    logging.getLogger().setLevel(level.upper())


def level() -> str:
    return logging.getLevelName(logging.getLogger().level).lower()


def reopen(handler: logging.Handler) -> bool:
    """Reopen a file handler's file (after logrotate moved it); False for stdout."""
    if not isinstance(handler, logging.FileHandler):
        return False
    new = open(handler.baseFilename, "a", encoding="utf-8")
    old = handler.setStream(new)
    if old is not None:
        old.close()
    return True
