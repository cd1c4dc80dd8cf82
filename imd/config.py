"""Declarative settings of imd (DESIGN.md §8), in the style of gunicorn's config.

Every setting is declared once in ``SETTINGS``: section, name, default, check
(type, allowed values, conversion) , a one-line description, and ``live`` —
whether the daemon applies a new value on reload without a restart. Loading,
validation, ``etc/imd.toml`` and ``docs/config.md`` are all derived from these
declarations (``python -m imd.config --toml|--markdown``), so they cannot drift.

``load(path)`` reads TOML, fills defaults, validates and returns a read-only
:class:`Config`; every problem raises :class:`ConfigError` naming the key::

    config error: limits.max_frame: must be an integer between 16 and 16777216 (got "abc")

Relative paths are kept as written; ``cfg.path(value)`` resolves one against
the process's current directory. Nothing here imports gevent.
"""

from __future__ import annotations

import difflib
import os
import sys
import tomllib
from dataclasses import dataclass
from typing import Any

from imd import checks
from imd.checks import Check, Invalid, parse_addr, show

__all__ = ["Config", "ConfigError", "Setting", "SETTINGS", "SECTIONS", "load", "load_dict",
           "defaults", "parse_addr", "changes", "apply_live", "SECRET_KEYS"]


class ConfigError(Exception):
    """A bad configuration. ``key`` is the dotted key (or the file), ``reason`` why."""

    def __init__(self, key: str, reason: str, got: Any = checks.NOTHING) -> None:
        self.key = key
        self.reason = reason
        text = f"config error: {key}: {reason}"
        if got is not checks.NOTHING:
            text += f" (got {show(got)})"
        super().__init__(text)


@dataclass(frozen=True)
class Setting:
    section: str
    name: str
    default: Any
    check: Check
    desc: str
    live: bool = False

    @property
    def key(self) -> str:
        return f"{self.section}.{self.name}"


