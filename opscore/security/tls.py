"""TLS server credentials that follow the files on disk.

`grpc.dynamic_ssl_server_credentials` asks a fetcher for the certificate
configuration at the start of every TLS handshake (it works with grpc.aio: the
fetcher runs on a gRPC core thread, under the GIL). The fetcher here compares
the files' (mtime, size, inode) with what it last loaded and rereads them only
when they changed, or when SIGHUP asked for it (`request_reload`). So a
rotation is: write the new files (rename into place, or cert then key), and
the next handshake uses them. Connections already open keep the certificate
they were made with, so no stream drops.

A half-written rotation (a new certificate with the old key) is refused: the
pair is checked with the standard library's `ssl` before gRPC sees it, and the
old configuration stays until the files agree.
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path

import grpc

from opscore.errors import ConfigError

log = logging.getLogger("opscore.security.tls")

_Stamp = tuple[tuple[int, int, int], ...]


@dataclass(frozen=True, slots=True)
class _Material:
    cert: bytes
    key: bytes
    client_ca: bytes | None
    stamp: _Stamp


class ServerCertificates:
    def __init__(self, cert: str, key: str, client_ca: str | None = None) -> None:
        self.paths = tuple(p for p in (cert, key, client_ca) if p)
        self._cert, self._key, self._client_ca = cert, key, client_ca
        self._lock = threading.Lock()
        self._current: _Material | None = None
        self._forced = False
        #: How many times new files were taken up (tests and logs).
        self.reloads = 0

    @property
    def mutual(self) -> bool:
        return self._client_ca is not None

    def _stamp(self) -> _Stamp:
        out = []
        for p in self.paths:
            st = os.stat(p)
            out.append((st.st_mtime_ns, st.st_size, st.st_ino))
        return tuple(out)

    def _read(self) -> _Material:
        stamp = self._stamp()
        cert = Path(self._cert).read_bytes()
        key = Path(self._key).read_bytes()
        client_ca = Path(self._client_ca).read_bytes() if self._client_ca else None
        # Raises ssl.SSLError unless the key is the certificate's (and both parse).
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(self._cert, self._key)
        if client_ca is not None:
            ssl.create_default_context().load_verify_locations(cadata=client_ca.decode("ascii"))
        return _Material(cert, key, client_ca, stamp)

    def load(self) -> None:
        """The first read, at start: any problem is a ConfigError."""
        try:
            self._current = self._read()
        except (OSError, ssl.SSLError, ValueError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot use the TLS files {', '.join(self.paths)}: {exc}") from exc

    def _configuration(self, m: _Material) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration([(m.key, m.cert)], m.client_ca)

    def credentials(self) -> grpc.ServerCredentials:
        assert self._current is not None, "load() first"
        return grpc.dynamic_ssl_server_credentials(
            self._configuration(self._current),
            self._fetch,
            require_client_authentication=self.mutual,
        )

    def request_reload(self) -> None:
        """SIGHUP: the next handshake rereads the files even if they look unchanged."""
        self._forced = True

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        # Called by gRPC core before each handshake: None keeps the current config.
        with self._lock:
            current = self._current
            try:
                if not self._forced and current is not None and self._stamp() == current.stamp:
                    return None
                fresh = self._read()
            except (OSError, ssl.SSLError, ValueError, UnicodeDecodeError) as exc:
                log.error(
                    "TLS files changed but cannot be used; keeping the previous certificate",
                    extra={"files": list(self.paths), "error": str(exc)},
                )
                self._forced = False
                if current is not None:
                    # Do not retry on every handshake until the files change again.
                    self._current = _Material(
                        current.cert, current.key, current.client_ca, self._safe_stamp()
                    )
                return None
            self._forced = False
            if current is not None and (fresh.cert, fresh.key, fresh.client_ca) == (
                current.cert,
                current.key,
                current.client_ca,
            ):
                self._current = fresh
                return None
            self._current = fresh
            self.reloads += 1
        log.info("TLS certificate reloaded", extra={"files": list(self.paths)})
        return self._configuration(fresh)

    def _safe_stamp(self) -> _Stamp:
        try:
            return self._stamp()
        except OSError:
            return ()
