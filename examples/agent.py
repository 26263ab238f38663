"""An example Ops-Core agent with two capabilities.

    python examples/agent.py                      # server at $OPSCORE_TARGET or 127.0.0.1:50051
    python examples/agent.py --target host:50051 --agent-id text-1 --max-in-flight 4
    python examples/agent.py --transport subscribe   # SubscribeTasks + unary results

- `text.summarize`: counts the words and sentences of a text and keeps its first
  sentences as the "summary".
- `text.translate`: "translates" a text into reversed words or pig latin.

Both do real (if trivial) work, locally, with no network. Each takes a few
seconds (`work_seconds`, default 1) and reports its progress, so that
`opscore sessions watch` has something to show. They accept a standalone task's
input (`{"text": ...}`) and a workflow task's input (`parameters`, the session
`input`, and the `upstream` outputs): `text.translate` after `text.summarize`
translates the summary.

Stop it with Ctrl-C or SIGTERM: it finishes the tasks it holds, reports FINISHED
and exits 0. A rejected API key, or a server it cannot reach at start (after a
few seconds of retries, or --wait-for-server SECONDS), ends it with one line
saying which option to fix, and exit code 1.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import sys
import time
from typing import Any

from opscore.agent import TRANSPORTS, Agent, NonRetryableError, TaskContext
from opscore.client.errors import UnauthenticatedError, UnavailableError, connection_problem

log = logging.getLogger("example-agent")


def find_text(task: TaskContext) -> str:
    """The text to work on: the task's own `text` parameter, else an upstream
    task's `summary` or `text`, else the session's (or standalone task's) `text`."""
    candidates: list[Any] = [task.parameters.get("text")]
    for output in task.upstream.values():
        if isinstance(output, dict):
            candidates += [output.get("summary"), output.get("text")]
    candidates += [task.session_input.get("text"), task.input.get("text")]
    for value in candidates:
        if isinstance(value, str) and value.strip():
            return value
    raise NonRetryableError("no text to work on: pass {'text': '...'} as input")


def option(task: TaskContext, name: str, default: Any) -> Any:
    """A setting from the task's parameters, else its (session) input."""
    for source in (task.parameters, task.session_input, task.input):
        if name in source:
            return source[name]
    return default


async def pace(task: TaskContext, steps: list[str]) -> None:
    """Stand-in for slow work: spread `work_seconds` over the steps, reporting
    progress after each."""
    seconds = float(option(task, "work_seconds", 1.0))
    for i, step in enumerate(steps, 1):
        await asyncio.sleep(seconds / len(steps))
        task.report_progress({"step": step, "done": i, "of": len(steps)})


def pace_blocking(task: TaskContext, steps: list[str]) -> None:
    """`pace` for a sync handler, which checks for cancellation between steps (a
    thread cannot be interrupted)."""
    seconds = float(option(task, "work_seconds", 1.0))
    for i, step in enumerate(steps, 1):
        time.sleep(seconds / len(steps))
        if task.cancelled:
            raise RuntimeError(f"cancelled: {task.cancel_reason}")
        task.report_progress({"step": step, "done": i, "of": len(steps)})


def build_agent(**kwargs: Any) -> Agent:
    """The example agent; keyword arguments go to `Agent`."""
    kwargs.setdefault("version", "1.0")
    agent = Agent("example-text-agent", **kwargs)

    @agent.task("text.summarize")
    async def summarize(task: TaskContext) -> dict[str, Any]:
        text = find_text(task)
        sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s.strip()]
        keep = int(option(task, "sentences", 1))
        await pace(task, ["reading", "counting", "summarizing"])
        result: dict[str, Any] = {"words": len(text.split()), "sentences": len(sentences)}
        if keep > 0:
            result["summary"] = " ".join(sentences[:keep])
        return result

    @agent.task("text.translate")
    def translate(task: TaskContext) -> dict[str, Any]:
        # A plain function: it runs in a thread, so it paces itself synchronously.
        text = find_text(task)
        language = str(option(task, "language", "reversed"))
        if language == "reversed":
            translation = " ".join(reversed(text.split()))
        elif language == "pig-latin":
            translation = " ".join(_pig_latin(w) for w in text.split())
        else:
            raise NonRetryableError(
                f"unknown language {language!r}; use 'reversed' or 'pig-latin'",
                error_type="UnknownLanguage",
            )
        pace_blocking(task, ["looking up words", "translating"])
        return {"translation": translation, "language": language}

    return agent


def _pig_latin(word: str) -> str:
    match = re.match(r"^([^aeiouAEIOU\W]*)(\w*)(\W*)$", word)
    if not match or not match.group(2):
        return word
    head, rest, tail = match.groups()
    return f"{rest}{head}ay{tail}" if head else f"{rest}way{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", help="server HOST:PORT [env OPSCORE_TARGET]")
    parser.add_argument("--api-key", help="API key [env OPSCORE_API_KEY]")
    parser.add_argument(
        "--agent-id", default=None, help="stable id [env OPSCORE_AGENT_ID; default example-text-1]"
    )
    parser.add_argument("--max-in-flight", type=int, default=2)
    parser.add_argument(
        "--transport",
        choices=TRANSPORTS,
        default="connect",
        help="connect: one work stream for everything (default); subscribe: the older "
        "SubscribeTasks stream with a unary call per result",
    )
    parser.add_argument(
        "--wait-for-server",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="how long to wait for an unreachable server at start (default: a few "
        "seconds of retries; -1: forever)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # The client's notes on each retry are noise here; its final error is not.
    logging.getLogger("opscore.client").setLevel(logging.WARNING)
    agent_id = args.agent_id or os.environ.get("OPSCORE_AGENT_ID") or "example-text-1"
    agent = build_agent(
        agent_id=agent_id,
        target=args.target,
        api_key=args.api_key,
        max_in_flight=args.max_in_flight,
        transport=args.transport,
        startup_timeout=None if args.wait_for_server < 0 else args.wait_for_server,
    )
    log.info("connecting to %s as %s", agent.client.target, agent_id)
    try:
        asyncio.run(agent.run())
    except (UnauthenticatedError, UnavailableError) as exc:
        # One line that says what to fix, not a traceback.
        problem = connection_problem(
            exc,
            agent.client.target,
            target_setting="--target or OPSCORE_TARGET",
            api_key_setting="--api-key or OPSCORE_API_KEY",
        )
        print(f"example agent: {problem or exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