S = Setting
c = checks
SECTIONS = {
    "node": "This node: identity, data directory, worker processes.",
    "auth": "User tokens: JWT (HS256) issued by the web tier.",
    "listen": 'Listeners: "host:port" ("[::1]:port" for IPv6); "" disables one; port 0 picks a free port.',
    "store": "The durable store (inboxes, cursors, contacts).",
    "engine": "The bus between nodes.",
    "presence": "Per-user presence aggregated over sessions.",
    "comet": "The comet port, with iComet's own option names and meanings.",
    "xmpp": "The XMPP c2s listener.",
    "tls": "TLS on the listeners (docs/security.md, docs/operations.md): one PEM certificate chain and key, "
           "reloaded on SIGHUP.",
    "admin": "The admin HTTP port (iComet admin API and /api/v1).",
    "limits": "Per-connection limits and timers.",
    "log": "Logging.",
    "policy": "Who may talk to whom.",
}
SETTINGS = [
    S("node", "id", "n1", c.ident(), "unique name of this node in a cluster"),
    S("node", "data_dir", "./var", c.path(),
      "directory of the embedded store; relative to the working directory"),
    S("node", "workers", 1, c.integer(1, 256),
      "worker processes sharing the ports (SO_REUSEPORT); >1 needs engine.backend = \"redis\""),
    S("auth", "secret", "change-me", c.string(), "HS256 key for user tokens", live=True),
    S("auth", "leeway", 30, c.number(0),
      "seconds of clock skew allowed when checking a token's exp", live=True),
    S("listen", "xmpp", "0.0.0.0:5222", c.address(), "XMPP c2s (STARTTLS per xmpp.tls)"),
    S("listen", "xmpps", "", c.address(),
      "XMPP c2s with direct TLS (XEP-0368), e.g. \"0.0.0.0:5223\"; needs a certificate; \"\" disables it"),
    S("listen", "comet", "0.0.0.0:8100", c.address(),
      "comet HTTP: iComet front API, WebSocket, SSE, long-poll"),
    S("listen", "tcp", "0.0.0.0:8900", c.address(), "raw TCP protocol of the native apps"),
    S("listen", "admin", "127.0.0.1:8000", c.address(), "admin HTTP API for the web tier"),
    S("listen", "control", "./var/imd.sock", c.path(empty=True),
      "control unix socket for imd-admin (mode 0600); \"\" disables it"),
    S("store", "backend", "sqlite", c.choice("sqlite", "postgresql"),
      '"sqlite" (embedded, a file under node.data_dir) or "postgresql"'),
    S("store", "dsn", "", c.string(empty=True),
      "PostgreSQL connection string, e.g. \"postgresql://postgres@127.0.0.1/imd\"; required for postgresql"),
    S("store", "queue_size", 100000, c.integer(1), "write operations queued before senders get error 503"),
    S("store", "batch_max", 1000, c.integer(1), "most write operations committed in one transaction"),
    S("store", "batch_wait", 0.002, c.number(0),
      "most seconds the sqlite writer holds a small batch open while writes keep arriving (fewer, larger commits; docs/store.md); 0: never"),
    S("store", "writers", 2, c.integer(1, 64), "writer connections (postgresql); more than 2 rarely helps (docs/store.md)"),
    S("store", "sqlite_writer", "process", c.choice("process", "thread"),
      '"process": the sqlite writer connection in a process of its own, beside imd\'s (another core, '
      'another GIL; docs/store.md); "thread": in a thread of imd\'s process (one core, or no process may be started)'),
    S("store", "synchronous", "full", c.choice("full", "normal"),
      "SQLite PRAGMA synchronous: \"full\" survives power loss, \"normal\" only a crash"),
    S("store", "retention_days", 0, c.integer(0),
      "days inbox entries are kept; 0 keeps them forever", live=True),
    S("engine", "backend", "memory", c.choice("memory", "redis"),
      '"memory" (single node) or "redis" (cluster bus)'),
    S("engine", "url", "redis://127.0.0.1:6379/0", c.redis_url(), "Redis URL for the redis engine"),
    S("engine", "prefix", "imd:", c.string(),
      "prefix of every Redis key and pub/sub channel; clusters sharing one Redis need different ones"),
    S("engine", "presence_ttl", 30, c.integer(2, 3600),
      "seconds a node's presence records live in Redis unless refreshed"),
    S("presence", "grace", 5, c.number(0),
      "seconds before a user with no session left is announced offline", live=True),
    S("comet", "auth", "none", c.choice("none", "token"),
      '"none", or "token": /sub needs a channel token from /sign', live=True),
    S("comet", "max_channels", 100000, c.integer(1),
      "live channels at most (more: 429 Too many channels)", live=True),
    S("comet", "max_subscribers_per_channel", 16, c.integer(1),
      "concurrent subscribers of one channel (more: 429)", live=True),
    S("comet", "channel_buffer_size", 10, c.integer(1, 100000),
      "messages kept per channel for subscribers that catch up", live=True),
    S("comet", "channel_timeout", 30, c.number(0, exclusive=True),
      "seconds an idle channel lives; default expiry of /sign tokens", live=True),
    S("comet", "polling_timeout", 30, c.number(0, exclusive=True),
      "seconds before an idle subscriber gets a noop", live=True),
    S("comet", "origins", [], c.str_list(c.ORIGIN, "an origin like \"https://example.com\" or \"*\""),
      "CORS origins allowed on the comet port; \"*\" allows any", live=True),
    S("xmpp", "domain", "localhost", c.domain(), "the XMPP domain users log in to (user@domain)"),
    S("xmpp", "tls", "optional", c.choice("required", "optional", "disabled"),
      'STARTTLS: "required", "optional" (offered when cert and key are set) or "disabled"'),
    S("xmpp", "cert", "", c.path(empty=True),
      "PEM certificate chain for STARTTLS and listen.xmpps when it differs from tls.cert; \"\" = tls.cert",
      live=True),
    S("xmpp", "key", "", c.path(empty=True), "PEM private key going with xmpp.cert", live=True),
    S("tls", "cert", "", c.path(empty=True),
      "PEM certificate chain (leaf first) of every TLS listener; re-read on SIGHUP", live=True),
    S("tls", "key", "", c.path(empty=True), "PEM private key of tls.cert; re-read on SIGHUP", live=True),
    S("tls", "tcp", False, c.boolean(), "the raw-TCP listener speaks TLS only"),
    S("tls", "comet", False, c.boolean(), "the comet listener speaks HTTPS and WSS only"),
    S("tls", "admin", False, c.boolean(),
      "the admin listener speaks HTTPS only (when the web tier reaches it over a network)"),
    S("admin", "allow", ["127.0.0.1"], c.str_list(c.IP_PREFIX, "an IP prefix, \"all\" or \"*\""),
      "client IP prefixes allowed (iComet semantics)", live=True),
    S("admin", "deny", [], c.str_list(c.IP_PREFIX, "an IP prefix, \"all\" or \"*\""),
      "client IP prefixes denied (iComet semantics)", live=True),
    S("admin", "secret", "", c.string(empty=True),
      "when set, requests need \"Authorization: Bearer <secret>\"", live=True),
    S("admin", "dev_tokens", False, c.boolean(),
      "when true, POST /api/v1/tokens mints user tokens (development only)", live=True),
    S("limits", "max_frame", 65536, c.integer(16, 16777216),
      "largest raw-TCP frame or WebSocket message, bytes", live=True),
    S("limits", "max_body", 16384, c.integer(1, 16777216), "largest encoded message body, bytes", live=True),
    S("limits", "send_buffer", 1048576, c.integer(4096, 1 << 30),
      "unsent bytes a session may hold before it is cut off as a slow consumer", live=True),
    S("limits", "heartbeat", 30, c.number(0, exclusive=True),
      "seconds between server pings on an idle connection", live=True),
    S("limits", "idle_timeout", 90, c.number(0, exclusive=True),
      "seconds without any input before a connection is closed; > heartbeat", live=True),
    S("limits", "auth_timeout", 10, c.number(0, exclusive=True),
      "seconds a new connection has to authenticate", live=True),
    S("limits", "max_connections", 0, c.integer(0),
      "connections at most per process; 0 = as many as the fd limit allows", live=True),
    S("limits", "max_connections_per_ip", 0, c.integer(0),
      "connections at most from one IP address; 0 = no limit (mobile carriers put many users "
      "behind one address: size it generously)", live=True),
    S("limits", "connect_rate_per_ip", 0, c.integer(0),
      "new connections per second from one IP address; 0 = no limit", live=True),
    S("limits", "msg_rate", 20, c.number(0),
      "messages (msg, read, sync) per second a session may send, sustained; 0 = no limit", live=True),
    S("limits", "msg_burst", 60, c.integer(1),
      "messages a session may send at once above msg_rate (the token bucket's size)", live=True),
    S("log", "level", "info", c.choice("debug", "info", "warning", "error"),
      "least severe level logged", live=True),
    S("log", "format", "text", c.choice("text", "json"), "text lines or one JSON object per line", live=True),
    S("log", "file", "", c.path(empty=True),
      "log file (reopened on SIGUSR1 after logrotate moved it); \"\" logs to stdout", live=True),
    S("policy", "contacts_only", False, c.boolean(),
      "when true, users may message only their contacts", live=True),
]
del S, c
BY_KEY = {s.key: s for s in SETTINGS}


