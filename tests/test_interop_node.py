"""Cross-language check: the Node.js client in tests/interop/client.js against the real server.

The client loads protos/ at run time with @grpc/proto-loader, so this checks the wire
contract (names, field numbers, enums, well-known types) from a second gRPC stack.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

try:
    from tests.support.procserver import REPO_ROOT, running_server
except ImportError:  # tests/ is not a package: pytest puts tests/ itself on sys.path
    from support.procserver import REPO_ROOT, running_server

CLIENT = REPO_ROOT / "tests" / "interop" / "client.js"
NODE = shutil.which("node")
GRPC_JS = REPO_ROOT / "node_modules" / "@grpc" / "grpc-js"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(NODE is None, reason="node is not on PATH"),
    pytest.mark.skipif(
        not GRPC_JS.is_dir(),
        reason="node_modules/@grpc/grpc-js missing (run `npm install` or `make lint`)",
    ),
]


def test_node_client_against_real_server(tmp_path: Path) -> None:
    assert NODE is not None
    with running_server(tmp_path) as server:
        result = subprocess.run(
            [NODE, str(CLIENT), server.target],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        context = (
            f"node client exit {result.returncode}\n"
            f"--- stdout ---\n{result.stdout}\n--- stderr ---\n{result.stderr}\n"
            f"{server.log_tail()}"
        )
        assert result.returncode == 0, context
        lines = [line for line in result.stdout.splitlines() if line.strip()]
        assert len(lines) == 1, context
        report = json.loads(lines[0])
        assert report["ok"] is True, context
        assert report["health"] == "SERVING", context
        assert report["agent_id"] == "node-interop-agent", context
        assert report["state"] == "AGENT_STATE_IDLE", context
        assert "node.echo" in report["capabilities"], context
        assert report["metadata"] == {"lang": "node"}, context
        assert report["state_details_from"] == "node", context
        # Fresh database: this run created the agent and recorded the IDLE report.
        assert report["created"] is True, context
        assert report["idle_transitions"] >= 1, context
        assert report["latest_transition"]["to_state"] == "AGENT_STATE_IDLE", context

        code = server.terminate()
        assert code == 0, f"server exit code after SIGTERM: {code}\n{server.log_tail()}"
    assert server.proc.returncode == 0


def test_node_client_sends_api_key(tmp_path: Path) -> None:
    """With API keys configured, the client authenticates with OPSCORE_API_KEY, and
    without it the server refuses it (the client exits non-zero and says why)."""
    assert NODE is not None
    key = "node-interop-key"
    with running_server(tmp_path, env={"OPSCORE_API_KEYS": key}) as server:
        base_env = {k: v for k, v in os.environ.items() if k != "OPSCORE_API_KEY"}

        denied = subprocess.run(
            [NODE, str(CLIENT), server.target],
            cwd=REPO_ROOT,
            env=base_env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        context = f"stdout:\n{denied.stdout}\nstderr:\n{denied.stderr}\n{server.log_tail()}"
        assert denied.returncode == 1, context
        assert denied.stdout == "", context
        assert "FAILED at RegisterAgent" in denied.stderr, context
        assert "UNAUTHENTICATED" in denied.stderr, context

        allowed = subprocess.run(
            [NODE, str(CLIENT), server.target],
            cwd=REPO_ROOT,
            env={**base_env, "OPSCORE_API_KEY": key},
            capture_output=True,
            text=True,
            timeout=60,
        )
        context = f"stdout:\n{allowed.stdout}\nstderr:\n{allowed.stderr}\n{server.log_tail()}"
        assert allowed.returncode == 0, context
        assert json.loads(allowed.stdout)["state"] == "AGENT_STATE_IDLE", context

        assert server.terminate() == 0, server.log_tail()
