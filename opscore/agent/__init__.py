"""The Agent worker: register, connect, run handlers, report results.

    from opscore.agent import Agent, TaskContext

    agent = Agent("summarizer", agent_id="summarizer-1", max_in_flight=4)

    @agent.task("text.summarize")
    async def summarize(task: TaskContext) -> dict:
        words = task.input["text"].split()
        task.report_progress({"words_seen": len(words)})
        return {"summary": " ".join(words[:10]), "words": len(words)}

    agent.run_sync()   # or: await agent.run()

What `run()` does:

1. Registers the agent with the capabilities of its handlers (retrying while the
   server is unreachable) and reports `IDLE`.
2. Opens its work stream (DispatchService.Connect) with `max_in_flight` and runs
   each assignment's handler in its own asyncio task: `async def` handlers on
   the event loop, plain functions in a thread pool. Results, heartbeats and
   state reports go back on the same stream, each answered by the server; the
   ones ready at the same moment travel in one message. While tasks run the
   agent reports `ACTIVE`, and `IDLE` again once it has none (at most one
   report per half second). `transport="subscribe"` uses the older shape
   instead: a SubscribeTasks stream and one unary call per result.
3. Sends heartbeats automatically (every third of the task's
   `heartbeat_timeout`) while a handler runs, and at once when the handler
   reports progress.
4. Completes the task with the handler's return value (a dict is the output;
   any other value `v` becomes `{"result": v}`; None leaves it empty), or fails
   it with the exception it raised: type and message, with the traceback in the
   details (`{"traceback": ..., "exception_type": "module.Class"}`), and logs
   the failure at WARNING with the traceback. `NonRetryableError` fails the
   task for good. An output that is not JSON-like fails it for good too,
   naming the key and the type (`output['when']: datetime is not JSON-like`),
   and so does one the server refuses (larger than 1 MiB, nested too deep).
   A result the server ignores (the lease was lost, the task finished
   meanwhile) is dropped with a warning.
5. Honours cancellations (from the stream, or a heartbeat answering
   `cancel_requested`) by cancelling the handler's asyncio task; no result is
   sent. A thread cannot be interrupted: a sync handler should check
   `task.cancelled` now and then.
6. Reconnects with jittered backoff when the server goes away (draining or
   unreachable), keeping the tasks it holds, and sends again what the server
   had not answered (results are idempotent); an assignment it already runs
   or has finished, re-sent by the server after the reconnect, is ignored. Registers again if
   the server no longer knows it. A stream the server ends normally means the
   agent was deregistered: `run()` then cancels its handlers and returns.
7. On SIGTERM or SIGINT (or `shutdown()`), stops taking work (capacity 0 on
   the work stream; the subscription is closed in the older shape), lets the
   tasks it holds finish (up to `shutdown_timeout`, after which they are
   cancelled and failed as retryable so another agent picks them up), sends
   their results, reports `FINISHED`, half-closes the stream and returns. A
   second signal skips the wait.

Logging: the agent logs to the `opscore.agent` logger. When the application has
configured no logging at all, `run()` adds a handler to the `opscore` logger
that prints WARNING and above to stderr (handler failures with their
traceback, reconnections), so the smallest agent shows what goes wrong; it
steps aside as soon as the application configures a root handler.
"""

from opscore.agent.context import TaskContext
from opscore.agent.failures import NonRetryableError
from opscore.agent.worker import TRANSPORTS, Agent, Handler

__all__ = ["TRANSPORTS", "Agent", "Handler", "NonRetryableError", "TaskContext"]
