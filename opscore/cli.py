"""The `opscore` command line."""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import click

from opscore import __version__
from opscore.cli_agents import agents, health
from opscore.cli_auth import auth
from opscore.cli_sessions import sessions
from opscore.cli_tasks import tasks
from opscore.cli_workflows import workflows


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="opscore")
def main() -> None:
    """Ops-Core: the control plane for fleets of AI agents.

    Run `opscore serve` to start the server; the other commands talk to a
    running server (--target, default 127.0.0.1:50051, or OPSCORE_TARGET; API
    key from --api-key or OPSCORE_API_KEY). They print tables, or JSON with
    --json, and exit 1 when the request fails.
    """


main.add_command(agents)
main.add_command(workflows)
main.add_command(sessions)
main.add_command(tasks)
main.add_command(health)
main.add_command(auth)


def _serve_options(command: Any) -> Any:
    """One option per server setting, from the table in opscore.config."""
    from opscore.config import SETTINGS

    for s in reversed(SETTINGS):
        help_text = f"{s.help}  [env {s.env}]"
        name = "--" + s.name.replace("_", "-")
        if s.flag:
            command = click.option(name, is_flag=True, default=None, help=help_text)(command)
        elif s.choices:
            command = click.option(
                name, type=click.Choice(s.choices, case_sensitive=False), help=help_text
            )(command)
        else:
            command = click.option(name, type=s.kind, help=help_text)(command)
    return command


@main.command()
@click.option(
    "--api-key-file",
    type=click.Path(dir_okay=False),
    help="File with one API key per line; adds to OPSCORE_API_KEYS (comma separated).",
)
@_serve_options
def serve(**options: object) -> None:
    """Serve Ops-Core until SIGTERM or SIGINT, then drain and exit 0."""
    from opscore import logs
    from opscore.config import from_sources
    from opscore.errors import ConfigError
    from opscore.server import serve as run

    try:
        config = from_sources(options)
    except ConfigError as exc:
        click.echo(f"opscore serve: {exc}", err=True)
        sys.exit(2)
    logs.setup(config.log_level, config.log_format)
    try:
        code = asyncio.run(run(config))
    except ConfigError as exc:
        click.echo(f"opscore serve: {exc}", err=True)
        sys.exit(2)
    sys.exit(code)


if __name__ == "__main__":  # pragma: no cover
    main()
