"""imd/config.py: defaults, validation messages, cross-field rules, generated files,
and the ``imd --check-config`` / ``--version`` command line (run as a real subprocess)."""

import os
import subprocess
import sys

import pytest

from imd import confdoc
from imd.config import SETTINGS, ConfigError, changes, defaults, load, load_dict, parse_addr

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def error_of(data):
    with pytest.raises(ConfigError) as e:
        load_dict(data)
    return str(e.value)


def test_defaults_load_with_the_design_names():
    cfg = defaults()
    assert cfg.node.id == "n1" and cfg.node.data_dir == "./var" and cfg.node.workers == 1
    assert cfg.auth.secret == "change-me" and cfg.auth.leeway == 30
    assert cfg.listen.tcp == "0.0.0.0:8900" and cfg.listen.admin == "127.0.0.1:8000"
    assert cfg.listen.control == "./var/imd.sock"
    assert cfg.store.backend == "sqlite" and cfg.store.dsn == "" and cfg.store.queue_size == 100000
    assert cfg.engine.backend == "memory" and cfg.engine.url == "redis://127.0.0.1:6379/0"
    assert cfg.presence.grace == 5.0 and isinstance(cfg.presence.grace, float)
    assert cfg.comet.max_subscribers_per_channel == 16 and cfg.comet.origins == []
    assert cfg.xmpp.domain == "localhost" and cfg.xmpp.tls == "optional"
    assert cfg.admin.allow == ["127.0.0.1"] and cfg.admin.dev_tokens is False
    assert cfg.limits.max_frame == 65536 and cfg.limits.max_body == 16384
    assert cfg.limits.send_buffer == 1048576 and cfg.limits.idle_timeout == 90
    assert cfg.log.level == "info" and cfg.log.file == ""
    assert cfg.policy.contacts_only is False
    assert cfg.get("limits.max_frame") == 65536
    assert cfg.as_dict()["node"]["id"] == "n1"
    assert len(SETTINGS) == sum(len(v) for v in cfg.as_dict().values())


def test_the_shipped_file_loads(tmp_path):
    cfg = load(os.path.join(ROOT, "etc", "imd.toml"))
    assert cfg.as_dict() == defaults().as_dict()
    assert cfg.source.endswith("imd.toml")


def test_values_from_a_file_and_read_only(tmp_path):
    f = tmp_path / "imd.toml"
    f.write_text('[node]\nid = "edge-1"\n[limits]\nmax_frame = 1024\nmax_body = 512\n'
                 '[listen]\ntcp = "[::1]:0"\n[comet]\norigins = ["*", "https://a.example"]\n')
    cfg = load(str(f))
    assert cfg.node.id == "edge-1" and cfg.limits.max_frame == 1024
    assert cfg.addr("listen.tcp") == ("::1", 0)
    assert cfg.comet.origins == ["*", "https://a.example"]
    with pytest.raises(AttributeError):
        cfg.node.id = "x"
    with pytest.raises(AttributeError):
        cfg.node.nope
    d = cfg.as_dict()
    d["comet"]["origins"].append("mutated")
    assert cfg.comet.origins == ["*", "https://a.example"]


def test_paths_are_kept_and_resolved_against_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_dict({"node": {"data_dir": "data"}, "log": {"file": "log/imd.log"}})
    assert cfg.node.data_dir == "data"
    assert cfg.path(cfg.node.data_dir) == str(tmp_path / "data")
    assert cfg.path(cfg.log.file) == str(tmp_path / "log" / "imd.log")
    assert cfg.path("/abs/x") == "/abs/x" and cfg.path("") == ""


@pytest.mark.parametrize("data,message", [
    ({"limits": {"max_frame": "abc"}},
     'config error: limits.max_frame: must be an integer between 16 and 16777216 (got "abc")'),
    ({"limits": {"max_frame": 8}}, "limits.max_frame: must be an integer between 16 and 16777216 (got 8)"),
    ({"node": {"workers": 1.5}}, "node.workers: must be an integer between 1 and 256 (got 1.5)"),
    ({"node": {"workers": True}}, "node.workers: must be an integer"),
    ({"node": {"id": "bad id"}}, 'node.id: must be 1-64 characters of [A-Za-z0-9_.-] (got "bad id")'),
    ({"node": {"id": "x" * 65}}, "node.id: must be 1-64 characters"),
    ({"auth": {"secret": ""}}, 'auth.secret: must be a non-empty string (got "")'),
    ({"auth": {"leeway": -1}}, "auth.leeway: must be a number >= 0 (got -1)"),
    ({"presence": {"grace": "5"}}, 'presence.grace: must be a number >= 0 (got "5")'),
    ({"comet": {"polling_timeout": 0}}, "comet.polling_timeout: must be a number > 0 (got 0)"),
    ({"store": {"backend": "mysql"}}, 'store.backend: must be one of "sqlite", "postgresql" (got "mysql")'),
    ({"log": {"level": "verbose"}}, 'log.level: must be one of "debug", "info", "warning", "error"'),
    ({"admin": {"dev_tokens": "yes"}}, 'admin.dev_tokens: must be true or false (got "yes")'),
    ({"admin": {"allow": "127.0.0.1"}}, "admin.allow: must be a list of strings"),
    ({"admin": {"deny": ["10.0.0.0 "]}}, "admin.deny: must be a list of strings, each an IP prefix"),
    ({"comet": {"origins": ["example.com"]}}, 'comet.origins: must be a list of strings, each an origin'),
    ({"engine": {"url": "http://x"}}, 'engine.url: must be a Redis URL'),
    ({"xmpp": {"domain": "bad domain"}}, 'xmpp.domain: must be a domain name'),
    ({"listen": {"control": 5}}, "listen.control: must be a path or \"\" (got 5)"),
])
def test_bad_values_name_the_key(data, message):
    assert message in error_of(data)


