"""Shared plumbing for the benchmark orchestrator: the server under test, load
generator processes, CPU/RSS measurement, statistics and result files.

Everything here runs in the orchestrator process (`python -m bench`). It never
generates load itself: load generators are separate processes (`python -m
bench.loadgen ROLE CONFIG_JSON`, see bench/loadgen.py) and the server is the real
`python -m opscore serve` in its own process.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc

REPO_ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable

# Every wait in the suite is bounded; these are the outer limits.
SERVER_START_TIMEOUT = 60.0
SERVER_STOP_TIMEOUT = 60.0
PROC_READY_TIMEOUT = 180.0


class BenchError(RuntimeError):
    """A scenario could not produce a figure (reported, the rest still runs)."""


class Unavailable(BenchError):
    """The service under test does not offer what the scenario needs (UNIMPLEMENTED)."""


# --------------------------------------------------------------------------- statistics


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of already sorted values (p in 0..100)."""
    if not sorted_values:
        return float("nan")
    if p <= 0:
        return sorted_values[0]
    k = max(0, min(len(sorted_values) - 1, int(-(-p * len(sorted_values) // 100)) - 1))
    return sorted_values[k]


def latency_summary(values: Iterable[float]) -> dict[str, float]:
    """p50/p90/p99/max/mean in milliseconds of latencies given in seconds."""
    s = sorted(values)
    if not s:
        return {"count": 0}
    ms = 1000.0
    return {
        "count": len(s),
        "p50_ms": percentile(s, 50) * ms,
        "p90_ms": percentile(s, 90) * ms,
        "p99_ms": percentile(s, 99) * ms,
        "max_ms": s[-1] * ms,
        "mean_ms": sum(s) / len(s) * ms,
    }


def median(values: Sequence[float]) -> float:
    s = sorted(values)
    n = len(s)
    if n == 0:
        return float("nan")
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def metric(values: Sequence[float], unit: str, better: str = "higher") -> dict[str, Any]:
    """A figure as the suite reports it: every repeat, and their median and range."""
    vals = [float(v) for v in values]
    return {
        "values": vals,
        "median": median(vals),
        "min": min(vals) if vals else float("nan"),
        "max": max(vals) if vals else float("nan"),
        "unit": unit,
        "better": better,
    }


# --------------------------------------------------------------------------- machine


def git_commit() -> dict[str, Any]:
    def run(*args: str) -> str:
        try:
            return subprocess.run(
                ["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10
            ).stdout.strip()
        except Exception:
            return ""

    return {
        "commit": run("rev-parse", "HEAD"),
        "describe": run("log", "-1", "--format=%h %s"),
        "dirty": bool(run("status", "--porcelain", "--untracked-files=no")),
    }


def python_speed_ms() -> float:
    """How fast this host runs Python right now: a fixed loop, best of 5, in ms.
    VMs of the same size have run the same code at 2,944 and at 988 tasks/s on
    two days (docs/benchmarks.md), so absolute figures from different hosts
    compare only beside this; the best of 5 leaves out a repeat that another
    process preempted."""
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        sum(range(1_000_000))
        best = min(best, time.perf_counter() - start)
    return round(best * 1000, 2)


def machine_info() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    versions: dict[str, str] = {}
    for dist in ("grpcio", "protobuf", "aiosqlite", "celery", "redis", "psutil"):
        try:
            from importlib.metadata import version

            versions[dist] = version(dist)
        except Exception:
            versions[dist] = "not installed"
    redis_bin = shutil.which("redis-server")
    if redis_bin:
        with contextlib.suppress(Exception):
            versions["redis-server"] = (
                subprocess.run([redis_bin, "--version"], capture_output=True, text=True, timeout=10)
                .stdout.split()[2]
                .removeprefix("v=")
            )
    import sqlite3

    versions["sqlite"] = sqlite3.sqlite_version
    vm = psutil.virtual_memory()
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": model,
        "memory_gib": round(vm.total / 2**30, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg_at_start": os.getloadavg(),
        "python_speed_ms_at_start": python_speed_ms(),
        "versions": versions,
    }


def now_stamp() -> str:
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")


# --------------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bench_env() -> dict[str, str]:
    env = dict(os.environ)
    # The load generators and baselines import `bench` from the repo root.
    env["PYTHONPATH"] = str(REPO_ROOT) + (
        os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else ""
    )
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def wait_health(target: str, deadline: float, alive: Any = None) -> None:
    """Block until grpc.health.v1 Check("") says SERVING (bounded by `deadline`)."""
    last = "no answer"
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if alive is not None and not alive():
                raise BenchError(f"process for {target} exited before serving")
            try:
                resp = stub.Check(
                    health_pb2.HealthCheckRequest(service=""),
                    timeout=max(0.05, min(2.0, deadline - time.monotonic())),
                    wait_for_ready=True,
                )
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    return
                last = f"status {resp.status}"
            except grpc.RpcError as e:
                last = f"{e.code()}: {e.details()}"
            time.sleep(0.02)
    raise BenchError(f"{target} not SERVING in time ({last})")


@dataclass
class ServerUnderTest:
    """`python -m opscore serve` (or a baseline server) in its own process."""

    cmd: list[str]
    port: int
    db: Path | None
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    env: dict[str, str] | None = None
    start_seconds: float = 0.0
    exit_code: int | None = None
    _log: Any = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        self._log = open(self.log_path, "ab")
        t0 = time.monotonic()
        self.proc = subprocess.Popen(
            self.cmd,
            cwd=REPO_ROOT,
            env={**_bench_env(), **(self.env or {})},
            stdout=self._log,
            stderr=self._log,
        )
        try:
            wait_health(
                self.target,
                time.monotonic() + SERVER_START_TIMEOUT,
                alive=lambda: self.proc is not None and self.proc.poll() is None,
            )
        except BaseException as e:
            self.kill()
            raise BenchError(f"server did not start: {' '.join(self.cmd)}\n{self.tail()}") from e
        self.start_seconds = time.monotonic() - t0

    def tail(self, n: int = 15) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        return ""

    def stop(self) -> int:
        """SIGTERM and wait; a server that does not drain in time is killed and fails."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.exit_code = self.proc.wait(timeout=SERVER_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.kill()
            raise BenchError(f"server pid {self.proc.pid} ignored SIGTERM; killed") from None
        finally:
            if self._log:
                self._log.close()
        return self.exit_code

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            with contextlib.suppress(Exception):
                self.proc.wait(timeout=10)


def opscore_cmd(
    port: int,
    db: Path,
    log_level: str = "WARNING",
    *extra: str,
    launcher: Sequence[str] = ("-m", "opscore"),
) -> list[str]:
    # Default durability: no --sync flag, so the server's default (sync=full) applies.
    return [
        PY,
        *launcher,
        "serve",
        "--listen",
        f"127.0.0.1:{port}",
        "--db",
        str(db),
        "--log-level",
        log_level,
        *extra,
    ]


@contextlib.contextmanager
def opscore_server(
    workdir: Path,
    log_level: str = "WARNING",
    db: Path | None = None,
    tag: str = "server",
    extra: Sequence[str] = (),
    launcher: Sequence[str] = ("-m", "opscore"),
    env: dict[str, str] | None = None,
) -> Iterator[ServerUnderTest]:
    """A fresh `opscore serve` on a free loopback port, stopped with SIGTERM after.
    `extra`: more `opscore serve` options; `launcher`: what runs `opscore` (e.g.
    bench.tools.gcserve, which records GC pauses); `env`: more environment.

    The server's exit code is checked: a non-zero exit fails the run.
    """
    port = free_port()
    db = db or workdir / f"{tag}-{port}.db"
    cmd = opscore_cmd(port, db, log_level, *extra, launcher=launcher)
    srv = ServerUnderTest(cmd, port, db, workdir / f"{tag}-{port}.log", env=env)
    srv.start()
    try:
        yield srv
    except BaseException:
        srv.kill()
        raise
    code = srv.stop()
    if code != 0:
        raise BenchError(f"server exited with code {code} after SIGTERM\n{srv.tail()}")


@contextlib.contextmanager
def bare_server(workdir: Path, tag: str) -> Iterator[ServerUnderTest]:
    """The bare grpc.aio baseline (bench/baselines/bare_grpc.py) on a free loopback
    port, on uvloop as the server under test; stopped with SIGTERM after."""
    port = free_port()
    cmd = [PY, "-m", "bench.baselines.bare_grpc", "--listen", f"127.0.0.1:{port}"]
    srv = ServerUnderTest([*cmd, "--event-loop", "uvloop"], port, None, workdir / f"{tag}-bare.log")
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def remove_db(db: Path | None) -> None:
    if db is None:
        return
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            Path(str(db) + suffix).unlink()


class LoadGen:
    """One load generator process: `python -m bench.loadgen ROLE CONFIG`.

    Protocol on its stdout, one line each: `READY`, then `P <n>` progress lines,
    then `RESULT <json>`. On its stdin it reads `GO` and `STOP`.
    """

    def __init__(self, role: str, config: dict[str, Any], log_path: Path) -> None:
        self.role = role
        self.config = config
        self._log = open(log_path, "ab")
        self.cmd = [PY, "-m", "bench.loadgen", role, json.dumps(config)]
        self.proc = subprocess.Popen(
            self.cmd,
            cwd=REPO_ROOT,
            env=_bench_env(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            bufsize=1,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.progress = 0
        self.result: dict[str, Any] | None = None
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.log_path = log_path

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            line = line.rstrip("\n")
            if line.startswith("P "):
                with contextlib.suppress(ValueError):
                    self.progress = int(line[2:])
                continue
            if line.startswith("RESULT "):
                self.result = json.loads(line[7:])
            self.lines.put(line)
        self.lines.put(None)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self, timeout: float = PROC_READY_TIMEOUT, word: str = "READY") -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise BenchError(f"{self.role} not {word} within {timeout:.0f}s") from None
            if line is None:
                raise BenchError(f"{self.role} exited before {word}:\n{self.tail()}")
            if line == word:
                return

    def send(self, word: str) -> None:
        assert self.proc.stdin is not None
        with contextlib.suppress(BrokenPipeError, OSError):
            self.proc.stdin.write(word + "\n")
            self.proc.stdin.flush()

    def wait_result(self, timeout: float) -> dict[str, Any]:
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise BenchError(f"{self.role} did not finish within {timeout:.0f}s") from None
        self._reader.join(timeout=10)
        if code != 0 or self.result is None:
            raise BenchError(f"{self.role} failed (exit {code}):\n{self.tail()}")
        self._log.close()
        return self.result

    def done(self) -> bool:
        return self.proc.poll() is not None

    def tail(self, n: int = 20) -> str:
        self._log.flush()
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        return ""

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            with contextlib.suppress(Exception):
                self.proc.wait(timeout=10)


@contextlib.contextmanager
def loadgens(gens: list[LoadGen]) -> Iterator[list[LoadGen]]:
    try:
        yield gens
    finally:
        for g in gens:
            g.kill()


# --------------------------------------------------------------------------- CPU


@dataclass
class CpuMeter:
    """CPU seconds used by groups of processes between start() and stop()."""

    groups: dict[str, list[int]]
    _before: dict[int, float] = field(default_factory=dict)
    _after: dict[int, float] = field(default_factory=dict)
    t0: float = 0.0
    t1: float = 0.0

    @staticmethod
    def _cpu(pid: int) -> float:
        """User+system seconds of a process and of its children (celery's pool)."""
        try:
            p = psutil.Process(pid)
            total = sum(p.cpu_times()[:2])
            for child in p.children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    total += sum(child.cpu_times()[:2])
            return total
        except psutil.Error:
            return 0.0

    def start(self) -> None:
        self.t0 = time.monotonic()
        self._before = {pid: self._cpu(pid) for pids in self.groups.values() for pid in pids}

    def stop(self) -> None:
        self.t1 = time.monotonic()
        self._after = {pid: self._cpu(pid) for pids in self.groups.values() for pid in pids}

    def result(self, reported: dict[str, float] | None = None) -> dict[str, Any]:
        """`reported`: CPU seconds a group's processes measured themselves (used for
        load generators that have exited before stop(); psutil cannot see them)."""
        wall = max(1e-9, self.t1 - self.t0)
        out: dict[str, Any] = {"wall_s": wall}
        for name, pids in self.groups.items():
            if reported and name in reported:
                secs = reported[name]
                out[f"{name}_cpu_s"] = secs
                out[f"{name}_cores"] = secs / wall
                continue
            secs = sum(max(0.0, self._after.get(p, 0.0) - self._before.get(p, 0.0)) for p in pids)
            out[f"{name}_cpu_s"] = secs
            out[f"{name}_cores"] = secs / wall
        return out


def rss_bytes(pid: int) -> int:
    return psutil.Process(pid).memory_info().rss


# --------------------------------------------------------------------------- results


@dataclass
class Context:
    """What every scenario gets from the orchestrator."""

    out_dir: Path
    work_dir: Path
    quick: bool
    repeats: int
    command: str
    git: dict[str, Any]
    machine: dict[str, Any]
    log: Any = print

    def say(self, msg: str) -> None:
        self.log(msg)


def write_result(ctx: Context, scenario: str, body: dict[str, Any]) -> Path:
    doc = {
        "scenario": scenario,
        "quick": ctx.quick,
        "repeats": ctx.repeats,
        "command": ctx.command,
        "git": ctx.git,
        "machine": ctx.machine,
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
        **body,
    }
    path = ctx.out_dir / f"{scenario}.json"
    path.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    return path
