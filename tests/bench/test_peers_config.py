"""The configs the bench writes: imd's [store] section, Prosody's module lists."""
import tomllib

import pytest

from bench import peers


def store_section(**kw):
    return tomllib.loads("[store]\n" + peers.Imd("/nowhere", **kw)._store_toml())["store"]


def test_default_is_sqlite_with_the_given_synchronous():
    assert store_section(synchronous="normal") == {"backend": "sqlite", "synchronous": "normal"}


def test_store_settings_override_and_quote():
    got = store_section(store={"backend": "postgresql", "dsn": 'host=127.0.0.1 dbname="x"', "writers": 4})
    assert got["backend"] == "postgresql"
    assert got["dsn"] == 'host=127.0.0.1 dbname="x"'
    assert got["writers"] == 4


PACKAGE_CONFIG = '''-- Prosody Example Configuration File
admins = { }
modules_enabled = {
		"disco"; -- Service discovery
		"roster"; -- Allow users to have a roster. Recommended ;)
		-- "mam"; -- Store messages in an archive
		"carbons"; -- Keep multiple online clients in sync
		"limits"; -- Enable bandwidth limiting for XMPP connections
}
modules_disabled = {
	-- "offline"; -- Store offline messages
}
limits = {
	c2s = {
		rate = "10kb/s";
	};
	s2sin = {
		rate = "30kb/s";
	};
}
'''


def test_package_settings_take_the_enabled_modules_and_the_c2s_rate(tmp_path):
    path = tmp_path / "prosody.cfg.lua"
    path.write_text(PACKAGE_CONFIG)
    assert peers.prosody_package_settings(str(path)) == (("disco", "roster", "carbons", "limits"), "10kb/s")


def test_package_settings_without_limits_or_modules(tmp_path):
    path = tmp_path / "prosody.cfg.lua"
    path.write_text('modules_enabled = { "roster" }\n')
    assert peers.prosody_package_settings(str(path)) == (("roster",), None)
    path.write_text("-- modules_enabled = { \"roster\" }\n")
    with pytest.raises(peers.PeerError):
        peers.prosody_package_settings(str(path))
    with pytest.raises(peers.PeerError):
        peers.prosody_package_settings(str(tmp_path / "missing.cfg.lua"))


def test_prosody_module_config(tmp_path, monkeypatch):
    minimal = peers.Prosody()._module_config()
    assert '"roster", "saslauth"' in minimal and '"limits" }' in minimal and "rate" not in minimal
    path = tmp_path / "prosody.cfg.lua"
    path.write_text(PACKAGE_CONFIG)
    monkeypatch.setattr(peers, "PROSODY_PACKAGE_CONFIG", str(path))
    package = peers.Prosody(modules="package")._module_config()
    assert 'modules_enabled = { "disco", "roster", "carbons", "limits" }' in package
    assert 'modules_disabled = { "s2s", "dialback" }' in package
    assert 'limits = { c2s = { rate = "10kb/s" } }' in package
    with pytest.raises(ValueError):
        peers.Prosody(modules="all")
