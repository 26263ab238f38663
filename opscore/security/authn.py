"""Authentication: from what a call presents to the principal it acts as.

A call presents an API key (`authorization: Bearer <key>`) or, under mTLS, the
client certificate the TLS handshake verified. A key wins when both are there.
The principals come from two sources:

- the auth file (`--auth-file`), re-read by `reload()` (SIGHUP);
- `OPSCORE_API_KEYS` / `--api-key-file`: admin keys, read once at start, so
  nothing changes for deployments that predate roles.

With neither, authentication is off: every call acts as `ANONYMOUS` (admin),
or under mTLS as an admin named by its certificate subject (the CA is then the
whole trust decision).
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from opscore import limits
from opscore.errors import Unauthenticated
from opscore.security import authfile, keys
from opscore.security.principal import ANONYMOUS, Credential, Principal
from opscore.security.roles import Role

log = logging.getLogger("opscore.security")

_NO_CREDENTIAL = Credential("none")


@dataclass(frozen=True, slots=True)
class _Principals:
    by_key: keys.KeyTable[Principal]
    by_subject: dict[str, Principal]
    count: int


def _principal(entry: authfile.Entry) -> Principal:
    return Principal(entry.name, entry.role, entry.agents)


class Authenticator:
    def __init__(
        self,
        *,
        api_keys: Iterable[str] = (),
        auth_file: str | None = None,
        client_certificates: bool = False,
    ) -> None:
        admin = Principal("api-key", Role.ADMIN)
        self._admin_keys = [(keys.digest(k), admin) for k in api_keys]
        self.auth_file = auth_file
        #: mTLS: calls carry a verified client certificate subject.
        self.client_certificates = client_certificates
        self._state = self._build([])

    @property
    def enabled(self) -> bool:
        return bool(self._admin_keys) or self.auth_file is not None

    @property
    def principal_count(self) -> int:
        return self._state.count

    def _build(self, entries: list[authfile.Entry]) -> _Principals:
        by_key = list(self._admin_keys)
        by_subject: dict[str, Principal] = {}
        for e in entries:
            p = _principal(e)
            by_key.extend((keys.parse_hash(h), p) for h in e.key_hashes)
            if e.subject is not None:
                by_subject[e.subject] = p
        return _Principals(keys.KeyTable(by_key), by_subject, len(entries))

    def load(self) -> None:
        """(Re-)read the auth file. On ConfigError (missing or wrong) the principals
        stay as they were."""
        if self.auth_file is None:
            return
        self._state = self._build(authfile.load(self.auth_file))
        _warn_if_writable(self.auth_file)

    # ------------------------------------------------------------------ calls

    def authenticate(self, authorization: str, subject: str | None) -> tuple[Principal, Credential]:
        """The principal of a call, or Unauthenticated with a stable reason."""
        if not self.enabled:
            if subject:
                return Principal(subject, Role.ADMIN), Credential("certificate", subject)
            return ANONYMOUS, _NO_CREDENTIAL
        if authorization:
            return self._by_key(authorization)
        if self.client_certificates and subject:
            found = self._state.by_subject.get(subject)
            if found is None:
                raise Unauthenticated(
                    f"client certificate subject {subject[:256]!r} names no principal: "
                    "send 'authorization: Bearer <key>' or add the subject to the auth file",
                    reason="CERTIFICATE_NOT_RECOGNISED",
                )
            return found, Credential("certificate", subject)
        raise Unauthenticated(
            "missing API key: send metadata 'authorization: Bearer <key>'",
            reason="API_KEY_MISSING",
        )

    def _by_key(self, header: str) -> tuple[Principal, Credential]:
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token or len(token) > limits.MAX_API_KEY_CHARS:
            raise Unauthenticated(
                "malformed authorization metadata: expected 'Bearer <key>'",
                reason="API_KEY_MALFORMED",
            )
        presented = keys.digest(token)
        found = self._state.by_key.match(presented)
        if found is None:
            raise Unauthenticated("API key not recognised", reason="API_KEY_INVALID")
        return found, Credential("key", presented)

    def resolve(self, credential: Credential) -> Principal | None:
        """What `credential` authenticates as now (after a reload), or None."""
        if credential.kind == "key":
            assert isinstance(credential.value, bytes)
            return self._state.by_key.match(credential.value)
        if credential.kind == "certificate":
            assert isinstance(credential.value, str)
            if not self.enabled:
                return Principal(credential.value, Role.ADMIN)
            return self._state.by_subject.get(credential.value)
        return ANONYMOUS if not self.enabled else None


def _warn_if_writable(path: str) -> None:
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        log.warning(
            "the auth file can be written by other users, who could grant themselves any role",
            extra={"auth_file": str(Path(path)), "mode": oct(stat.S_IMODE(mode))},
        )
