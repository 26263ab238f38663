"""`opscore auth` and the TLS options of the client commands, through the installed
command, against a real in-process server; and the SDK's Agent over mTLS."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from opscore_proto.v1 import dispatch_pb2

from opscore.agent import Agent, TaskContext
from opscore.client import OpsCoreClient, TLSConfig, to_dict
from opscore.client.tls import resolve_tls
from opscore.security import authfile, keys
from tests.conftest import eventually
from tests.support.certs import CertificateAuthority
from tests.support.security import principal, write_auth_file
from tests.test_cli import clean_env, opscore


async def test_create_key_prints_it_once_and_stores_only_its_hash(tmp_path: Path, make_harness):
    path = tmp_path / "auth.toml"
    created = await opscore(
        "auth", "create-key", "--role", "agent", "--agents", "summarizer-*",
        "--name", "fleet", "--file", str(path),
    )  # fmt: skip
    assert created.code == 0, created
    key = created.out.strip()
    assert key.startswith(keys.KEY_PREFIX) and len(key) > 40
    assert "shown only now" in created.err
    text = path.read_text()
    assert key not in text and keys.hash_key(key) in text
    assert path.stat().st_mode & 0o777 == 0o600
    (entry,) = authfile.load(path)
    assert (entry.name, entry.role.value, entry.agents) == ("fleet", "agent", ("summarizer-*",))

    # The key works for what the role allows, against a server reading the file.
    h = await make_harness(auth_file=str(path))
    async with OpsCoreClient(h.target, api_key=key, env={}) as client:
        agent = await client.register_agent("summarizer-7", capabilities=["summarize"])
        assert agent.agent_id == "summarizer-7"
    denied = await opscore("agents", "list", "--api-key", key, target=h.target)
    assert denied.code == 1 and "PERMISSION_DENIED" in denied.err, denied

    # A second key for the same principal (rotation), then revoke the first one.
    second = await opscore("auth", "create-key", "--name", "fleet", "--file", str(path))
    assert second.code == 0, second
    listed = await opscore("auth", "list", "--json", "--file", str(path))
    (row,) = listed.json()
    first_fp, second_fp = keys.fingerprint(keys.hash_key(key)), row["keys"][1]
    assert row["keys"][0] == first_fp and row["role"] == "agent"
    assert key not in listed.out and second.out.strip() not in listed.out
    table = await opscore("auth", "list", "--file", str(path))
    assert "fleet" in table.out and first_fp in table.out and key not in table.out

    revoked = await opscore("auth", "revoke", "fleet", "--key", first_fp, "--file", str(path))
    assert revoked.code == 0, revoked
    (entry,) = authfile.load(path)
    assert [keys.fingerprint(h) for h in entry.key_hashes] == [second_fp]
    h.server.reload()
    async with OpsCoreClient(h.target, api_key=key, env={}) as client:
        with pytest.raises(Exception) as info:
            await client.heartbeat("summarizer-7")
        assert getattr(info.value, "reason", "") == "API_KEY_INVALID"

    gone = await opscore("auth", "revoke", "fleet", "--file", str(path))
    assert gone.code == 0 and authfile.load(path) == []


async def test_auth_commands_refuse_what_would_be_wrong(tmp_path: Path):
    path = tmp_path / "auth.yaml"
    no_agents = await opscore("auth", "create-key", "--role", "agent", "--file", str(path))
    assert no_agents.code == 1 and "needs 'agents'" in no_agents.err
    assert not path.exists()
    no_role = await opscore("auth", "create-key", "--file", str(path))
    assert no_role.code == 1 and "--role is required" in no_role.err
    ok = await opscore("auth", "create-key", "--role", "viewer", "--name", "v", "--file", str(path))
    assert ok.code == 0, ok
    clash = await opscore(
        "auth", "create-key", "--role", "admin", "--name", "v", "--file", str(path)
    )
    assert clash.code == 1 and "revoke it to change its role" in clash.err
    unknown = await opscore("auth", "revoke", "nobody", "--file", str(path))
    assert unknown.code == 1 and "no principal named" in unknown.err
    last = await opscore(
        "auth", "revoke", "v", "--key", keys.fingerprint(authfile.load(path)[0].key_hashes[0]),
        "--file", str(path),
    )  # fmt: skip
    assert last.code == 1 and "last key" in last.err
    # The file is found through OPSCORE_AUTH_FILE too.
    listed = await opscore("auth", "list", "--json", env=clean_env(OPSCORE_AUTH_FILE=str(path)))
    assert [r["name"] for r in listed.json()] == ["v"]
    bad = tmp_path / "raw.toml"
    bad.write_text('[[principals]]\nname = "x"\nrole = "admin"\nkey_hashes = ["opsk_raw"]\n')
    refused = await opscore("auth", "list", "--file", str(bad))
    assert refused.code == 1 and "Store hashes only" in refused.err


@pytest.fixture
async def mtls_server(make_harness, tmp_path: Path):
    ca = CertificateAuthority()
    ca_path = ca.write(tmp_path / "ca.crt")
    cert, key = ca.issue("localhost", server=True).write(tmp_path / "server")
    client = ca.issue("worker-1", organization="Acme")
    client_cert, client_key = client.write(tmp_path / "client")
    auth = tmp_path / "auth.toml"
    made = write_auth_file(
        auth,
        principal("workers", "agent", agents=["worker-*"], subject=client.subject),
        principal("ops", "operator"),
    )
    h = await make_harness(
        tls_cert=str(cert), tls_key=str(key), tls_client_ca=str(ca_path), auth_file=str(auth)
    )
    files = {"ca": ca_path, "cert": client_cert, "key": client_key}
    return h, files, made


async def test_client_commands_take_tls_options(mtls_server):
    h, files, made = mtls_server
    tls = ["--ca", str(files["ca"]), "--cert", str(files["cert"]), "--key", str(files["key"])]
    # The certificate's principal is an agent: it may read its own record only.
    got = await opscore("agents", "list", "--json", *tls, target=h.target)
    assert got.code == 1 and "ROLE_NOT_ALLOWED" in got.err, got
    # A key on top of the certificate wins: the operator may list.
    listed = await opscore(
        "agents", "list", "--json", *tls, "--api-key", made["ops"], target=h.target
    )
    assert listed.code == 0, listed
    assert json.loads(listed.out) == []
    # The same through the environment.
    env = clean_env(
        OPSCORE_TLS_CA=str(files["ca"]),
        OPSCORE_TLS_CLIENT_CERT=str(files["cert"]),
        OPSCORE_TLS_CLIENT_KEY=str(files["key"]),
        OPSCORE_API_KEY=made["ops"],
    )
    listed = await opscore("agents", "list", "--json", target=h.target, env=env)
    assert listed.code == 0, listed
    # Plaintext against the TLS port: refused, and the CLI says it could not connect.
    plain = await opscore(
        "agents", "list", "--api-key", made["ops"], target=h.target, env=clean_env()
    )
    assert plain.code == 1 and "UNAVAILABLE" in plain.err
    missing = await opscore("agents", "list", "--ca", "/nonexistent/ca.crt", target=h.target)
    assert missing.code == 2 and "cannot read the CA certificate file" in missing.err


async def test_agent_runs_tasks_over_mtls(mtls_server):
    h, files, made = mtls_server
    tls = TLSConfig.from_files(files["ca"], files["cert"], files["key"])
    agent = Agent("mtls-worker", agent_id="worker-1", target=h.target, tls=tls, env={})

    @agent.task("echo")
    async def echo(task: TaskContext) -> dict:
        return {"echo": task.input}

    run = asyncio.create_task(agent.run(handle_signals=False))
    try:
        async with OpsCoreClient(h.target, api_key=made["ops"], tls=tls, env={}) as ops:

            async def subscribed() -> bool:
                try:
                    return (await ops.get_agent("worker-1")).open_subscriptions == 1
                except Exception:
                    return False

            await eventually(subscribed, what="agent subscribed over mTLS")
            task = await ops.enqueue_task("echo", input={"x": 1})

            async def completed() -> dispatch_pb2.Task | None:
                got = await ops.get_task(task.task_id)
                return got if got.state == dispatch_pb2.TASK_STATE_COMPLETED else None

            done = await eventually(completed, what="task completed")
            assert to_dict(done.output) == {"echo": {"x": 1}}
            assert done.assigned_agent_id == "worker-1"
    finally:
        await agent.shutdown()
        await asyncio.wait_for(run, 10)


def test_sdk_tls_settings_from_arguments_and_environment(tmp_path: Path):
    ca = CertificateAuthority()
    ca_path = ca.write(tmp_path / "ca.crt")
    assert resolve_tls(None, None, {}) is None
    assert resolve_tls(False, None, {"OPSCORE_TLS": "1"}) is None
    system = resolve_tls(None, None, {"OPSCORE_TLS": "true"})
    assert system is not None and system.root_certificates is None
    from_env = resolve_tls(None, None, {"OPSCORE_TLS_CA": str(ca_path)})
    assert from_env is not None and from_env.root_certificates == ca.cert_pem
    given = resolve_tls(True, b"roots", {})
    assert given is not None and given.root_certificates == b"roots"
    with pytest.raises(ValueError, match="go together"):
        TLSConfig(certificate_chain=b"x")
    with pytest.raises(ValueError, match="cannot read"):
        TLSConfig.from_files(tmp_path / "absent.crt")
