"""`opscore serve`: run the server. Its options come from the settings table in
opscore.config, one per setting, so a new server setting needs no edit here."""

from __future__ import annotations

import sys
from typing import Any

import click

from opscore.config import SETTINGS


def _serve_options(command: Any) -> Any:
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


@click.command()
@click.option(
    "--api-key-file",
    type=click.Path(dir_okay=False),
    help="File with one API key per line; adds to OPSCORE_API_KEYS (comma separated).",
)
@_serve_options
def serve(**options: object) -> None:
    """Serve Ops-Core until SIGTERM or SIGINT, then drain and exit 0."""
    try:
        from opscore import logs
        from opscore.config import from_sources
        from opscore.errors import ConfigError
        from opscore.server import run
    except ModuleNotFoundError as exc:
        if exc.name is None or exc.name.split(".")[0] in ("opscore", "opscore_proto"):
            raise
        # `pip install opscore` brings the client, the agent and these commands;
        # the server's own dependencies come with the extra.
        click.echo(
            f"opscore serve: the server needs its extra dependencies (no module named "
            f"{exc.name!r}): pip install 'opscore[server]'",
            err=True,
        )
        sys.exit(2)

    try:
        config = from_sources(options)
    except ConfigError as exc:
        click.echo(f"opscore serve: {exc}", err=True)
        sys.exit(2)
    logs.setup(config.log_level, config.log_format)
    try:
        code = run(config)
    except ConfigError as exc:
        click.echo(f"opscore serve: {exc}", err=True)
        sys.exit(2)
    sys.exit(code)
