"""The `opscore` command line: one module per command group.

common.py     connection options, running a command, errors, output
ids.py        short ids in tables, unique id prefixes accepted as ids
coverage.py   "no connected agent has capability X"
serve.py      opscore serve
health.py     opscore health
agents.py     opscore agents ...
tasks.py      opscore tasks ...
workflows.py  opscore workflows ...
sessions.py   opscore sessions ...
db.py         opscore db ... (maintenance, servers stopped)
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any

import click

from opscore import __version__
from opscore.cli.agents import agents
from opscore.cli.auth import auth
from opscore.cli.common import GLOBAL_HELP, Globals, global_options, wants_json
from opscore.cli.db import db
from opscore.cli.health import health
from opscore.cli.serve import serve
from opscore.cli.sessions import sessions
from opscore.cli.tasks import tasks
from opscore.cli.workflows import workflows


class OpsCoreGroup(click.Group):
    """Click's group, except that with --json a usage error is a JSON object on
    stderr too (same exit code 2), so a script never has to parse prose."""

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        argv = list(sys.argv[1:] if args is None else args)
        if not standalone_mode or not wants_json(argv):
            return super().main(argv, prog_name, complete_var, standalone_mode, **extra)
        try:
            code = super().main(argv, prog_name, complete_var, standalone_mode=False, **extra)
        except click.ClickException as exc:
            error: dict[str, Any] = {"message": exc.format_message(), "code": "USAGE"}
            ctx = getattr(exc, "ctx", None)
            if ctx is not None:
                error["usage"] = ctx.get_usage()
            click.echo(json.dumps({"error": error}), err=True)
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo(json.dumps({"error": {"message": "aborted", "code": "ABORTED"}}), err=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


@click.group(
    cls=OpsCoreGroup,
    context_settings={"help_option_names": ["-h", "--help"]},
    help=f"""Ops-Core: the control plane for fleets of AI agents.

    Run `opscore serve` to start the server; the other commands talk to a
    running server. {GLOBAL_HELP}
    """,
)
@click.version_option(__version__, prog_name="opscore")
@global_options
@click.pass_context
def main(ctx: click.Context, /, **options: Any) -> None:
    ctx.obj = Globals.from_options(options)


main.add_command(serve)
main.add_command(health)
main.add_command(agents)
main.add_command(workflows)
main.add_command(sessions)
main.add_command(tasks)
main.add_command(auth)
main.add_command(db)


if __name__ == "__main__":  # pragma: no cover
    main()
