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
    quick = " (QUICK smoke run: small N, 1 repeat)" if head["quick"] else ""
    dirty = " (work tree dirty)" if head["git"]["dirty"] else ""
    lines = [
        f"# Ops-Core benchmark report{quick}",
        "",
        f"- Command: `{head['command']}`",
        f"- Commit: `{head['git']['describe']}`{dirty}",
        f"- Machine: {m['cpu_count']} {TIMES} {m['cpu_model']}, {m['memory_gib']} GiB, "
        f"Python {m['python']}, {m['platform']}; load average at start "
        f"{', '.join(f'{x:.2f}' for x in m['loadavg_at_start'])}",
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()),
        f"- Repeats: {head['repeats']}; every figure is the median of the repeats with "
        f"[min{DASH}max]; ratios are computed from medians of this same run.",
        "- Server under test: `python -m opscore serve --listen 127.0.0.1:<free port> "
        "--db <fresh file> --log-level WARNING` (default durability: WAL, "
        "synchronous=FULL), a fresh database per run, stopped with SIGTERM and exit "
        "code checked. The server's default log level is INFO (one JSON line per RPC); "
        "scenario 1 also runs one configuration at INFO to show its cost.",
        "",
    ]
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
                lines.append(f"| {r['name']} | {r['value']:.2f} |")
            lines.append("")
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
        for mode, label in (
            ("unary", "Ops-Core, EnqueueTask (unary)"),
            ("batch", "Ops-Core, EnqueueTasks (batch 1,000)"),
        ):
            pts = sorted(
                (c["params"]["agents"], c["metrics"]["tasks_per_s"])
                for c in tp["configs"]
                if c["params"]["mode"] == mode and c["params"]["log_level"] == "WARNING"
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
            for system, label, marker in (
                ("bare", "bare grpc.aio, unary (ceiling)", "s"),
                ("celery", "Celery 5 + Redis, apply_async", "^"),
            ):
                pts = sorted(
                    (c["params"]["agents"], c["metrics"]["tasks_per_s"])
                    for c in bl["configs"]
                    if c["params"]["system"] == system
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
        rates = [c["params"]["rate"] for c in lat["configs"]]
        for k in ("p50_ms", "p90_ms", "p99_ms", "max_ms"):
            ms = [c["metrics"][k] for c in lat["configs"]]
            ys = [x["median"] for x in ms]
            err = [
                [y - x["min"] for y, x in zip(ys, ms, strict=True)],
                [x["max"] - y for y, x in zip(ys, ms, strict=True)],
            ]
            ax.errorbar(rates, ys, yerr=err, marker="o", capsize=4, label=k.replace("_ms", ""))
        ax.axhline(5, color="grey", linestyle=":", label="5 ms (p99 target at 500/s)")
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
