"""Helpers for tests of the SDK, the Agent worker and the CLI."""

from __future__ import annotations

from typing import Any

from opscore.client import OpsCoreClient, UnimplementedError


def client_for(harness: Any, **kwargs: Any) -> OpsCoreClient:
    """An OpsCoreClient for the harness's server, ignoring OPSCORE_* variables of the
    environment the tests run in."""
    kwargs.setdefault("env", {})
    return OpsCoreClient(harness.target, **kwargs)


async def workflow_service_available(client: OpsCoreClient) -> bool:
    """False while the server has no WorkflowService (UNIMPLEMENTED)."""
    try:
        await client.list_workflow_definitions(page_size=1)
    except UnimplementedError:
        return False
    return True
