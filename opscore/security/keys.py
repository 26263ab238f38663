"""API keys: how they are made, how they are stored (a hash only), how they are matched.

A key is 32 random bytes from `secrets` (256 bits), base64url-encoded behind a
recognisable prefix so secret scanners and people can tell what leaked. Because
a key is uniformly random and that long, no dictionary or brute force can find
it from its hash, so a fast hash is the right tool: a slow password hash
(scrypt, argon2) exists to protect low-entropy secrets and would only cost CPU
on every call. The hash is HMAC-SHA256 under a fixed label, which keeps these
digests apart from any other SHA-256 of the same string.

Matching compares the digest of the presented key with every stored digest in
constant time and never stops early, so timing says nothing about which stored
digest came close.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Iterable
from typing import Generic, TypeVar

V = TypeVar("V")

KEY_PREFIX = "opsk_"
HASH_PREFIX = "sha256:"
_LABEL = b"opscore api key v1"
_HASH = re.compile(r"^sha256:[0-9a-f]{64}$")


def generate_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def digest(key: str) -> bytes:
    return hmac.new(_LABEL, key.encode("utf-8", "surrogatepass"), hashlib.sha256).digest()


def hash_key(key: str) -> str:
    """What the auth file stores for `key`: "sha256:<64 hex digits>"."""
    return HASH_PREFIX + digest(key).hex()


def is_key_hash(value: str) -> bool:
    return bool(_HASH.match(value))


def parse_hash(value: str) -> bytes:
    if not is_key_hash(value):
        raise ValueError(f"not a key hash (sha256:<64 hex digits>): {value[:12]!r}...")
    return bytes.fromhex(value[len(HASH_PREFIX) :])


def fingerprint(key_hash: str) -> str:
    """A short, safe label for one stored key (a prefix of its hash) to tell keys
    apart in listings and when revoking one of several."""
    return key_hash[len(HASH_PREFIX) : len(HASH_PREFIX) + 12]


class KeyTable(Generic[V]):
    """Digests mapped to values, matched in constant time."""

    def __init__(self, entries: Iterable[tuple[bytes, V]] = ()) -> None:
        self._entries = list(entries)

    def __len__(self) -> int:
        return len(self._entries)

    def match(self, presented: bytes) -> V | None:
        found: V | None = None
        for stored, value in self._entries:
            # No early exit: every call does the same comparisons.
            if hmac.compare_digest(stored, presented):
                found = value
        return found
