"""The [store] section the bench writes into imd's generated config."""
import tomllib

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
