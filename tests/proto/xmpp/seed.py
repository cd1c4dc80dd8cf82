"""``python tests/proto/xmpp/seed.py CONFIG JSON``: put test users in imd's store before it starts.

JSON: ``{"passwords": {user: password}, "contacts": [[a, b], ...], "roles": {user: role}}``.
Passwords are stored as SCRAM credentials, the way the admin API stores them.
"""

import sys

from gevent import monkey

monkey.patch_all()

import orjson  # noqa: E402

from imd.config import load  # noqa: E402
from imd.daemon import make_store  # noqa: E402
from imd.passwords import scram_credentials  # noqa: E402


def main(config: str, spec: str) -> None:
    cfg = load(config)
    import os
    os.makedirs(cfg.path(cfg.node.data_dir), exist_ok=True)
    data = orjson.loads(spec)
    store = make_store(cfg)
    store.open()
    for user, role in data.get("roles", {}).items():
        store.touch_user(user, role, None, 0)
    for user, password in data.get("passwords", {}).items():
        store.set_password(user, scram_credentials(password))
    for a, b in data.get("contacts", []):
        store.add_contact(a, b)
    store.flush(10)
    store.close(10)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
