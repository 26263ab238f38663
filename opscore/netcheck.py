"""Is the listen address free? Asked before anything else starts, so that a port
in the way gives one clear line (naming who holds it, where Linux can tell)
instead of gRPC core's log line and a database opened for nothing."""

from __future__ import annotations

import contextlib
import errno
import os
import socket
from pathlib import Path

from opscore.errors import ConfigError


def check_port_free(listen: str) -> None:
    host, _, port_text = listen.rpartition(":")
    host = host.strip("[]")
    port = int(port_text)
    if port == 0:
        return  # the kernel picks a free one
    try:
        infos = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise ConfigError(f"cannot listen on {listen}: {host!r} does not resolve ({exc})") from None
    for family, kind, proto, _, address in infos:
        with socket.socket(family, kind, proto) as s:
            # As gRPC does: connections of an earlier server lingering in TIME_WAIT
            # must not count as "in use", only a socket that listens.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                with contextlib.suppress(OSError):
                    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                s.bind(address)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    who = _holder(port)
                    raise ConfigError(
                        f"cannot listen on {listen}: the port is already in use"
                        + (f" by {who}" if who else "")
                        + "; stop it or choose another --listen"
                    ) from None
                if exc.errno == errno.EADDRNOTAVAIL:
                    raise ConfigError(
                        f"cannot listen on {listen}: {host} is not an address of this machine"
                    ) from None
                if exc.errno == errno.EACCES:
                    raise ConfigError(
                        f"cannot listen on {listen}: permission denied (ports below 1024 "
                        "need privileges)"
                    ) from None
                raise ConfigError(f"cannot listen on {listen}: {exc.strerror}") from None


def _holder(port: int) -> str:
    """'pid 123 (python3 -m opscore serve ...)' for the process listening on `port`,
    when /proc lets us see it; '' otherwise."""
    inodes = _listening_inodes(port)
    if not inodes:
        return ""
    proc = Path("/proc")
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in (entry / "fd").iterdir():
                link = os.readlink(fd)
                if link.startswith("socket:[") and link[8:-1] in inodes:
                    cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").strip()
                    return f"pid {entry.name} ({cmd.decode(errors='replace')[:120]})"
    return "another process"


def _listening_inodes(port: int) -> set[str]:
    found: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                cols = line.split()
                if len(cols) > 9 and cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:
                    found.add(cols[9])
    return found
