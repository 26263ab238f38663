"""How many parked server-streaming calls a plain grpc.aio server holds open,
with no Ops-Core code at all (see "10,000 subscriptions" in docs/benchmarks.md).

    python -m bench.tools.grpc_stream_limit N [STREAMS_PER_CHANNEL] [--stagger K]

Server and client share this one process on 127.0.0.1. The server's handler
(Health.Watch, from grpcio-health-checking) parks without answering, like a
SubscribeTasks stream with no task to send; the client opens N such calls over
N / STREAMS_PER_CHANNEL channels (with --stagger K, pausing 20 ms after every K),
then reports once a second for 10 s how many the server holds open and how the
others ended. Bounded: 10 s, then everything is cancelled and the server stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import collections

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

OPTIONS = [("grpc.use_local_subchannel_pool", 1)]


class Parked(health_pb2_grpc.HealthServicer):
    def __init__(self) -> None:
        self.open = 0

    async def Watch(self, request, context):  # type: ignore[no-untyped-def]
        self.open += 1
        try:
            await asyncio.sleep(60)
            yield health_pb2.HealthCheckResponse()
        finally:
            self.open -= 1


async def main(n: int, per_channel: int, stagger: int, pending: int) -> None:
    servicer = Parked()
    options = (
        [
            ("grpc.server.max_pending_requests", pending),
            ("grpc.server.max_pending_requests_hard_limit", pending),
        ]
        if pending
        else []
    )
    server = grpc.aio.server(options=options)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channels = [
        grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=OPTIONS)
        for _ in range(-(-n // per_channel))
    ]
    ends: collections.Counter[str] = collections.Counter()

    async def one(i: int) -> None:
        call = health_pb2_grpc.HealthStub(channels[i // per_channel]).Watch(
            health_pb2.HealthCheckRequest()
        )
        try:
            async for _ in call:
                pass
        except grpc.aio.AioRpcError as e:
            ends[e.code().name] += 1

    calls = []
    for i in range(n):
        calls.append(asyncio.ensure_future(one(i)))
        if stagger and i % stagger == stagger - 1:
            await asyncio.sleep(0.02)
    for t in range(10):
        await asyncio.sleep(1)
        print(f"{t + 1:2d} s: server holds {servicer.open} of {n} open; ended: {dict(ends)}")
    for c in calls:
        c.cancel()
    await asyncio.gather(*calls, return_exceptions=True)
    for ch in channels:
        await ch.close()
    await server.stop(0)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("n", type=int)
    p.add_argument("per_channel", type=int, nargs="?", default=10)
    p.add_argument("--stagger", type=int, default=0)
    p.add_argument(
        "--pending",
        type=int,
        default=0,
        help="grpc.server.max_pending_requests (soft and hard); 0: grpc's defaults 1000/3000",
    )
    a = p.parse_args()
    asyncio.run(main(a.n, a.per_channel, a.stagger, a.pending))
