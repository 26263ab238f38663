"""gRPC core cancels new calls beyond `grpc.server.max_pending_requests` that the
application has not yet accepted (core's defaults: 1,000 soft, 3,000 hard). The
server raises it (`max_pending_calls`) so a fleet that connects at once is held,
not cancelled."""

from __future__ import annotations

import asyncio
import collections
import contextlib

import grpc
import pytest
from opscore_proto.v1 import lifecycle_pb2 as pb
from opscore_proto.v1 import lifecycle_pb2_grpc

from opscore import limits
from tests.conftest import eventually

STREAMS = 4000  # beyond core's hard default of 3,000
PER_CHANNEL = 100
OPTIONS = [("grpc.use_local_subchannel_pool", 1)]


async def open_watchers(
    target: str, n: int
) -> tuple[list[asyncio.Task[None]], collections.Counter[str], list[grpc.aio.Channel]]:
    channels = [
        grpc.aio.insecure_channel(target, options=OPTIONS) for _ in range(-(-n // PER_CHANNEL))
    ]
    ends: collections.Counter[str] = collections.Counter()

    async def one(i: int) -> None:
        call = lifecycle_pb2_grpc.LifecycleServiceStub(channels[i // PER_CHANNEL]).WatchAgents(
            pb.WatchAgentsRequest()
        )
        try:
            async for _ in call:
                pass
        except grpc.aio.AioRpcError as exc:
            ends[exc.code().name] += 1

    return [asyncio.create_task(one(i)) for i in range(n)], ends, channels


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("pending", "all_open"), [(limits.DEFAULT_MAX_PENDING_CALLS, True), (200, False)]
)
async def test_a_burst_of_streams_is_held_not_cancelled(make_harness, pending: int, all_open: bool):
    h = await make_harness(max_pending_calls=pending)
    tasks, ends, channels = await open_watchers(h.target, STREAMS)
    watchers = h.server.lifecycle.events
    try:
        if all_open:
            await eventually(
                lambda: len(watchers) == STREAMS, timeout=60, what=f"{STREAMS} open watchers"
            )
            assert not ends, ends
        else:
            # With a small limit some of the burst is cancelled by gRPC core: this
            # is what the setting is for.
            await eventually(lambda: ends["CANCELLED"] > 0, timeout=60, what="cancelled calls")
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for ch in channels:
            with contextlib.suppress(Exception):
                await ch.close()
