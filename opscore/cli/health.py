"""`opscore health`: does the server answer, and serve each service?"""

from __future__ import annotations

import click

from opscore.cli.common import EXIT_FAILED, TARGET_SETTING, Cli, client_command, styled, table
from opscore.client.errors import (
    NotFoundError,
    OpsCoreError,
    UnavailableError,
    connection_problem,
)

SERVICES = (
    "opscore.v1.LifecycleService",
    "opscore.v1.DispatchService",
    "opscore.v1.WorkflowService",
)


@click.command()
@client_command
async def health(cli: Cli) -> int:
    """Check that the server answers and serves each service (exit 1 if not)."""
    rows: list[tuple[str, str]] = []
    try:
        for service in ("", *SERVICES):
            try:
                status = await cli.client.check_health(service)
            except NotFoundError:
                status = "SERVICE_UNKNOWN"
            rows.append((service or "(server)", status))
    except UnavailableError as exc:
        if cli.as_json:
            cli.print_json({"target": cli.target, "status": "UNREACHABLE", "error": exc.message})
        else:
            cli.error(
                f"{exc.code.name}: "
                + (connection_problem(exc, cli.target, target_setting=TARGET_SETTING) or "")
            )
        return EXIT_FAILED
    except OpsCoreError:
        raise
    healthy = all(status == "SERVING" for _, status in rows)
    if cli.as_json:
        cli.print_json(
            {
                "target": cli.target,
                "status": "SERVING" if healthy else "NOT_SERVING",
                "services": dict(rows),
            }
        )
    else:
        t = table("SERVICE", "STATUS", title=f"Ops-Core at {cli.target}")
        for name, status in rows:
            t.add_row(name, styled(status))
        cli.print(t)
    return 0 if healthy else EXIT_FAILED
