"""`opscore serve` configured by environment variables alone (DESIGN §6)."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opscore_proto.v1 import lifecycle_pb2 as pb
from opscore_proto.v1 import lifecycle_pb2_grpc

from tests.support.procserver import REPO_ROOT, ServerProcess, _wait_serving, free_port


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_serve_from_environment_then_sigint(tmp_path: Path):
    port = free_port()
    db = tmp_path / "from-env" / "ops.db"
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPSCORE_")}
    env.update(
        OPSCORE_LISTEN=f"127.0.0.1:{port}",
        OPSCORE_DB=str(db),
        OPSCORE_LOG_FORMAT="json",
        PYTHONUNBUFFERED="1",
    )
    log_path = tmp_path / "serve.stderr.log"
    with open(log_path, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "opscore", "serve"],
            cwd=REPO_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    server = ServerProcess(proc=proc, port=port, db_path=db, log_path=log_path)
    try:
        _wait_serving(server, time.monotonic() + 30, None)
        with grpc.insecure_channel(server.target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            resp = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
            lifecycle = lifecycle_pb2_grpc.LifecycleServiceStub(channel)
            lifecycle.RegisterAgent(pb.RegisterAgentRequest(agent_id="env-agent"), timeout=5)
        assert db.exists(), server.log_tail()

        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=20)
        assert code == 0, server.log_tail()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)

    lines = []
    for raw in log_path.read_text().splitlines():
        try:
            lines.append(json.loads(raw))
        except ValueError:
            continue
    serving = [line for line in lines if line.get("message") == "serving"]
    assert serving and serving[0]["port"] == port and serving[0]["db"] == str(db), lines
    assert any(line.get("message") == "stopped" for line in lines), server.log_tail()

    # What was acknowledged is in the file OPSCORE_DB named.
    conn = sqlite3.connect(db)
    try:
        rows = conn.execute("SELECT agent_id FROM agents").fetchall()
    finally:
        conn.close()
    assert rows == [("env-agent",)]
