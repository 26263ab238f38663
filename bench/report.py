"""Render a results directory (one JSON file per scenario) as a Markdown report
and PNG plots:

    python -m bench.report bench/results/<timestamp>
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

DASH = "\u2013"  # en dash, for ranges
TIMES = "\u00d7"

ORDER = [
    "throughput",
    "latency",
    "workflows",
    "lifecycle",
    "scale",
    "baselines",
    "observability",
    "retention",
    "soak",
    "soak_history",
    "logging",
    "eventloop",
    "profile",
    "postgres",
]
# Columns of the soak scenario's per-window table: (key, heading).
SOAK_COLUMNS = [
    ("minute", "min"),
    ("p50_ms", "p50 ms"),
    ("p99_ms", "p99 ms"),
    ("max_ms", "max ms"),
    ("server_cpu_us_per_task", "server µs/task"),
    ("loop_thread_us_per_task", "loop thread µs/task"),
    ("other_threads_us_per_task", "other threads µs/task"),
    ("loadgen_cpu_us_per_task", "loadgen µs/task"),
    ("disk_write_kib_per_task", "disk KiB/task"),
    ("wal_frames_per_task", "WAL frames/task"),
    ("wal_restarts", "WAL restarts"),
    ("db_mib", "db MiB"),
    ("wal_mib", "WAL MiB"),
    ("rss_mib", "RSS MiB"),
    ("gc_pause_ms", "GC ms"),
    ("gc_max_pause_ms", "GC max ms"),
    ("enqueue_call_p99_ms", "enqueue p99 ms"),
    ("enqueuer_behind_ms", "behind ms"),
    ("loadavg_1m", "load"),
]


def load(results: Path) -> list[dict[str, Any]]:
    docs = []
    for name in ORDER:
        p = results / f"{name}.json"
        if p.exists():
            docs.append(json.loads(p.read_text()))
    return docs


def fmt(v: float | None) -> str:
    if v is None or v != v:
        return DASH
    a = abs(v)
    if a >= 100:
        return f"{v:,.0f}"
    if a >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def render(results: Path) -> str:
    docs = load(results)
    if not docs:
        return f"No results in {results}\n"
    head = docs[0]
    m = head["machine"]
    quick = " (QUICK smoke run: small N)" if head["quick"] else ""
    dirty = " (work tree dirty)" if head["git"]["dirty"] else ""
    lines = [
        f"# Ops-Core benchmark report{quick}",
        "",
        f"- Command: `{head['command']}`",
        f"- Commit: `{head['git']['describe']}`{dirty}",
        f"- Machine: {m['cpu_count']} {TIMES} {m['cpu_model']}, {m['memory_gib']} GiB, "
        f"Python {m['python']}, {m['platform']}; load average at start "
        f"{', '.join(f'{x:.2f}' for x in m['loadavg_at_start'])}"
        + (
            f"; Python speed at start {m['python_speed_ms_at_start']:.1f} ms "
            "(`sum(range(10**6))`, best of 5: lower is faster; compare runs on "
            "different hosts by it)"
            if "python_speed_ms_at_start" in m
            else ""
        ),
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()),
        f"- Repeats: {head['repeats']}; every figure is the median of the repeats with "
        f"[min{DASH}max]; ratios are computed from medians of this same run.",
        "- Server under test: `python -m opscore serve --listen 127.0.0.1:<free port> "
        "--db <fresh file> --log-level WARNING` (default durability: WAL, "
        "synchronous=FULL), a fresh database per run, stopped with SIGTERM and exit "
        "code checked. The server's default log level is INFO (one JSON line per RPC); "
        "scenario 10 measures INFO against WARNING.",
        "",
    ]
    targets = [(d, t) for d in docs for t in d.get("targets", [])]
    if targets:
        lines += ["## Against the targets (issues 10 and 11)", ""]
        lines.append("| issue | target | measured | verdict |")
        lines.append("|---|---|---|---|")
        for _d, t in targets:
            # met None: a figure the issue asks to report, with no bound to meet.
            verdict = "reported" if t["met"] is None else "met" if t["met"] else "**not met**"
            lines.append(f"| {t.get('issue', 10)} | {t['target']} | {t['measured']} | {verdict} |")
        lines.append("")
    for d in docs:
        lines.append(f"## {d.get('title', d['scenario'])}")
        lines.append("")
        status = d.get("status", "ok")
        if status != "ok":
            lines.append(f"**{status}**")
            lines.append("")
        if d.get("configs"):
            lines.append(f"| configuration | figure | median | [min{DASH}max] | unit |")
            lines.append("|---|---|---:|---:|---|")
            for c in d["configs"]:
                for k, mt in c["metrics"].items():
                    lines.append(
                        f"| {c['name']} | {k} | {fmt(mt['median'])} | "
                        f"[{fmt(mt['min'])}{DASH}{fmt(mt['max'])}] | {mt['unit']} |"
                    )
            lines.append("")
        if d.get("ratios"):
            lines.append("| ratio (within this run) | value |")
            lines.append("|---|---:|")
            for r in d["ratios"]:
                # Three places: at two, 0.497 would read as a target of 0.5 met.
                lines.append(f"| {r['name']} | {r['value']:.3f} |")
            lines.append("")
        tables = d.get("window_tables") or (
            [{"title": "the soak", "windows": d["windows"]}] if d.get("windows") else []
        )
        for table in tables:
            lines.append(f"Per window, {table['title']}:")
            lines.append("")
            lines.append("| " + " | ".join(h for _, h in SOAK_COLUMNS) + " | py-spy |")
            lines.append("|" + "---:|" * len(SOAK_COLUMNS) + "---|")
            for w in table["windows"]:
                cells = [fmt(w.get(k)) for k, _ in SOAK_COLUMNS]
                lines.append("| " + " | ".join(cells) + f" | {'yes' if w.get('py_spy') else ''} |")
            lines.append("")
        for prof in d.get("profiles", []):
            lines.append(_profile_md(prof, results))
        for prof in (r for c in d.get("configs", []) for r in c.get("runs", [])):
            for pr in prof.get("profiles", []) if isinstance(prof, dict) else []:
                lines.append(_profile_md(pr, results))
        for n in d.get("notes", []):
            lines.append(f"- {n}")
        if d.get("notes"):
            lines.append("")
    pngs = sorted(p.name for p in results.glob("*.png"))
    if pngs:
        lines.append("## Plots")
        lines.append("")
        for p in pngs:
            lines.append(f"![{p}]({p})")
        lines.append("")
    return "\n".join(lines)


def _profile_md(prof: dict[str, Any], results: Path) -> str:
    from bench.pyspy import render as render_profile
    from bench.pyspy import summarize

    if "max_in_flight" in prof:
        title = (
            f"py-spy, work stream, max_in_flight {prof['max_in_flight']} "
            f"({prof['tasks_per_s_under_pyspy']:,.0f} tasks/s under sampling; {prof['file']})"
        )
    else:
        title = f"py-spy, soak {prof['label']} (from {prof['at_s']:.0f} s)"
    # Summarized again from the raw stacks when they are there, so a report
    # re-rendered later uses the current grouping.
    raw = results / prof["file"] if prof.get("file") else None
    summary = dict(summarize(raw) if raw is not None and raw.exists() else prof["summary"])
    for key in ("top_python_leaves", "top_ours_inclusive"):
        summary[key] = summary[key][:10]
    return "#### " + render_profile(summary, title)


def plots(results: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    by = {d["scenario"]: d for d in load(results)}
    quick = " (QUICK)" if any(d["quick"] for d in by.values()) else ""
    tp = by.get("throughput")
    if tp and tp.get("configs"):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for shape, mode, mif, label in (
            ("unary", "unary", 1, "Ops-Core, unary shape, EnqueueTask"),
            ("unary", "batch", 1, "Ops-Core, unary shape, EnqueueTasks (batch 1,000)"),
            ("stream", "batch", 1, "Ops-Core, work stream, EnqueueTasks, max_in_flight 1"),
            ("stream", "batch", 4, "Ops-Core, work stream, EnqueueTasks, max_in_flight 4"),
        ):
            pts = sorted(
                (c["params"]["agents"], c["metrics"]["tasks_per_s"])
                for c in tp["configs"]
                if (c["params"].get("shape", "unary"), c["params"]["mode"]) == (shape, mode)
                and c["params"].get("mif", 1) == mif
                and c["params"]["log_level"] == "WARNING"
            )
            if pts:
                xs = [p[0] for p in pts]
                ys = [p[1]["median"] for p in pts]
                err = [
                    [y - p[1]["min"] for y, p in zip(ys, pts, strict=True)],
                    [p[1]["max"] - y for y, p in zip(ys, pts, strict=True)],
                ]
                ax.errorbar(xs, ys, yerr=err, marker="o", capsize=4, label=label)
        bl = by.get("baselines")
        if bl and bl.get("configs"):
            for system, pattern, label, marker in (
                ("bare", "unary", "bare grpc.aio, unary shape (ceiling)", "s"),
                ("bare", "stream", "bare grpc.aio, work stream, max_in_flight 1", "s"),
                ("bare", "stream4", "bare grpc.aio, work stream, max_in_flight 4", "s"),
                ("celery", "unary", "Celery 5 + Redis, apply_async", "^"),
            ):
                pts = sorted(
                    (c["params"]["agents"], c["metrics"]["tasks_per_s"])
                    for c in bl["configs"]
                    if c["params"]["system"] == system
                    and c["params"].get("pattern", "unary") == pattern
                )
                if pts:
                    xs = [p[0] for p in pts]
                    ys = [p[1]["median"] for p in pts]
                    err = [
                        [y - p[1]["min"] for y, p in zip(ys, pts, strict=True)],
                        [p[1]["max"] - y for y, p in zip(ys, pts, strict=True)],
                    ]
                    ax.errorbar(
                        xs, ys, yerr=err, marker=marker, capsize=4, linestyle="--", label=label
                    )
        ax.set_xscale("log", base=2)
        ticks = sorted({c["params"]["agents"] for c in tp["configs"]})
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.set_xlabel("agents (Celery: worker processes)")
        ax.set_ylabel(f"tasks/s, end to end (median, min{DASH}max)")
        ax.set_title(f"Throughput vs agents{quick}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        p = results / "throughput_vs_agents.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        made.append(p)
    lat = by.get("latency")
    if lat and lat.get("configs"):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        series = (("opscore", "unary", "--"), ("opscore", "stream", "-"), ("bare", "stream", ":"))
        for server, shape, style in series:
            cs = [
                c
                for c in lat["configs"]
                if c["params"].get("shape", "unary") == shape
                and c["params"].get("server", "opscore") == server
            ]
            if not cs:
                continue
            rates = [c["params"]["rate"] for c in cs]
            for k in ("p50_ms", "p99_ms") if server == "opscore" else ("p99_ms",):
                ms = [c["metrics"][k] for c in cs]
                ys = [x["median"] for x in ms]
                err = [
                    [y - x["min"] for y, x in zip(ys, ms, strict=True)],
                    [x["max"] - y for y, x in zip(ys, ms, strict=True)],
                ]
                name = "work stream" if shape == "stream" else "unary shape"
                if server == "bare":
                    name = f"bare grpc.aio, {name}"
                ax.errorbar(
                    rates,
                    ys,
                    yerr=err,
                    marker="o",
                    capsize=4,
                    linestyle=style,
                    label=f"{name} {k.replace('_ms', '')}",
                )
        ax.axhline(2, color="grey", linestyle=":", label="2 ms (work stream p99 target at 500/s)")
        ax.set_yscale("log")
        ax.set_xlabel("offered rate (tasks/s, unary EnqueueTask, open loop)")
        ax.set_ylabel("enqueue → assignment received (ms)")
        ax.set_title(f"Latency percentiles vs offered rate, 16 idle agents{quick}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        p = results / "latency_vs_rate.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        made.append(p)
    soak = by.get("soak")
    tables = (soak or {}).get("window_tables") or [{"windows": (soak or {}).get("windows")}]
    if soak and tables[0]["windows"]:
        ws = tables[0]["windows"]
        fig, ax = plt.subplots(figsize=(7, 4.5))
        xs = [w["minute"] for w in ws]
        ax.plot(xs, [w.get("p99_ms") for w in ws], marker="o", label="p99 enqueue → assignment")
        ax.plot(xs, [w.get("p50_ms") for w in ws], marker=".", label="p50")
        ax.set_xlabel("minute of the soak (window start)")
        ax.set_ylabel("ms")
        ax.grid(True, alpha=0.3)
        ax2 = ax.twinx()
        ax2.plot(
            xs, [w.get("db_mib") for w in ws], color="grey", linestyle=":", label="db MiB (right)"
        )
        ax2.set_ylabel("database MiB")
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = ax2.get_legend_handles_labels()
        ax.legend(h1 + h2, l1 + l2, fontsize=8, loc="upper left")
        ax.set_title(f"Soak: 200 tasks/s, 200 agents, per window{quick}")
        fig.tight_layout()
        p = results / "soak_windows.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        made.append(p)
    return made


def write(results: Path) -> Path:
    try:
        plots(results)
    except ImportError as e:  # matplotlib missing: the report still renders
        print(f"plots skipped: {e}", file=sys.stderr)
    md = render(results)
    path = results / "report.md"
    path.write_text(md)
    return path


if __name__ == "__main__":
    print(write(Path(sys.argv[1])).read_text())