def _cross_checks(v: dict) -> None:
    """Rules that involve several settings; ``v`` is the validated section dicts."""
    if v["node"]["workers"] > 1 and v["engine"]["backend"] != "redis":
        raise ConfigError("node.workers", 'more than one worker needs engine.backend = "redis" '
                          "(workers talk to each other only through the redis engine)", v["node"]["workers"])
    if v["store"]["backend"] == "postgresql" and not v["store"]["dsn"]:
        raise ConfigError("store.dsn", 'is required when store.backend = "postgresql"', "")
    lim = v["limits"]
    if lim["idle_timeout"] <= lim["heartbeat"]:
        raise ConfigError("limits.idle_timeout",
                          f"must be greater than limits.heartbeat ({show(lim['heartbeat'])})", lim["idle_timeout"])
    if lim["max_body"] >= lim["max_frame"]:
        raise ConfigError("limits.max_body", f"must be smaller than limits.max_frame ({lim['max_frame']}) "
                          "so that a message carrying it fits in a frame", lim["max_body"])
    _tls_checks(v)


def _tls_checks(v: dict) -> None:
    """Certificates: set in pairs, present where a TLS listener needs them, readable,
    and each key matching its certificate (loaded as the listeners will load them)."""
    x, t = v["xmpp"], v["tls"]
    for sec, pair in (("xmpp", x), ("tls", t)):
        if bool(pair["cert"]) != bool(pair["key"]):
            missing = f"{sec}.key" if pair["cert"] else f"{sec}.cert"
            raise ConfigError(missing, f"{sec}.cert and {sec}.key must be set together", "")
    xmpp_cert = bool(x["cert"] or t["cert"])
    if x["tls"] == "required" and not xmpp_cert:
        raise ConfigError("xmpp.tls", '"required" needs a certificate (tls.cert and tls.key, '
                          "or xmpp.cert and xmpp.key)", x["tls"])
    if v["listen"]["xmpps"] and not xmpp_cert:
        raise ConfigError("listen.xmpps", "direct TLS needs a certificate (tls.cert and tls.key, "
                          "or xmpp.cert and xmpp.key)", v["listen"]["xmpps"])
    for name in ("tcp", "comet", "admin"):
        if t[name] and not t["cert"]:
            raise ConfigError(f"tls.{name}", "needs tls.cert and tls.key", True)
    from imd.net.tls import check_pair
    for sec, pair in (("xmpp", x), ("tls", t)):
        if pair["cert"]:
            bad = check_pair(os.path.abspath(pair["cert"]), os.path.abspath(pair["key"]))
            if bad is not None:
                raise ConfigError(f"{sec}.{bad[0]}", bad[1])


