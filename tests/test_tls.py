"""TLS and mTLS with real certificates made in the test: plaintext refused, untrusted
client certificates refused, subjects naming principals, rotation without dropping
streams, and health and reflection open without credentials."""

from __future__ import annotations

import os
from pathlib import Path

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from opscore_proto.v1 import lifecycle_pb2, lifecycle_pb2_grpc

from opscore.client import OpsCoreClient, TLSConfig
from opscore.client.errors import PermissionDeniedError
from opscore.config import from_sources
from opscore.errors import ConfigError
from tests.conftest import StreamReader, expect_error
from tests.support.certs import CertificateAuthority, Issued
from tests.support.security import bearer, principal, reason, write_auth_file

L = lifecycle_pb2


class Pki:
    """A CA, the server's certificate files and helpers for client channels."""

    def __init__(self, tmp_path: Path) -> None:
        self.dir = tmp_path
        self.ca = CertificateAuthority("opscore-test-ca")
        self.ca_path = self.ca.write(tmp_path / "ca.crt")
        self.cert_path, self.key_path = self.ca.issue("localhost", server=True).write(
            tmp_path / "server"
        )

    def channel(
        self,
        target: str,
        *,
        roots: bytes | None = None,
        client: Issued | None = None,
    ) -> grpc.aio.Channel:
        creds = grpc.ssl_channel_credentials(
            root_certificates=roots if roots is not None else self.ca.cert_pem,
            private_key=client.key_pem if client else None,
            certificate_chain=client.cert_pem if client else None,
        )
        return grpc.aio.secure_channel(target, creds, options=[("grpc.enable_retries", 0)])


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path)


async def check(channel: grpc.aio.Channel, **kw) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    resp = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5, **kw)
    return resp.status


# ------------------------------------------------------------------ TLS


async def test_tls_serves_and_refuses_plaintext(make_harness, pki: Pki):
    h = await make_harness(tls_cert=str(pki.cert_path), tls_key=str(pki.key_path))
    async with pki.channel(h.target) as channel:
        assert await check(channel) == health_pb2.HealthCheckResponse.SERVING
        stub = lifecycle_pb2_grpc.LifecycleServiceStub(channel)
        reg = await stub.RegisterAgent(L.RegisterAgentRequest(agent_id="tls-1"))
        assert reg.agent.agent_id == "tls-1"
    # The harness's own channel is plaintext: the TLS port does not speak it.
    await expect_error(
        h.lifecycle.ListAgents(L.ListAgentsRequest(), timeout=3), grpc.StatusCode.UNAVAILABLE
    )
    # A client that does not trust the server's CA is refused too.
    other = CertificateAuthority("someone-else")
    async with pki.channel(h.target, roots=other.cert_pem) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await check(channel)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_health_and_reflection_stay_open_without_credentials(make_harness, pki: Pki):
    path = pki.dir / "auth.toml"
    made = write_auth_file(path, principal("root", "admin"))
    h = await make_harness(
        tls_cert=str(pki.cert_path), tls_key=str(pki.key_path), auth_file=str(path)
    )
    async with pki.channel(h.target) as channel:
        assert await check(channel) == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        call = reflection.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
        names = {s.name for r in [r async for r in call] for s in r.list_services_response.service}
        assert "opscore.v1.DispatchService" in names
        # ...and nothing else is open: every Ops-Core RPC wants a key.
        stub = lifecycle_pb2_grpc.LifecycleServiceStub(channel)
        err = await expect_error(
            stub.ListAgents(L.ListAgentsRequest()), grpc.StatusCode.UNAUTHENTICATED
        )
        assert reason(err) == "API_KEY_MISSING"
        # Health knows only the services reflection lists.
        await expect_error(
            health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="opscore.v1.Secret")
            ),
            grpc.StatusCode.NOT_FOUND,
        )
        ok = await stub.ListAgents(L.ListAgentsRequest(), metadata=bearer(made["root"]))
        assert list(ok.agents) == []


