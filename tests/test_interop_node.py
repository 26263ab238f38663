"""Cross-language check: the Node.js client in tests/interop/client.js against the real server.

The client loads protos/ at run time with @grpc/proto-loader, so this checks the wire
contract (names, field numbers, enums, well-known types) from a second gRPC stack.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import grpc
import pytest
from google.protobuf import json_format, struct_pb2
from opscore_proto.v1 import dispatch_pb2, dispatch_pb2_grpc, lifecycle_pb2, lifecycle_pb2_grpc

try:
    from tests.support.procserver import REPO_ROOT, running_server
except ImportError:  # tests/ is not a package: pytest puts tests/ itself on sys.path
    from support.procserver import REPO_ROOT, running_server

CLIENT = REPO_ROOT / "tests" / "interop" / "client.js"
WORK_AGENT = REPO_ROOT / "tests" / "interop" / "workstream.js"
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


def _enqueue(
    target: str,
    text: str,
    credentials: grpc.ChannelCredentials | None = None,
    metadata: tuple[tuple[str, str], ...] = (),
) -> str:
    """Queue a `node.work` task for the Node agent (before it connects: it is
    assigned as soon as the agent's work stream opens)."""
    with (
        grpc.secure_channel(target, credentials)
        if credentials is not None
        else grpc.insecure_channel(target)
    ) as channel:
        stub = dispatch_pb2_grpc.DispatchServiceStub(channel)
        request = dispatch_pb2.EnqueueTaskRequest(
            capability="node.work", input=json_format.ParseDict({"text": text}, struct_pb2.Struct())
        )
        return stub.EnqueueTask(request, metadata=metadata, timeout=10).task.task_id


def _get_task(
    target: str,
    task_id: str,
    credentials: grpc.ChannelCredentials | None = None,
    metadata: tuple[tuple[str, str], ...] = (),
) -> dispatch_pb2.Task:
    with (
        grpc.secure_channel(target, credentials)
        if credentials is not None
        else grpc.insecure_channel(target)
    ) as channel:
        stub = dispatch_pb2_grpc.DispatchServiceStub(channel)
        request = dispatch_pb2.GetTaskRequest(task_id=task_id)
        return stub.GetTask(request, metadata=metadata, timeout=10).task


def _check_work_report(report: dict, task_id: str, context: str) -> None:
    assert report["ok"] is True, context
    assert report["accepted"]["agent_id"] == report["agent_id"], context
    assert report["accepted"]["max_in_flight"] == 1, context
    assert report["tasks"] == [{"task_id": task_id, "attempt": 1}], context
    # The heartbeat and the completion went in one message, answered in order.
    assert [(a["kind"], a["code"]) for a in report["answers"]] == [
        ("heartbeat", 0),
        ("completion", 0),
    ], context
    assert report["answers"][1]["task_state"] == "TASK_STATE_COMPLETED", context
    assert report["end"] == "OK", context  # half-closed: the server ended it with OK


def test_node_work_stream_agent(tmp_path: Path) -> None:
    """A Node agent on DispatchService.Connect: hello, an assignment, a heartbeat
    and the completion on the stream, their answers, a half-close."""
    assert NODE is not None
    with running_server(tmp_path) as server:
        task_id = _enqueue(server.target, "hello from python")
        result = subprocess.run(
            [NODE, str(WORK_AGENT), server.target],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        context = (
            f"node agent exit {result.returncode}\n"
            f"--- stdout ---\n{result.stdout}\n--- stderr ---\n{result.stderr}\n"
            f"{server.log_tail()}"
        )
        assert result.returncode == 0, context
        _check_work_report(json.loads(result.stdout), task_id, context)
        task = _get_task(server.target, task_id)
        assert task.state == dispatch_pb2.TASK_STATE_COMPLETED, context
        assert json_format.MessageToDict(task.output) == {
            "echo": "hello from python",
            "lang": "node",
        }, context
        assert json_format.MessageToDict(task.progress) == {"stage": "working"}, context
        assert task.assigned_agent_id == "node-interop-worker", context
        assert server.terminate() == 0, server.log_tail()


def _docs_node_agent() -> str:
    """The minimal Node.js agent of docs/agents.md, as printed there."""
    doc = (REPO_ROOT / "docs" / "agents.md").read_text()
    start = doc.index("```js\n", doc.index("### Agents in other languages")) + len("```js\n")
    return doc[start : doc.index("```\n", start)]


def test_docs_node_agent_works_and_leaves_cleanly(tmp_path: Path) -> None:
    """The Node.js agent the docs print completes a task, and on SIGTERM
    pauses, half-closes and exits 0 with its stream ended."""
    assert NODE is not None
    (tmp_path / "agent.js").write_text(_docs_node_agent())
    (tmp_path / "protos").symlink_to(REPO_ROOT / "protos")
    env = {**os.environ, "NODE_PATH": str(REPO_ROOT / "node_modules")}
    env.pop("OPSCORE_API_KEY", None)
    with running_server(tmp_path) as server:
        agent = subprocess.Popen(
            [NODE, str(tmp_path / "agent.js"), server.target],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            with grpc.insecure_channel(server.target) as channel:
                dispatch = dispatch_pb2_grpc.DispatchServiceStub(channel)
                lifecycle = lifecycle_pb2_grpc.LifecycleServiceStub(channel)
                text = json_format.ParseDict({"text": "one two three"}, struct_pb2.Struct())
                queued = dispatch.EnqueueTask(
                    dispatch_pb2.EnqueueTaskRequest(capability="text.count", input=text),
                    timeout=10,
                ).task
                deadline = time.monotonic() + 20
                while True:
                    task = dispatch.GetTask(
                        dispatch_pb2.GetTaskRequest(task_id=queued.task_id), timeout=10
                    ).task
                    if task.state == dispatch_pb2.TASK_STATE_COMPLETED:
                        break
                    assert agent.poll() is None, agent.communicate()
                    assert time.monotonic() < deadline, f"not completed: {task}"
                    time.sleep(0.05)
                assert json_format.MessageToDict(task.output) == {"words": 3}
                agent.send_signal(signal.SIGTERM)
                _, err = agent.communicate(timeout=20)
                assert agent.returncode == 0, err
                got = lifecycle.GetAgent(lifecycle_pb2.GetAgentRequest(agent_id="node-counter-1"))
                assert got.agent.open_subscriptions == 0
        finally:
            if agent.poll() is None:
                agent.kill()
                agent.communicate()
        assert server.terminate() == 0, server.log_tail()


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
    an agent principal, then the work-stream agent; a plaintext client is refused
    by the same server."""

    from opscore.security import keys

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
    operator_key = keys.generate_key()  # the test queues the work agent's task with it
    write_auth_file(
        auth,
        principal("node", "agent", agents=["node-interop-*"], subject=client.subject),
        principal("ops", "operator", key_hashes=(keys.hash_key(operator_key),)),
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

        # The work-stream agent over the same mTLS, acting as its certificate's
        # principal; the task is queued by an operator (an agent may not).
        operator = (("authorization", f"Bearer {operator_key}"),)
        task_id = _enqueue(server.target, "over mTLS", credentials, operator)
        worked = subprocess.run(
            [NODE, str(WORK_AGENT), server.target],
            cwd=REPO_ROOT,
            env=tls_env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        context = f"stdout:\n{worked.stdout}\nstderr:\n{worked.stderr}\n{server.log_tail()}"
        assert worked.returncode == 0, context
        _check_work_report(json.loads(worked.stdout), task_id, context)
        task = _get_task(server.target, task_id, credentials, operator)
        assert task.state == dispatch_pb2.TASK_STATE_COMPLETED, context
        assert json_format.MessageToDict(task.output)["echo"] == "over mTLS", context
        assert server.terminate() == 0, server.log_tail()
