"""TLS for the SDK, the agent and the CLI: which roots to trust, and the client
certificate to present under mTLS.

    from opscore.client import OpsCoreClient, TLSConfig

    tls = TLSConfig.from_files(ca="ca.crt", cert="agent.crt", key="agent.key")
    async with OpsCoreClient("ops.example.com:50051", tls=tls) as client: ...

`OpsCoreClient(tls=...)`: a `TLSConfig`; True (TLS, system roots unless
`root_certificates` or the environment name a CA); False (plaintext); or None,
the default, which reads the environment: TLS is on when `OPSCORE_TLS` is
true or any of `OPSCORE_TLS_CA`, `OPSCORE_TLS_CLIENT_CERT`,
`OPSCORE_TLS_CLIENT_KEY` (file paths) is set.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

ENV_TLS = "OPSCORE_TLS"
ENV_CA = "OPSCORE_TLS_CA"
ENV_CERT = "OPSCORE_TLS_CLIENT_CERT"
ENV_KEY = "OPSCORE_TLS_CLIENT_KEY"


def _read(path: str | Path | None, what: str) -> bytes | None:
    if path is None or path == "":
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read the {what} {path}: {exc.strerror}") from exc


@dataclass(frozen=True, slots=True)
class TLSConfig:
    """PEM bytes. `root_certificates` None trusts the system roots. The client
    certificate chain and its key go together (mTLS). `server_name` overrides
    the name the server's certificate is checked against (when connecting by an
    address the certificate does not name)."""

    root_certificates: bytes | None = None
    certificate_chain: bytes | None = None
    private_key: bytes | None = None
    server_name: str | None = None

    def __post_init__(self) -> None:
        if (self.certificate_chain is None) != (self.private_key is None):
            raise ValueError("a client certificate and its private key go together")

    @classmethod
    def from_files(
        cls,
        ca: str | Path | None = None,
        cert: str | Path | None = None,
        key: str | Path | None = None,
        *,
        server_name: str | None = None,
    ) -> TLSConfig:
        return cls(
            root_certificates=_read(ca, "CA certificate file"),
            certificate_chain=_read(cert, "client certificate file"),
            private_key=_read(key, "client key file"),
            server_name=server_name or None,
        )

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.root_certificates,
            private_key=self.private_key,
            certificate_chain=self.certificate_chain,
        )

    def channel_options(self) -> list[tuple[str, Any]]:
        if not self.server_name:
            return []
        return [("grpc.ssl_target_name_override", self.server_name)]


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def resolve_tls(
    tls: bool | TLSConfig | None,
    root_certificates: bytes | None,
    env: Mapping[str, str],
) -> TLSConfig | None:
    """What a client's `tls` argument means (see the module documentation)."""
    if isinstance(tls, TLSConfig):
        return tls
    if tls is False:
        return None
    files = (env.get(ENV_CA), env.get(ENV_CERT), env.get(ENV_KEY))
    if tls is None and not (_truthy(env.get(ENV_TLS)) or any(files)):
        return None
    config = TLSConfig.from_files(*files)
    if root_certificates is not None:
        return TLSConfig(root_certificates, config.certificate_chain, config.private_key)
    return config