async def test_server_certificate_rotation_keeps_streams(make_harness, pki: Pki):
    h = await make_harness(tls_cert=str(pki.cert_path), tls_key=str(pki.key_path))
    old_channel = pki.channel(h.target)
    stub = lifecycle_pb2_grpc.LifecycleServiceStub(old_channel)
    watch = StreamReader(stub.WatchAgents(L.WatchAgentsRequest()))
    await watch.call.initial_metadata()

    # Rotate to a certificate from another CA: write aside, rename into place.
    ca2 = CertificateAuthority("rotated-ca")
    issued = ca2.issue("localhost", server=True)
    tmp_cert, tmp_key = issued.write(pki.dir / "next")
    os.replace(tmp_key, pki.key_path)
    os.replace(tmp_cert, pki.cert_path)

    # New handshakes get the new certificate: a client trusting only the new CA
    # connects, one trusting only the old CA no longer does.
    async with pki.channel(h.target, roots=ca2.cert_pem) as channel:
        assert await check(channel) == health_pb2.HealthCheckResponse.SERVING
    async with pki.channel(h.target, roots=pki.ca.cert_pem) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await check(channel)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert h.server.certificates is not None and h.server.certificates.reloads == 1

    # The stream opened before the rotation is still open and still delivers.
    await stub.RegisterAgent(L.RegisterAgentRequest(agent_id="after-rotation"))
    while (await watch.next()).agent.agent_id != "after-rotation":
        pass
    assert not watch.done.is_set()
    await watch.close()
    await old_channel.close()


async def test_half_written_rotation_keeps_the_old_certificate(make_harness, pki: Pki, caplog):
    h = await make_harness(tls_cert=str(pki.cert_path), tls_key=str(pki.key_path))
    # A new certificate whose key has not arrived yet.
    ca2 = CertificateAuthority("rotated-ca")
    pki.cert_path.write_bytes(ca2.issue("localhost", server=True).cert_pem)
    async with pki.channel(h.target) as channel:
        assert await check(channel) == health_pb2.HealthCheckResponse.SERVING
    assert any("cannot be used" in r.getMessage() for r in caplog.records)
    assert h.server.certificates is not None and h.server.certificates.reloads == 0


async def test_sighup_reload_rereads_unchanged_looking_files(make_harness, pki: Pki):
    h = await make_harness(tls_cert=str(pki.cert_path), tls_key=str(pki.key_path))
    ca2 = CertificateAuthority("rotated-ca")
    issued = ca2.issue("localhost", server=True)
    stat = os.stat(pki.cert_path), os.stat(pki.key_path)
    # Same sizes are not guaranteed, so pin what a stamp compares: restore the mtimes.
    pki.cert_path.write_bytes(issued.cert_pem)
    pki.key_path.write_bytes(issued.key_pem)
    for path, st in zip((pki.cert_path, pki.key_path), stat, strict=True):
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    h.server.reload()
    async with pki.channel(h.target, roots=ca2.cert_pem) as channel:
        assert await check(channel) == health_pb2.HealthCheckResponse.SERVING


# ------------------------------------------------------------------ mTLS


@pytest.fixture
async def mtls(make_harness, pki: Pki):
    path = pki.dir / "auth.yaml"
    ops = pki.ca.issue("ci", organization="Acme")
    viewer = pki.ca.issue("dashboard", organization="Acme")
    stranger = pki.ca.issue("stranger")
    made = write_auth_file(
        path,
        principal("ci", "operator", subject=ops.subject),
        principal("dashboard", "viewer", subject=viewer.subject),
        with_keys=False,
    )
    assert made == {}
    h = await make_harness(
        tls_cert=str(pki.cert_path),
        tls_key=str(pki.key_path),
        tls_client_ca=str(pki.ca_path),
        auth_file=str(path),
    )
    return h, {"ops": ops, "viewer": viewer, "stranger": stranger}


async def test_mtls_refuses_clients_without_a_trusted_certificate(mtls, pki: Pki):
    h, certs = mtls
    async with pki.channel(h.target) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await check(channel)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    untrusted = CertificateAuthority("rogue").issue("ci", organization="Acme")
    async with pki.channel(h.target, client=untrusted) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await check(channel)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    async with pki.channel(h.target, client=certs["ops"]) as channel:
        assert await check(channel) == health_pb2.HealthCheckResponse.SERVING