@pytest.mark.parametrize("addr", ["1.2.3.4", "1.2.3.4:", "1.2.3.4:65536", "::1:80", "[::1:80", "[zz]:80",
                                  "300.1.1.1:80", ":80", "host name:80", "1.2.3.4:-1", "1.2.3.4:８０"])
def test_bad_addresses(addr):
    with pytest.raises(ValueError):
        parse_addr(addr)
    assert error_of({"listen": {"tcp": addr}}).startswith(
        'config error: listen.tcp: must be "host:port" (IPv6 as "[addr]:port", port 0-65535) or "" to disable')


def test_parse_addr():
    assert parse_addr("127.0.0.1:0") == ("127.0.0.1", 0)
    assert parse_addr("[::1]:8900") == ("::1", 8900)
    assert parse_addr("localhost:65535") == ("localhost", 65535)
    assert parse_addr("") is None
    assert defaults().addr("listen.admin") == ("127.0.0.1", 8000)
    assert load_dict({"listen": {"xmpp": ""}}).addr("listen.xmpp") is None


def test_unknown_sections_and_keys():
    assert error_of({"limit": {}}) == 'config error: limit: unknown section (did you mean "limits"?)'
    assert error_of({"limits": {"max_fram": 1}}) == \
        'config error: limits.max_fram: unknown setting (did you mean "max_frame"?)'
    assert error_of({"node": {"max_frame": 1}}) == \
        'config error: node.max_frame: unknown setting (did you mean "limits.max_frame"?)'
    assert error_of({"zzz": {}}) == "config error: zzz: unknown section"
    assert error_of({"node": {"qqqq": 1}}) == "config error: node.qqqq: unknown setting"
    assert error_of({"node": 5}) == "config error: node: must be a table ([node]) (got 5)"


def test_cross_field_rules():
    msg = error_of({"node": {"workers": 2}})
    assert msg.startswith("config error: node.workers: ") and 'engine.backend = "redis"' in msg
    assert load_dict({"node": {"workers": 2}, "engine": {"backend": "redis"}}).node.workers == 2
    msg = error_of({"store": {"backend": "postgresql"}})
    assert msg.startswith("config error: store.dsn: is required when store.backend = \"postgresql\"")
    assert load_dict({"store": {"backend": "postgresql", "dsn": "postgresql://postgres@127.0.0.1/test"}})
    msg = error_of({"limits": {"heartbeat": 90}})
    assert msg.startswith("config error: limits.idle_timeout: must be greater than limits.heartbeat")
    assert "limits.max_body: must be smaller than limits.max_frame" in error_of({"limits": {"max_frame": 1024}})
    assert error_of({"xmpp": {"cert": "c.pem"}}).startswith("config error: xmpp.key: ")
    assert error_of({"xmpp": {"key": "k.pem"}}).startswith("config error: xmpp.cert: ")
    assert error_of({"xmpp": {"tls": "required"}}).startswith("config error: xmpp.tls: ")
    assert error_of({"tls": {"cert": "c.pem"}}).startswith("config error: tls.key: ")
    assert error_of({"tls": {"comet": True}}).startswith("config error: tls.comet: needs tls.cert")
    assert error_of({"listen": {"xmpps": "127.0.0.1:5223"}}).startswith("config error: listen.xmpps: ")


@pytest.fixture(scope="module")
def ca(tmp_path_factory):
    from tests.tlsca import TestCA
    return TestCA(tmp_path_factory.mktemp("ca"))


