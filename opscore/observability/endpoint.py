"""The Prometheus scrape endpoint (`--metrics-listen HOST:PORT`).

prometheus_client's WSGI app renders the registry; a small threaded HTTP server
serves it off the event loop (scrapes read engine state through
metrics.EngineCollector, which hops onto the loop for that). Not authenticated:
bind it to loopback or a network only Prometheus reaches (docs/operations.md).
"""

from __future__ import annotations

import logging
import socket
import threading
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app

from opscore.config import listen_host
from opscore.errors import ConfigError

log = logging.getLogger("opscore.metrics")


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True


class _IPv6Server(_Server):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        return None  # one line per scrape would drown the server's own log


class MetricsEndpoint:
    def __init__(self, registry: CollectorRegistry, listen: str) -> None:
        self.registry = registry
        self.listen = listen
        self.port = 0
        self._httpd: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> int:
        host = listen_host(self.listen)
        port = int(self.listen.rpartition(":")[2])
        cls = _IPv6Server if ":" in host else _Server
        try:
            httpd = make_server(
                host, port, make_wsgi_app(self.registry), cls, handler_class=_QuietHandler
            )
        except OSError as exc:
            raise ConfigError(f"cannot serve metrics on {self.listen}: {exc.strerror}") from exc
        self._httpd = httpd
        self.port = httpd.server_port
        # A short poll interval: stop() waits for the serving loop to notice.
        self._thread = threading.Thread(
            target=httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="opscore-metrics",
            daemon=True,
        )
        self._thread.start()
        log.info("serving metrics", extra={"metrics_listen": self.listen, "port": self.port})
        return self.port

    def stop(self) -> None:
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        httpd.shutdown()
        httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