async def test_mtls_subject_names_the_principal(mtls, pki: Pki):
    h, certs = mtls
    tls_ops = TLSConfig(pki.ca.cert_pem, certs["ops"].cert_pem, certs["ops"].key_pem)
    async with OpsCoreClient(h.target, tls=tls_ops, env={}) as ops:
        task = await ops.enqueue_task("summarize")
        assert task.capability == "summarize"
    tls_viewer = TLSConfig(pki.ca.cert_pem, certs["viewer"].cert_pem, certs["viewer"].key_pem)
    async with OpsCoreClient(h.target, tls=tls_viewer, env={}) as viewer:
        assert [t.task_id for t in await viewer.list_tasks()] == [task.task_id]
        with pytest.raises(PermissionDeniedError) as info:
            await viewer.cancel_task(task.task_id)
        assert info.value.reason == "ROLE_NOT_ALLOWED"
    # Trusted by the CA but named in no entry: not a principal.
    async with pki.channel(h.target, client=certs["stranger"]) as channel:
        err = await expect_error(
            lifecycle_pb2_grpc.LifecycleServiceStub(channel).ListAgents(L.ListAgentsRequest()),
            grpc.StatusCode.UNAUTHENTICATED,
        )
        assert reason(err) == "CERTIFICATE_NOT_RECOGNISED"
        assert "CN=stranger" in err.details()


async def test_mtls_without_principals_makes_every_certificate_holder_admin(
    make_harness, pki: Pki, caplog
):
    h = await make_harness(
        tls_cert=str(pki.cert_path),
        tls_key=str(pki.key_path),
        tls_client_ca=str(pki.ca_path),
    )
    client = pki.ca.issue("operator-laptop")
    async with pki.channel(h.target, client=client) as channel:
        stub = lifecycle_pb2_grpc.LifecycleServiceStub(channel)
        with caplog.at_level("INFO", logger="opscore.rpc"):
            await stub.RegisterAgent(L.RegisterAgentRequest(agent_id="a1"))
    (line,) = [r for r in caplog.records if r.name == "opscore.rpc"]
    assert line.principal == "CN=operator-laptop"


# ------------------------------------------------------------------ configuration


def test_tls_configuration_rules(tmp_path: Path):
    with pytest.raises(ConfigError, match="go together"):
        from_sources({"tls_cert": "c.pem"}, env={})
    with pytest.raises(ConfigError, match="needs --tls-cert"):
        from_sources({"tls_client_ca": "ca.pem"}, env={})
    tls = {"tls_cert": "c.pem", "tls_key": "k.pem"}
    with pytest.raises(ConfigError, match="without authentication"):
        from_sources({"listen": "0.0.0.0:1", **tls}, env={})
    cfg = from_sources({"listen": "0.0.0.0:1", **tls, "auth_file": "a.toml"}, env={})
    assert cfg.tls_enabled and cfg.auth_enabled
    # Client certificates are authentication enough.
    cfg = from_sources({"listen": "0.0.0.0:1", **tls, "tls_client_ca": "ca.pem"}, env={})
    assert cfg.tls_client_ca == "ca.pem"
    env = {"OPSCORE_TLS_CERT": "c", "OPSCORE_TLS_KEY": "k", "OPSCORE_AUTH_FILE": "a.yaml"}
    cfg = from_sources({}, env=env)
    assert (cfg.tls_cert, cfg.tls_key, cfg.auth_file) == ("c", "k", "a.yaml")


async def test_unusable_tls_files_refuse_to_start(make_harness, pki: Pki):
    with pytest.raises(ConfigError, match="cannot use the TLS files"):
        await make_harness(tls_cert=str(pki.cert_path), tls_key=str(pki.dir / "missing.key"))
    other_key = CertificateAuthority("x").issue("localhost", server=True).key_pem
    (pki.dir / "wrong.key").write_bytes(other_key)
    with pytest.raises(ConfigError, match="cannot use the TLS files"):
        await make_harness(tls_cert=str(pki.cert_path), tls_key=str(pki.dir / "wrong.key"))
    assert not (pki.dir / "opscore.db").exists(), "a refused start must not create the database"