def test_certificates_are_checked(ca, tmp_path):
    cert, key = ca.issue("good")
    other_cert, other_key = ca.issue("other", serial=2)
    cfg = load_dict({"tls": {"cert": cert, "key": key, "comet": True}, "listen": {"xmpps": "127.0.0.1:5223"},
                     "xmpp": {"tls": "required"}})
    assert cfg.tls.comet and cfg.tls.cert == cert
    assert load_dict({"xmpp": {"cert": other_cert, "key": other_key, "tls": "required"}}).xmpp.cert == other_cert
    msg = error_of({"tls": {"cert": cert, "key": other_key}})
    assert msg == f"config error: tls.key: {other_key} does not match the certificate in {cert}"
    msg = error_of({"tls": {"cert": str(tmp_path / "nope.pem"), "key": key}})
    assert msg.startswith("config error: tls.cert: cannot read ") and "No such file" in msg
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    msg = error_of({"xmpp": {"cert": str(garbage), "key": key}})
    assert msg.startswith("config error: xmpp.cert: ") and "not a usable PEM" in msg
    msg = error_of({"tls": {"cert": key, "key": key}})          # a key where the certificate goes
    assert msg.startswith("config error: tls.cert: ")
    if os.geteuid() != 0:                                         # root reads any file
        unreadable = tmp_path / "k.pem"
        unreadable.write_bytes(open(key, "rb").read())
        unreadable.chmod(0)
        assert error_of({"tls": {"cert": cert, "key": str(unreadable)}}).startswith("config error: tls.key: cannot read")


def test_check_config_checks_certificates(ca, tmp_path):
    cert, key = ca.issue("cli")
    _, other_key = ca.issue("cli2", serial=3)
    path = tmp_path / "tls.toml"
    path.write_text(f'[tls]\ncert = "{cert}"\nkey = "{other_key}"\ncomet = true\n')
    out = imd("--check-config", "-c", str(path))
    assert out.returncode == 2 and "tls.key" in out.stderr and "does not match" in out.stderr
    path.write_text(f'[tls]\ncert = "{cert}"\nkey = "{key}"\ncomet = true\n')
    assert imd("--check-config", "-c", str(path)).returncode == 0


def test_config_pickles():
    import pickle
    cfg = load_dict({"node": {"id": "p1"}})
    back = pickle.loads(pickle.dumps(cfg))
    assert back.node.id == "p1" and back.as_dict() == cfg.as_dict()


def test_changes_on_reload():
    old = defaults()
    new = load_dict({"log": {"level": "debug"}, "listen": {"tcp": "127.0.0.1:0"}})
    assert changes(old, new) == [("listen.tcp", "0.0.0.0:8900", "127.0.0.1:0", False),
                                 ("log.level", "info", "debug", True)]
    assert changes(old, defaults()) == []


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load(str(tmp_path / "missing.toml"))
    bad = tmp_path / "bad.toml"
    bad.write_text("[limits\n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load(str(bad))
    bad.write_bytes(b'[node]\nid = "\xff"\n')
    with pytest.raises(ConfigError, match="invalid TOML"):
        load(str(bad))


@pytest.mark.parametrize("path,generate", [("etc/imd.toml", confdoc.toml), ("docs/config.md", confdoc.markdown)])
def test_generated_files_are_up_to_date(path, generate):
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        assert f.read() == generate(), f"{path} is stale: run python -m imd.config --toml/--markdown"


def test_generated_docs_name_every_setting():
    text = confdoc.markdown()
    toml_text = confdoc.toml()
    for s in SETTINGS:
        assert f"`{s.key}`" in text
        assert f"\n{s.name} = " in toml_text


# ------------------------------------------------------------ command line

def imd(*args, env=None):
    return subprocess.run([sys.executable, "-m", "imd", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": ROOT, **(env or {})}, timeout=60)


def test_check_config_ok():
    out = imd("--check-config", "-c", "etc/imd.toml")
    assert out.returncode == 0 and out.stdout == "config OK: etc/imd.toml\n"


def test_check_config_default_path():
    out = imd("--check-config")
    assert out.returncode == 0 and out.stdout == "config OK: etc/imd.toml\n"


def test_check_config_bad(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[limits]\nmax_frame = "abc"\n')
    out = imd("--check-config", "-c", str(bad))
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr == 'config error: limits.max_frame: must be an integer between 16 and 16777216 (got "abc")\n'
    out = imd("--check-config", "-c", str(tmp_path / "missing.toml"))
    assert out.returncode == 2 and "no such file" in out.stderr


def test_check_config_and_version_stay_light(tmp_path):
    probe = ("import sys, imd.cli\n"
             "try:\n    imd.cli.main(sys.argv[1:])\nfinally:\n"
             "    print('gevent' in sys.modules, file=sys.stderr)\n")
    for args in (["--version"], ["--check-config", "-c", "etc/imd.toml"]):
        out = subprocess.run([sys.executable, "-c", probe, *args], cwd=ROOT, capture_output=True, text=True,
                             env={**os.environ, "PYTHONPATH": ROOT}, timeout=60)
        assert out.stderr.strip().endswith("False"), out.stderr


def test_version():
    out = imd("--version")
    assert out.returncode == 0
    assert out.stdout.startswith("imd 0.") and out.stdout.rstrip().endswith(("(fastpath: cython)", "(fastpath: python)"))
    out = imd("--version", env={"IMD_PURE_PYTHON": "1"})
    assert out.stdout.rstrip().endswith("(fastpath: python)")


def test_pidfile_needs_daemon():
    out = imd("--pidfile", "/tmp/x.pid", "-c", "etc/imd.toml")
    assert out.returncode == 2 and "--pidfile needs --daemon" in out.stderr
