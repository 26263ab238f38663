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


def test_node_client_over_mtls(tmp_path: Path) -> None:
    """The same client over TLS with a client certificate (mTLS) whose subject names
    an agent principal; a plaintext client is refused by the same server."""
    import grpc

    try:
        from tests.support.certs import CertificateAuthority
        from tests.support.security import principal, write_auth_file
    except ImportError:
        from support.certs import CertificateAuthority
        from support.security import principal, write_auth_file

    assert NODE is not None
    ca = CertificateAuthority("interop-ca")
    ca_path = ca.write(tmp_path / "ca.crt")
    server_cert, server_key = ca.issue("localhost", server=True).write(tmp_path / "server")
    client = ca.issue("node-interop", organization="Interop")
    client_cert, client_key = client.write(tmp_path / "client")
    auth = tmp_path / "auth.toml"
    write_auth_file(
        auth,
        principal("node", "agent", agents=["node-interop-*"], subject=client.subject),
        with_keys=False,
    )
    credentials = grpc.ssl_channel_credentials(ca.cert_pem, client.key_pem, client.cert_pem)
    args = ("--tls-cert", str(server_cert), "--tls-key", str(server_key))
    args += ("--tls-client-ca", str(ca_path), "--auth-file", str(auth))
    with running_server(tmp_path, *args, credentials=credentials) as server:
        base_env = {k: v for k, v in os.environ.items() if not k.startswith("OPSCORE_")}
        plain = subprocess.run(
            [NODE, str(CLIENT), server.target],
            cwd=REPO_ROOT,
            env={**base_env, "INTEROP_DEADLINE_MS": "3000"},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert plain.returncode == 1, f"{plain.stdout}\n{plain.stderr}"
        tls_env = {
            **base_env,
            "OPSCORE_TLS_CA": str(ca_path),
            "OPSCORE_TLS_CLIENT_CERT": str(client_cert),
            "OPSCORE_TLS_CLIENT_KEY": str(client_key),
        }
        result = subprocess.run(
            [NODE, str(CLIENT), server.target],
            cwd=REPO_ROOT,
            env=tls_env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        context = f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}\n{server.log_tail()}"
        assert result.returncode == 0, context
        report = json.loads(result.stdout)
        assert report["state"] == "AGENT_STATE_IDLE", context
        assert report["agent_id"] == "node-interop-agent", context
        assert server.terminate() == 0, server.log_tail()
