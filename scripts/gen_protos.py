"""Generate the Python code for protos/ into generated/opscore_proto.

protoc names Python modules after the proto package, so the code for
`opscore/v1/*.proto` would import itself as `opscore.v1.*`. That clashes with our
own `opscore` package: an installed `opscore` would shadow the generated modules
or the other way round. We generate into a scratch directory and rewrite the
imports so the generated code lives in its own top-level package,
`opscore_proto.v1`. The descriptors keep their proto names (`opscore.v1.Task`),
so the wire contract and server reflection are unchanged.

Usage:
    python scripts/gen_protos.py            # regenerate generated/
    python scripts/gen_protos.py --check    # exit 1 if generated/ is stale
"""

from __future__ import annotations

import argparse
import filecmp
import importlib.resources
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
TARGET = ROOT / "generated" / "opscore_proto"
PACKAGE = "opscore_proto"

_IMPORT_PATTERNS = [
    (re.compile(r"^from opscore\.v1 import ", re.M), f"from {PACKAGE}.v1 import "),
    (re.compile(r"^import opscore\.v1\.(\w+)", re.M), rf"import {PACKAGE}.v1.\1"),
    (re.compile(r"\bopscore\.v1\.(\w+_pb2)\b"), rf"{PACKAGE}.v1.\1"),
]


def _protoc(out: Path) -> None:
    import grpc_tools  # noqa: F401  (fail early with a clear message if absent)

    builtin = importlib.resources.files("grpc_tools") / "_proto"
    protos = sorted(p.relative_to(PROTO_ROOT).as_posix() for p in PROTO_ROOT.rglob("*.proto"))
    cmd = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{builtin}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_out={out}",
        f"--mypy_grpc_out={out}",
        *protos,
    ]
    bin_dir = str(Path(sys.executable).parent)
    env = {"PATH": bin_dir + ":" + __import__("os").environ.get("PATH", "")}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    # protoc plugins chat on stderr ("Writing mypy to ..."); show it only on failure.
    if done.returncode != 0:
        sys.stderr.write(done.stdout + done.stderr)
        raise SystemExit(f"protoc failed with exit code {done.returncode}")


def generate(dest: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        _protoc(out)
        src = out / "opscore" / "v1"
        dest.mkdir(parents=True, exist_ok=True)
        v1 = dest / "v1"
        if v1.exists():
            shutil.rmtree(v1)
        v1.mkdir()
        for f in sorted(src.iterdir()):
            text = f.read_text()
            for pattern, repl in _IMPORT_PATTERNS:
                text = pattern.sub(repl, text)
            (v1 / f.name).write_text(text)
        (v1 / "__init__.py").write_text('"""Generated from protos/opscore/v1. Do not edit."""\n')
        (dest / "__init__.py").write_text(
            '"""Generated protobuf and gRPC code for the opscore.v1 API. Do not edit;\n'
            'regenerate with `make protos`."""\n'
        )
        (dest / "py.typed").write_text("")


def _same_tree(a: Path, b: Path) -> list[str]:
    diffs: list[str] = []
    cmp = filecmp.dircmp(a, b, ignore=["__pycache__"])

    def walk(c: filecmp.dircmp, prefix: str) -> None:
        diffs.extend(prefix + n for n in c.left_only + c.right_only)
        _, mismatch, errors = filecmp.cmpfiles(c.left, c.right, c.common_files, shallow=False)
        diffs.extend(prefix + n for n in mismatch + errors)
        for name, sub in c.subdirs.items():
            walk(sub, prefix + name + "/")

    walk(cmp, "")
    return diffs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args()
    if not args.check:
        generate(TARGET)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp) / PACKAGE
        generate(fresh)
        diffs = _same_tree(fresh, TARGET) if TARGET.exists() else ["(generated/ missing)"]
    if diffs:
        print("generated/ is stale; run `make protos`. Differs: " + ", ".join(diffs))
        return 1
    print("generated/ matches protos/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
