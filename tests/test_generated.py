"""The generated protobuf code: up to date with protos/, and shipped correctly in the
wheel; and the wheel as another project uses it: `pip install opscore` (no extra)
into a fresh venv gives the SDK, the Agent and the CLI's client commands, enough
to run an agent from outside this checkout against a running server, while
`opscore serve` says which extra it needs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from opscore_proto.v1 import dispatch_pb2

from opscore.client import OpsCoreClientSync, to_dict
from tests.support.procserver import running_server

REPO_ROOT = Path(__file__).resolve().parents[1]
GEN_SCRIPT = REPO_ROOT / "scripts" / "gen_protos.py"


def _clean_env() -> dict[str, str]:
    """The current environment minus anything that would leak the repo or this venv."""
    env = dict(os.environ)
    for var in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP", "PYTHONUSERBASE"):
        env.pop(var, None)
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def _run(cmd: list[str], *, cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cmd, cwd=cwd, env=_clean_env(), capture_output=True, text=True, timeout=timeout
    )


def _describe(result: subprocess.CompletedProcess[str]) -> str:
    return (
        f"$ {' '.join(map(str, result.args))}\nexit {result.returncode}\n"
        f"--- stdout ---\n{result.stdout[-4000:]}\n--- stderr ---\n{result.stderr[-4000:]}"
    )


def test_generated_code_matches_protos() -> None:
    result = subprocess.run(
        [sys.executable, str(GEN_SCRIPT), "--check"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, _describe(result)
    assert "generated/ matches protos/" in result.stdout, _describe(result)


_PROBE = textwrap.dedent(
    """
    import json, pathlib, sysconfig
    import opscore_proto
    from opscore_proto.v1 import dispatch_pb2, lifecycle_pb2, lifecycle_pb2_grpc

    pkg = pathlib.Path(opscore_proto.__file__).resolve().parent
    print(json.dumps({
        "package_file": str(pathlib.Path(opscore_proto.__file__).resolve()),
        "purelib": str(pathlib.Path(sysconfig.get_paths()["purelib"]).resolve()),
        "dispatch_package": dispatch_pb2.DESCRIPTOR.package,
        "lifecycle_package": lifecycle_pb2.DESCRIPTOR.package,
        "lifecycle_services": sorted(lifecycle_pb2.DESCRIPTOR.services_by_name),
        "has_stub": hasattr(lifecycle_pb2_grpc, "LifecycleServiceStub"),
        "has_py_typed": (pkg / "py.typed").is_file(),
        "pyi": sorted(p.name for p in (pkg / "v1").glob("*.pyi")),
    }))
    """
)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_wheel_installs_opscore_proto(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    build = _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(dist),
            ".",
        ],
        cwd=REPO_ROOT,
        timeout=300,
    )
    if build.returncode != 0:
        # No hatchling in this interpreter: let pip fetch the build backend itself.
        build = _run(
            [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(dist), "."],
            cwd=REPO_ROOT,
            timeout=300,
        )
    assert build.returncode == 0, _describe(build)
    wheels = sorted(dist.glob("opscore-*.whl"))
    assert len(wheels) == 1, f"expected one opscore wheel in {dist}: {list(dist.iterdir())}"

    # A fresh venv WITHOUT system site-packages, so nothing installed here can hide a
    # missing file or dependency; the wheel is installed with its dependencies.
    venv = tmp_path / "venv"
    made = _run([sys.executable, "-m", "venv", str(venv)], cwd=tmp_path, timeout=120)
    assert made.returncode == 0, _describe(made)
    vpy = venv / "bin" / "python"
    install = _run(
        [str(vpy), "-m", "pip", "install", "--quiet", str(wheels[0])], cwd=tmp_path, timeout=420
    )
    assert install.returncode == 0, _describe(install)

    # Import from outside the repo, so the working tree cannot be picked up by accident.
    probe = _run([str(vpy), "-c", _PROBE], cwd=tmp_path, timeout=60)
    assert probe.returncode == 0, _describe(probe)
    info = json.loads(probe.stdout.strip().splitlines()[-1])

    package_file = Path(info["package_file"])
    purelib = Path(info["purelib"])
    assert package_file.is_relative_to(purelib), info
    assert package_file.is_relative_to(venv.resolve()), info
    assert not package_file.is_relative_to(REPO_ROOT.resolve()), info
    assert info["dispatch_package"] == "opscore.v1", info
    assert info["lifecycle_package"] == "opscore.v1", info
    assert info["lifecycle_services"] == ["LifecycleService"], info
    assert info["has_stub"] is True, info
    assert info["has_py_typed"] is True, info
    for name in ("dispatch_pb2.pyi", "lifecycle_pb2.pyi", "lifecycle_pb2_grpc.pyi"):
        assert name in info["pyi"], info

    # The plain install is the client: the server's own dependencies are not there,
    # and `opscore serve` says how to get them instead of a traceback.
    serve = _run([str(venv / "bin" / "opscore"), "serve"], cwd=tmp_path, timeout=60)
    assert serve.returncode == 2, _describe(serve)
    assert "pip install 'opscore[server]'" in serve.stderr, _describe(serve)
    assert "Traceback" not in serve.stderr, _describe(serve)

    _run_an_agent_from_outside_the_checkout(tmp_path, venv)


_OUTSIDE_AGENT = textwrap.dedent(
    """
    import sys
    import opscore
    from opscore.agent import Agent

    agent = Agent("outside", agent_id="outside-1", target=sys.argv[1])

    @agent.task("outside.echo")
    def echo(task):
        return {"echo": task.input["text"], "from": opscore.__file__}

    agent.run_sync()
    """
)


def _run_an_agent_from_outside_the_checkout(tmp_path: Path, venv: Path) -> None:
    elsewhere = tmp_path / "another-project"
    elsewhere.mkdir()
    script = elsewhere / "agent.py"
    script.write_text(_OUTSIDE_AGENT)
    # The server runs from the checkout (with the server extra); the agent and
    # the CLI run from the fresh venv, in a directory of their own.
    with running_server(tmp_path) as server:
        log = (elsewhere / "agent.log").open("wb")
        agent = subprocess.Popen(
            [str(venv / "bin" / "python"), str(script), server.target],
            cwd=elsewhere,
            env=_clean_env(),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
        )
        try:
            with OpsCoreClientSync(server.target, env={}) as client:
                deadline = time.monotonic() + 30
                while not _subscribed(client, "outside-1"):
                    assert agent.poll() is None, (elsewhere / "agent.log").read_text()
                    assert time.monotonic() < deadline, (elsewhere / "agent.log").read_text()
                    time.sleep(0.1)
                task = client.enqueue_task("outside.echo", input={"text": "hi"})
                cli = _run(
                    [
                        str(venv / "bin" / "opscore"),
                        "tasks",
                        "enqueue",
                        "outside.echo",
                        "--input",
                        '{"text": "from the cli"}',
                        "--wait",
                        "--json",
                        "--target",
                        server.target,
                    ],
                    cwd=elsewhere,
                    timeout=60,
                )
                assert cli.returncode == 0, _describe(cli)
                assert json.loads(cli.stdout)["output"]["echo"] == "from the cli"
                done = client.get_task(task.task_id)
                assert done.state == dispatch_pb2.TASK_STATE_COMPLETED, done
                output = to_dict(done.output)
                assert output["echo"] == "hi"
                assert Path(output["from"]).resolve().is_relative_to(venv.resolve()), output
        finally:
            agent.send_signal(signal.SIGTERM)
            agent.wait(timeout=30)
            log.close()
    assert agent.returncode == 0, (elsewhere / "agent.log").read_text()


def _subscribed(client: OpsCoreClientSync, agent_id: str) -> bool:
    try:
        return client.get_agent(agent_id).open_subscriptions == 1
    except Exception:
        return False
