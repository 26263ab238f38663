"""Authentication (API keys), its exemptions, and the configuration that decides
whether the server may start without it (DESIGN §6)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from opscore_proto.v1 import dispatch_pb2
from opscore_proto.v1 import lifecycle_pb2 as pb

from opscore.config import from_sources
from opscore.errors import ConfigError
from tests.conftest import StreamReader, expect_error
from tests.support.procserver import REPO_ROOT

KEYS = frozenset({"k1", "k2"})


def bearer(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


# ------------------------------------------------------------------ API keys on RPCs


async def test_call_without_key_is_unauthenticated(make_harness):
    h = await make_harness(api_keys=KEYS)
    await expect_error(
        h.lifecycle.ListAgents(pb.ListAgentsRequest()),
        grpc.StatusCode.UNAUTHENTICATED,
        "authorization",
    )


async def test_wrong_key_is_unauthenticated(make_harness):
    h = await make_harness(api_keys=KEYS)
    err = await expect_error(
        h.lifecycle.ListAgents(pb.ListAgentsRequest(), metadata=bearer("k3")),
        grpc.StatusCode.UNAUTHENTICATED,
    )
    assert "not recognised" in err.details()
    # A key that is a prefix of a valid one is not valid either.
    await expect_error(
        h.lifecycle.ListAgents(pb.ListAgentsRequest(), metadata=bearer("k")),
        grpc.StatusCode.UNAUTHENTICATED,
    )


async def test_non_bearer_scheme_is_malformed(make_harness):
    h = await make_harness(api_keys=KEYS)
    await expect_error(
        h.lifecycle.ListAgents(pb.ListAgentsRequest(), metadata=(("authorization", "Basic xyz"),)),
        grpc.StatusCode.UNAUTHENTICATED,
        "malformed",
    )
    await expect_error(
        h.lifecycle.ListAgents(pb.ListAgentsRequest(), metadata=(("authorization", "Bearer"),)),
        grpc.StatusCode.UNAUTHENTICATED,
        "malformed",
    )


async def test_either_configured_key_is_accepted(make_harness):
    h = await make_harness(api_keys=KEYS)
    first = await h.lifecycle.RegisterAgent(
        pb.RegisterAgentRequest(agent_id="a1"), metadata=bearer("k1")
    )
    assert first.agent.agent_id == "a1"
    listed = await h.lifecycle.ListAgents(pb.ListAgentsRequest(), metadata=bearer("k2"))
    assert [a.agent_id for a in listed.agents] == ["a1"]
    # The scheme is case-insensitive, as HTTP's is.
    got = await h.lifecycle.GetAgent(
        pb.GetAgentRequest(agent_id="a1"), metadata=(("authorization", "bearer k2"),)
    )
    assert got.agent.agent_id == "a1"


async def test_refused_call_changes_nothing(make_harness):
    h = await make_harness(api_keys=KEYS)
    await expect_error(
        h.lifecycle.RegisterAgent(pb.RegisterAgentRequest(agent_id="sneaky")),
        grpc.StatusCode.UNAUTHENTICATED,
    )
    await expect_error(
        h.lifecycle.GetAgent(pb.GetAgentRequest(agent_id="sneaky"), metadata=bearer("k1")),
        grpc.StatusCode.NOT_FOUND,
    )


async def test_subscription_without_key_is_unauthenticated(make_harness):
    h = await make_harness(api_keys=KEYS)
    await h.lifecycle.RegisterAgent(pb.RegisterAgentRequest(agent_id="a1"), metadata=bearer("k1"))
    reader = StreamReader(
        h.dispatch.SubscribeTasks(dispatch_pb2.SubscribeTasksRequest(agent_id="a1"))
    )
    await reader.done.wait()
    assert isinstance(reader.error, grpc.aio.AioRpcError), reader.error
    assert reader.error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert reader.queue.empty()
    # The refused subscription did not count as the agent getting ready.
    got = await h.lifecycle.GetAgent(pb.GetAgentRequest(agent_id="a1"), metadata=bearer("k1"))
    assert got.agent.state == pb.AgentState.AGENT_STATE_INITIALIZING


async def test_health_and_reflection_need_no_key(make_harness):
    h = await make_harness(api_keys=KEYS)
    health = health_pb2_grpc.HealthStub(h.channel)
    resp = await health.Check(health_pb2.HealthCheckRequest(service=""))
    assert resp.status == health_pb2.HealthCheckResponse.SERVING

    stub = reflection_pb2_grpc.ServerReflectionStub(h.channel)
    call = stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    )
    responses = [r async for r in call]
    assert len(responses) == 1
    assert responses[0].WhichOneof("message_response") == "list_services_response"
    names = {s.name for s in responses[0].list_services_response.service}
    assert {
        "opscore.v1.LifecycleService",
        "opscore.v1.DispatchService",
        "opscore.v1.WorkflowService",
        "grpc.health.v1.Health",
    } <= names


# ------------------------------------------------------------------ configuration


def test_non_loopback_without_keys_refuses_to_start():
    with pytest.raises(ConfigError, match="--insecure"):
        from_sources({"listen": "0.0.0.0:50051"}, env={})


def test_non_loopback_with_env_keys_starts():
    # Keys alone are not enough off loopback: they would travel in clear text.
    with pytest.raises(ConfigError, match="without TLS"):
        from_sources({"listen": "0.0.0.0:50051"}, env={"OPSCORE_API_KEYS": "a,b"})
    tls = {"OPSCORE_TLS_CERT": "server.crt", "OPSCORE_TLS_KEY": "server.key"}
    cfg = from_sources({"listen": "0.0.0.0:50051"}, env={"OPSCORE_API_KEYS": "a,b", **tls})
    assert cfg.api_keys == {"a", "b"}
    assert cfg.auth_enabled
    assert cfg.listen == "0.0.0.0:50051"
    # Blanks and spaces around the commas are not keys.
    cfg = from_sources({}, env={"OPSCORE_API_KEYS": " a , ,b,"})
    assert cfg.api_keys == {"a", "b"}


def test_non_loopback_insecure_starts_without_keys():
    cfg = from_sources({"listen": "0.0.0.0:50051", "insecure": True}, env={})
    assert cfg.insecure and not cfg.auth_enabled
    cfg = from_sources({"listen": "0.0.0.0:50051"}, env={"OPSCORE_INSECURE": "1"})
    assert cfg.insecure


def test_loopback_without_keys_is_allowed():
    for listen in ("127.0.0.1:1", "localhost:1", "[::1]:1"):
        cfg = from_sources({"listen": listen}, env={})
        assert not cfg.auth_enabled and not cfg.insecure


def test_api_key_file_skips_blank_and_comment_lines(tmp_path: Path):
    path = tmp_path / "keys"
    path.write_text("# production keys\n\nkey-one\n   \n  key-two  \n#key-three\n")
    cfg = from_sources({"api_key_file": str(path)}, env={})
    assert cfg.api_keys == {"key-one", "key-two"}
    # The file adds to the environment's keys.
    cfg = from_sources({"api_key_file": str(path)}, env={"OPSCORE_API_KEYS": "env-key"})
    assert cfg.api_keys == {"key-one", "key-two", "env-key"}


def test_missing_api_key_file_is_a_config_error(tmp_path: Path):
    with pytest.raises(ConfigError, match="cannot read API key file"):
        from_sources({"api_key_file": str(tmp_path / "absent")}, env={})


@pytest.mark.parametrize("listen", ["nohost", "host:", ":50051", "host:port"])
def test_invalid_listen_is_a_config_error(listen: str):
    with pytest.raises(ConfigError, match="HOST:PORT"):
        from_sources({"listen": listen}, env={})


def test_environment_is_read_and_options_win():
    env = {
        "OPSCORE_LISTEN": "127.0.0.1:6000",
        "OPSCORE_DB": "/tmp/env.db",
        "OPSCORE_LOG_FORMAT": "text",
    }
    cfg = from_sources({}, env=env)
    assert (cfg.listen, cfg.db, cfg.log_format) == ("127.0.0.1:6000", "/tmp/env.db", "text")
    cfg = from_sources({"listen": "127.0.0.1:7000", "db": "/tmp/opt.db", "log_format": None}, env)
    assert (cfg.listen, cfg.db, cfg.log_format) == ("127.0.0.1:7000", "/tmp/opt.db", "text")
    cfg = from_sources({"log_format": "json"}, env=env)
    assert cfg.log_format == "json" and cfg.listen == "127.0.0.1:6000"
    # Nothing given: the documented defaults.
    cfg = from_sources({}, env={})
    assert (cfg.listen, cfg.db, cfg.log_format) == ("127.0.0.1:50051", "./opscore.db", "json")


# ------------------------------------------------------------------ command line


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("OPSCORE_")}


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_serve_refuses_non_loopback_without_keys(tmp_path: Path):
    db = tmp_path / "refused.db"
    proc = subprocess.run(
        [sys.executable, "-m", "opscore", "serve", "--listen", "0.0.0.0:0", "--db", str(db)],
        cwd=REPO_ROOT,
        env=_clean_env(),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr
    assert "--insecure" in proc.stderr
    assert not db.exists(), "a refused start must not create the database"


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_serve_help_lists_options():
    proc = subprocess.run(
        [sys.executable, "-m", "opscore", "serve", "--help"],
        cwd=REPO_ROOT,
        env=_clean_env(),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    for option in (
        "--listen",
        "--db",
        "--workflows-dir",
        "--log-level",
        "--log-format",
        "--api-key-file",
        "--insecure",
        "--auth-file",
        "--tls-cert",
        "--tls-key",
        "--tls-client-ca",
    ):
        assert option in proc.stdout, f"{option} missing from:\n{proc.stdout}"


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_serve_refuses_a_missing_auth_file(tmp_path: Path):
    db = tmp_path / "refused.db"
    proc = subprocess.run(
        [sys.executable, "-m", "opscore", "serve", "--listen", "127.0.0.1:0", "--db", str(db),
         "--auth-file", str(tmp_path / "absent.toml")],
        cwd=REPO_ROOT,
        env=_clean_env(),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "cannot read auth file" in proc.stderr
    assert not db.exists(), "a refused start must not create the database"
