"""Scenario 3: workflows, written against protos/opscore/v1/workflow.proto.

* 10-step linear chain: sessions run one after another with 16 idle agents; the
  figure is session time / 10 = time per step beyond task execution (the tasks
  are no-ops, so all of it is orchestration: enqueue, assignment, completion,
  the next step's release), from StartWorkflow to the terminal WatchSession event.
* Fan-out/fan-in: one root, 998 parallel tasks, one join (1,000 tasks); time
  from StartWorkflow to the terminal event, 16 agents.
* Sessions started per second: StartWorkflow of a one-task definition, 32 calls in
  flight, no agent serving its capability (the sessions' tasks stay queued).

If WorkflowService answers UNIMPLEMENTED the scenario reports "not available in
this build" and the suite goes on.
"""

from __future__ import annotations

from typing import Any

from bench.common import (
    Context,
    CpuMeter,
    LoadGen,
    Unavailable,
    latency_summary,
    loadgens,
    metric,
    opscore_server,
    remove_db,
)
from bench.dispatch_run import split

NAME = "workflows"
TITLE = "3. Workflows"
AGENTS = 16


def _drive(ctx: Context, tag: str, driver_cfg: dict[str, Any], agents: int) -> dict[str, Any]:
    with opscore_server(ctx.work_dir, tag=tag) as srv:
        gens = (
            [
                LoadGen(
                    "agents",
                    {
                        "target": srv.target,
                        "n_agents": k,
                        "id_prefix": f"{tag}-p{j}",
                        "capability": "wf",
                        "deadline_s": 900,
                        "return_latencies": False,
                    },
                    ctx.work_dir / f"{tag}-agents{j}.log",
                )
                for j, k in enumerate(split(agents, 2))
            ]
            if agents
            else []
        )
        with loadgens(gens):
            for g in gens:
                g.wait_ready()
            drv = LoadGen(
                "workflow", {"target": srv.target, **driver_cfg}, ctx.work_dir / f"{tag}-wf.log"
            )
            with loadgens([drv]):
                drv.wait_ready()
                meter = CpuMeter({"server": [srv.pid], "loadgen": [g.pid for g in [*gens, drv]]})
                meter.start()
                drv.send("GO")
                res = drv.wait_result(timeout=driver_cfg.get("deadline_s", 600) + 60)
                meter.stop()
            for g in gens:
                g.send("STOP")
            for g in gens:
                g.wait_result(timeout=60)
    remove_db(srv.db)
    if "unavailable" in res:
        raise Unavailable(res["unavailable"])
    # The agents are still running at stop(); the driver has exited and reports its own.
    agents_cpu = meter.result()["loadgen_cpu_s"]
    res["cpu"] = meter.result({"loadgen": agents_cpu + res.get("cpu_s", 0.0)})
    return res


def run(ctx: Context) -> dict[str, Any]:
    q = ctx.quick
    plan = [
        ("chain", {"mode": "chain", "steps": 10, "sessions": 3 if q else 20}, AGENTS),
        ("fanout", {"mode": "fanout", "width": 998, "sessions": 1}, AGENTS),
        ("starts", {"mode": "starts", "n": 300 if q else 2000, "concurrency": 32}, 0),
    ]
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k, _, _ in plan}
    for rep in range(ctx.repeats):
        for key, cfg, agents in plan:
            r = _drive(ctx, f"s3-r{rep}-{key}", {**cfg, "deadline_s": 300}, agents)
            runs[key].append(r)
            ctx.say(f"  {key}: { ({k: v for k, v in r.items() if k != 'durations_s'}) }")
    chain, fan, starts = runs["chain"], runs["fanout"], runs["starts"]
    for r in [*chain, *fan]:
        if set(r["outcomes"]) != {"COMPLETED"}:
            raise RuntimeError(f"sessions did not all complete: {r['outcomes']}")
    cfgs = [
        {
            "name": "10-step linear chain, sessions one after another",
            "params": {"steps": 10, "agents": AGENTS, "sessions": plan[0][1]["sessions"]},
            "metrics": {
                "ms_per_step": metric(
                    [latency_summary(r["durations_s"])["p50_ms"] / 10 for r in chain],
                    "ms",
                    "lower",
                ),
                "session_p99_ms": metric(
                    [latency_summary(r["durations_s"])["p99_ms"] for r in chain], "ms", "lower"
                ),
            },
            "runs": chain,
        },
        {
            "name": "fan-out/fan-in session of 1,000 tasks (1 + 998 + 1)",
            "params": {"tasks": 1000, "agents": AGENTS},
            "metrics": {
                "seconds_to_complete": metric([r["durations_s"][0] for r in fan], "s", "lower"),
                "tasks_per_s": metric([1000 / r["durations_s"][0] for r in fan], "tasks/s"),
            },
            "runs": fan,
        },
        {
            "name": "StartWorkflow, one-task definition, 32 in flight",
            "params": {"n": plan[2][1]["n"], "concurrency": 32},
            "metrics": {
                "sessions_started_per_s": metric(
                    [r["started"] / r["seconds"] for r in starts], "sessions/s"
                ),
                "start_p99_ms": metric([r["start_p99_ms"] for r in starts], "ms", "lower"),
            },
            "runs": starts,
        },
    ]
    return {"title": TITLE, "status": "ok", "configs": cfgs, "ratios": [], "notes": []}