class Section:
    """Read-only attribute access to one section's values.

    The section's values dict is the instance ``__dict__`` itself, so a setting
    is read at plain attribute speed (the hot paths read ``limits.*`` per
    envelope) and a live reload writing into that dict shows at once."""

    __slots__ = ("__dict__", "_name")

    def __init__(self, name: str, values: dict) -> None:
        object.__setattr__(self, "_name", name)
        object.__setattr__(self, "__dict__", values)

    @property
    def _values(self) -> dict:
        return self.__dict__

    def __getattr__(self, name: str) -> Any:
        raise AttributeError(f"no setting {self._name}.{name}")

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("Config is read-only; load a new one")

    def __repr__(self) -> str:
        return f"<Section {self._name} {self._values!r}>"


class Config:
    """A validated configuration: ``cfg.node.id``, ``cfg.get("node.id")``, ``cfg.as_dict()``.

    Read-only; a reload builds a new Config (see :func:`changes`). ``source`` is
    the file it came from (None for defaults or a dict).
    """

    def __init__(self, values: dict[str, dict], source: str | None = None) -> None:
        self._values = values
        self._sections = {name: Section(name, vals) for name, vals in values.items()}
        self.source = source

    def __getattr__(self, name: str) -> Section:
        try:
            return self.__dict__["_sections"][name]
        except KeyError:
            raise AttributeError(f"no config section {name!r}") from None

    def get(self, key: str) -> Any:
        """The value of a dotted key, e.g. ``"limits.max_frame"``; KeyError if unknown."""
        section, _, name = key.partition(".")
        return self._values[section][name]

    def as_dict(self) -> dict[str, dict]:
        """A deep copy of every value, by section."""
        return {sec: {k: (list(v) if isinstance(v, list) else v) for k, v in vals.items()}
                for sec, vals in self._values.items()}

    def addr(self, key: str) -> tuple[str, int] | None:
        """An address setting parsed to (host, port), or None when it is "" (disabled)."""
        return parse_addr(self.get(key))

    @staticmethod
    def path(value: str) -> str:
        """Absolute form of a path setting, relative to the process's current directory
        ("" stays "": the setting is disabled)."""
        return os.path.abspath(value) if value else ""

    def __reduce__(self):
        """Picklable (e.g. for worker processes started by spawn)."""
        return (Config, (self._values, self.source))

    def __repr__(self) -> str:
        return f"<Config from {self.source or 'defaults'}>"


