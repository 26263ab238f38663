"""The `opscore` command line."""

from __future__ import annotations

import asyncio
import sys

import click

from opscore import __version__
from opscore.cli_agents import agents, health
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


@main.command()
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
    help="One JSON object per line, or text for people.  [env OPSCORE_LOG_FORMAT; default json]",
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
