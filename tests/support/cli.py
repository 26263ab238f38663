"""Running the `opscore` command through its real entry point (the installed
console script, in a subprocess) for the CLI tests."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
_SCRIPT = Path(sys.executable).with_name("opscore")
OPSCORE = [str(_SCRIPT)] if _SCRIPT.exists() else [shutil.which("opscore") or "opscore"]


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPSCORE_")}
    env.update(PYTHONUNBUFFERED="1", COLUMNS="200")
    env.update(extra)
    return env


@dataclass
class Result:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)

    def lines(self) -> list[Any]:
        return [json.loads(line) for line in self.out.splitlines() if line.strip()]

    def __str__(self) -> str:
        return f"exit {self.code}\n--- stdout ---\n{self.out}\n--- stderr ---\n{self.err}"


async def opscore(
    *args: str,
    target: str | None = None,
    env: Mapping[str, str] | None = None,
    stdin: bytes | None = None,
) -> Result:
    """Run `opscore ARGS` (with --target unless None) and collect its output."""
    argv = [*OPSCORE, *args]
    if target is not None:
        argv += ["--target", target]
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=subprocess.DEVNULL if stdin is None else subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=dict(env) if env is not None else clean_env(),
        cwd=REPO_ROOT,
    )
    out, err = await asyncio.wait_for(proc.communicate(stdin), 60)
    assert proc.returncode is not None
    return Result(proc.returncode, out.decode(), err.decode())
