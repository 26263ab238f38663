"""`opscore serve`: run the server."""

from __future__ import annotations

import asyncio
import sys

import click


@click.command()
@click.option(
    "--listen", help="HOST:PORT to listen on.  [env OPSCORE_LISTEN; default 127.0.0.1:50051]"
)
@click.option("--db", help="SQLite database file.  [env OPSCORE_DB; default ./opscore.db]")
@click.option(
    "--workflows-dir",
    type=click.Path(file_okay=False),
    help="Load every *.json, *.yaml, *.yml definition here at start.  [env OPSCORE_WORKFLOWS_DIR]",
)
@click.option(
    "--log-level",
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
    help="[env OPSCORE_LOG_LEVEL; default INFO]",
)
@click.option(
    "--log-format",
    type=click.Choice(["json", "text"]),
    help="One JSON object per line (for log collectors), or text for people "
    "(`make run` uses text).  [env OPSCORE_LOG_FORMAT; default json]",
)
@click.option(
    "--sync",
    type=click.Choice(["full", "normal"]),
    help="full: commits survive power loss; normal: they survive a process crash only "
    "(faster).  [env OPSCORE_SYNC; default full]",
)
@click.option(
    "--api-key-file",
    type=click.Path(dir_okay=False),
    help="File with one API key per line; adds to OPSCORE_API_KEYS (comma separated).",
)
@click.option(
    "--agent-timeout",
    type=float,
    help="Seconds without a sign of life before an agent is marked OFFLINE.  "
    "[env OPSCORE_AGENT_TIMEOUT; default 30]",
)
@click.option(
    "--insecure",
    is_flag=True,
    default=None,
    help="Allow listening on a non-loopback address without API keys.  [env OPSCORE_INSECURE]",
)
def serve(**options: object) -> None:
    """Serve Ops-Core until SIGTERM or SIGINT, then drain and exit 0."""
    try:
        from opscore import logs
        from opscore.config import from_sources
        from opscore.errors import ConfigError
        from opscore.server import serve as run
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
        code = asyncio.run(run(config))
    except ConfigError as exc:
        click.echo(f"opscore serve: {exc}", err=True)
        sys.exit(2)
    sys.exit(code)
