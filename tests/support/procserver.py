"""Run the real Ops-Core server as a subprocess, for end-to-end tests.

    with running_server(tmp_path) as server:
        channel = grpc.insecure_channel(server.target)
        ...
        assert server.terminate() == 0, server.log_tail()

`running_server` starts `python -m opscore serve --listen 127.0.0.1:<port> --db <db>`,
waits (with a deadline) until the port accepts connections and the gRPC health check
for "" answers SERVING, and on exit stops the server if the test has not. The server's
stderr (its JSON log) goes to a file in tmp_path; `log_tail()` returns its end for
assertion messages.

Crash/restart tests: start it again with the same tmp_path (and so the same db file),
optionally the same `port=`; each start logs to its own file.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_STARTUP_TIMEOUT = 30.0
DEFAULT_STOP_TIMEOUT = 15.0

_start_counter = itertools.count(1)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, lines: int) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return "(no server log)"
    return "\n".join(text.splitlines()[-lines:])


@dataclass
class ServerProcess:
    """A started server. `target` is what grpc channels and clients connect to."""

    proc: subprocess.Popen[bytes]
    port: int
    db_path: Path | str
    log_path: Path
    args: list[str] = field(default_factory=list)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of the server's stderr, labelled, for assertion messages."""
        return f"--- server stderr ({self.log_path}) ---\n{_tail(self.log_path, lines)}"

    def kill(self) -> int:
        """SIGKILL (a crash: no cleanup). Returns the exit code (-9)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        return self.proc.wait(timeout=DEFAULT_STOP_TIMEOUT)

    def terminate(self, timeout: float = DEFAULT_STOP_TIMEOUT) -> int:
        """SIGTERM, then wait for the exit. Returns the exit code.

        If the server is still running after `timeout` seconds it is killed and an
        AssertionError is raised: a server must shut down cleanly on SIGTERM.
        """
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=DEFAULT_STOP_TIMEOUT)
            raise AssertionError(
                f"server did not exit within {timeout}s of SIGTERM; killed\n{self.log_tail()}"
            ) from None


def _wait_serving(
    server: ServerProcess,
    deadline: float,
    metadata: list[tuple[str, str]] | None,
    credentials: grpc.ChannelCredentials | None = None,
) -> None:
    """Return once the server answers SERVING for "", or raise AssertionError.

    Polls, until `deadline`: the process is alive; the port accepts a TCP
    connection; then the gRPC channel becomes ready and Health.Check("") says
    SERVING. Each step blocks on the real condition with a short timeout.
    """
    last_error = "never got a TCP connection"

    def remaining() -> float:
        return deadline - time.monotonic()

    def check_alive() -> None:
        code = server.proc.poll()
        if code is not None:
            raise AssertionError(
                f"server exited with code {code} before serving\n{server.log_tail()}"
            )

    # 1. The port accepts connections. A refused connect returns at once, so back
    # off a little between attempts rather than spinning.
    while True:
        check_alive()
        if remaining() <= 0:
            raise AssertionError(
                f"server port {server.port} not accepting connections: {last_error}\n"
                f"{server.log_tail()}"
            )
        try:
            with socket.create_connection(("127.0.0.1", server.port), timeout=1.0):
                break
        except OSError as e:
            last_error = repr(e)
            time.sleep(0.05)

    # 2. gRPC channel ready and health SERVING.
    channel_cm = (
        grpc.secure_channel(server.target, credentials)
        if credentials is not None
        else grpc.insecure_channel(server.target)
    )
    with channel_cm as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        ready = grpc.channel_ready_future(channel)
        while True:
            check_alive()
            if remaining() <= 0:
                raise AssertionError(
                    f"server on {server.target} not SERVING in time: {last_error}\n"
                    f"{server.log_tail()}"
                )
            try:
                ready.result(timeout=min(1.0, max(remaining(), 0.01)))
            except grpc.FutureTimeoutError:
                last_error = "gRPC channel not ready"
                continue
            try:
                resp = stub.Check(
                    health_pb2.HealthCheckRequest(service=""),
                    timeout=min(2.0, max(remaining(), 0.01)),
                    metadata=metadata,
                    wait_for_ready=True,
                )
            except grpc.RpcError as e:
                last_error = f"Health.Check failed: {e.code()}: {e.details()}"
                if e.code() not in (
                    grpc.StatusCode.UNAVAILABLE,
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    grpc.StatusCode.NOT_FOUND,
                ):
                    raise AssertionError(f"{last_error}\n{server.log_tail()}") from e
                # NOT_FOUND / UNAVAILABLE: health service not registered yet.
                time.sleep(0.05)
                continue
            if resp.status == health_pb2.HealthCheckResponse.SERVING:
                return
            last_error = (
                "Health.Check status "
                f"{health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)}"
            )
            # NOT_SERVING while starting up: ask again shortly.
            time.sleep(0.05)


@contextlib.contextmanager
def running_server(
    tmp_path: Path,
    *extra_args: str,
    env: Mapping[str, str] | None = None,
    port: int | None = None,
    db_path: Path | str | None = None,
    startup_timeout: float = DEFAULT_STARTUP_TIMEOUT,
    credentials: grpc.ChannelCredentials | None = None,
) -> Iterator[ServerProcess]:
    """Start `python -m opscore serve` and yield a ServerProcess once it is SERVING.

    extra_args are appended to the command line. env entries are added to (and
    override) the current environment. port defaults to a free one; db_path to
    tmp_path / "x.db". If OPSCORE_API_KEY is set in the resulting environment, the
    readiness health check sends it as `authorization: Bearer <key>`. A server
    started with TLS needs `credentials` for that check (grpc.ssl_channel_credentials).

    On exit a server still running gets SIGTERM, then SIGKILL if it does not stop.
    """
    port = port if port is not None else free_port()
    db_path = db_path if db_path is not None else tmp_path / "x.db"
    n = next(_start_counter)
    log_path = tmp_path / f"server-{n}.stderr.log"
    stdout_path = tmp_path / f"server-{n}.stdout.log"
    args = [
        sys.executable,
        "-m",
        "opscore",
        "serve",
        "--listen",
        f"127.0.0.1:{port}",
        "--db",
        str(db_path),
        *extra_args,
    ]
    full_env = dict(os.environ)
    full_env["PYTHONUNBUFFERED"] = "1"
    if env:
        full_env.update(env)
    api_key = full_env.get("OPSCORE_API_KEY")
    metadata = [("authorization", f"Bearer {api_key}")] if api_key else None

    with open(log_path, "wb") as err, open(stdout_path, "wb") as out:
        proc = subprocess.Popen(
            args,
            cwd=REPO_ROOT,
            env=full_env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
        )
    server = ServerProcess(proc=proc, port=port, db_path=db_path, log_path=log_path, args=args)
    try:
        _wait_serving(server, time.monotonic() + startup_timeout, metadata, credentials)
        yield server
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=DEFAULT_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=DEFAULT_STOP_TIMEOUT)