def load_dict(data: dict, source: str | None = None) -> Config:
    """Validate a parsed TOML document (a dict of section tables) into a Config."""
    for section, table in data.items():
        if section not in SECTIONS:
            raise ConfigError(section, "unknown section" + _did_you_mean(section, SECTIONS))
        if not isinstance(table, dict):
            raise ConfigError(section, "must be a table ([" + section + "])", table)
        for name in table:
            if f"{section}.{name}" not in BY_KEY:
                names = [s.name for s in SETTINGS if s.section == section]
                hint = _did_you_mean(name, names) or _did_you_mean(name, [s.key for s in SETTINGS
                                                                           if s.name == name])
                raise ConfigError(f"{section}.{name}", "unknown setting" + hint)
    values: dict[str, dict] = {sec: {} for sec in SECTIONS}
    for s in SETTINGS:
        table = data.get(s.section, {})
        raw = table[s.name] if s.name in table else s.default
        try:
            values[s.section][s.name] = s.check(raw)
        except Invalid as e:
            raise ConfigError(s.key, str(e), raw) from None
    _cross_checks(values)
    return Config(values, source)


def load(path: str) -> Config:
    """Read, fill in and validate the TOML file at ``path``; raises ConfigError."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(path, "no such file") from None
    except OSError as e:
        raise ConfigError(path, f"cannot read: {e.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(path, f"invalid TOML: {e}") from None
    return load_dict(data, path)


def defaults() -> Config:
    """The configuration with every setting at its default."""
    return load_dict({})


def changes(old: Config, new: Config) -> list[tuple[str, Any, Any, bool]]:
    """What a reload changes: ``(key, old value, new value, live)`` per changed setting.
    Settings with live False only take effect after a restart."""
    out = []
    for s in SETTINGS:
        a, b = old.get(s.key), new.get(s.key)
        if a != b:
            out.append((s.key, a, b, s.live))
    return out


def apply_live(cfg: Config, diff: list[tuple[str, Any, Any, bool]]) -> list[str]:
    """Reload: write the live entries of ``diff`` (from :func:`changes`) into ``cfg``
    in place, so every holder of ``cfg`` or of one of its sections sees the new
    values; the others are left alone (they need a restart). Returns the keys applied.
    Only the daemon's reload calls this; everyone else treats a Config as read-only."""
    applied = []
    for key, _old, value, live in diff:
        if live:
            section, name = key.split(".", 1)
            cfg._values[section][name] = value
            applied.append(key)
    return applied


# Settings whose values never appear in logs or imd-admin output.
SECRET_KEYS = frozenset({"auth.secret", "admin.secret", "store.dsn", "engine.url"})


def _did_you_mean(word: str, options) -> str:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f' (did you mean "{close[0]}"?)' if close else ""


if __name__ == "__main__":
    from imd import confdoc
    sys.exit(confdoc.main(sys.argv[1:]))
