"""Stored passwords: SCRAM keys (RFC 5802, RFC 7677), never the password itself.

:func:`scram_credentials` derives, per user, one salt, an iteration count and,
for each hash (``sha1``, ``sha256``), ``StoredKey`` and ``ServerKey`` in base64:
what the SCRAM-SHA-1/256 mechanisms check a client proof against, and what
:func:`verify_plain` recomputes to check a password given in clear (SASL
PLAIN), as Prosody does. The web tier sets passwords through the admin API;
the store keeps the credentials dict as JSON.

Pure computation (two PBKDF2 runs cost the CPU a few milliseconds); greenlet-safe.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from typing import Optional

HASH_NAMES = ("sha1", "sha256")
DEFAULT_ITERATIONS = 4096


def b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


def scram_keys(hash_name: str, password: bytes, salt: bytes, iterations: int) -> tuple[bytes, bytes]:
    """(StoredKey, ServerKey) for ``password`` (RFC 5802 §3)."""
    salted = hashlib.pbkdf2_hmac(hash_name, password, salt, iterations)
    client_key = hmac.digest(salted, b"Client Key", hash_name)
    stored_key = hashlib.new(hash_name, client_key).digest()
    return stored_key, hmac.digest(salted, b"Server Key", hash_name)


def scram_credentials(password: str, iterations: int = DEFAULT_ITERATIONS,
                      salt: Optional[bytes] = None) -> dict:
    """The stored form of ``password``: ``{"salt", "iterations", "sha1": {"stored_key",
    "server_key"}, "sha256": {...}}``, byte strings in base64."""
    salt = salt if salt is not None else os.urandom(16)
    creds: dict = {"salt": b64(salt), "iterations": iterations}
    for hash_name in HASH_NAMES:
        stored, server = scram_keys(hash_name, password.encode(), salt, iterations)
        creds[hash_name] = {"stored_key": b64(stored), "server_key": b64(server)}
    return creds


def verify_plain(credentials: Optional[dict], password: str) -> bool:
    """Whether ``password`` matches stored SCRAM ``credentials`` (None: no password set)."""
    if not credentials or "sha256" not in credentials:
        return False
    salt = base64.b64decode(credentials["salt"])
    stored, _ = scram_keys("sha256", password.encode(), salt, int(credentials["iterations"]))
    return hmac.compare_digest(stored, base64.b64decode(credentials["sha256"]["stored_key"]))
