#!/usr/bin/env python
"""
Draw a run's results as one PNG (matplotlib, from the ``bench`` extra).

    .venv/bin/python bench/chart.py bench/results/all-<timestamp>.json out.png

``run_all.py --chart PATH`` calls :func:`draw` itself.
"""

from __future__ import annotations

import json
import sys
from typing import Any

COLORS = {
    "baseline": "#7f7f7f",
    "in-process": "#1f77b4",
    "unsafe": "#aec7e8",
    "pb": "#2ca02c",
    "peer": "#d62728",
    "replay": "#9467bd",
    "snapshot": "#8c564b",
    "overload": "#ff7f0e",
}


def _short(label: str) -> str:
    label = label.strip()
    for old, new in (
        ("txjournal in-process sync=True, ", "txjournal in-process, "),
        ("txjournal in-process sync=False (UNSAFE), ", "txjournal sync=False UNSAFE, "),
        ("Redis SET appendfsync always, ", "Redis always, "),
        (" commit per deposit, 1 thread", ", 1 thread"),
        (" event per deposit, 1 thread", ", 1 thread"),
        ("baseline A: write+fdatasync per 100 B record", "baseline A: write+fdatasync / record"),
        ("baseline B: 1000 records per write+fdatasync", "baseline B: 1000 records / fdatasync"),
    ):
        label = label.replace(old, new)
    return label


def _bars(ax: Any, rows: list[dict[str, Any]], values: list[float], title: str,
          unit: str, log: bool = True, target: float | None = None,
          target_label: str = "") -> None:
    labels = [_short(r["label"]) for r in rows]
    colors = [COLORS.get(r.get("group", ""), "#333333") for r in rows]
    y = list(range(len(rows)))[::-1]
    ax.barh(y, values, color=colors)
    ax.set_yticks(y)
    ax.set_yticklabels(labels, fontsize=8)
    ax.set_title(title, fontsize=11, loc="left")
    ax.set_xlabel(unit, fontsize=9)
    if log and values and min(values) > 0:
        ax.set_xscale("log")
    top = max(values, default=1)
    for yi, v in zip(y, values):
        text = f"{v:,.0f}" if v >= 100 else f"{v:.3g}"
        ax.text(v, yi, " " + text, va="center", fontsize=7)
    if target is not None:
        ax.axvline(target, color="black", linestyle="--", linewidth=1)
        ax.text(target, 0.005, f" {target_label}", fontsize=7, va="bottom",
                transform=ax.get_xaxis_transform(), backgroundcolor="white")
        top = max(top, target)
    ax.set_xlim(right=top * (4 if log else 1.3))
    ax.grid(axis="x", alpha=0.3)


def draw(payload: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = {r["key"]: r for r in payload["results"]}
    rows = list(results.values())

    fig, axes = plt.subplots(3, 2, figsize=(17, 17), layout="constrained")
    info = payload.get("info", {})
    fig.suptitle(
        f"txjournal side by side ({payload.get('mode', '?')} run {payload.get('timestamp', '')}): "
        f"{info.get('machine', '')}\n{info.get('device', '')} ({info.get('fstype', '')}); load "
        f"average before {'/'.join(f'{x:.2f}' for x in info.get('loadavg_before', []))}",
        fontsize=12,
    )

    throughput = [r for r in rows if r.get("rate") and r["group"] in
                  ("baseline", "in-process", "unsafe", "pb", "peer", "overload")]
    _bars(axes[0][0], throughput, [r["rate"] for r in throughput],
          "Durable commands (records) per second, higher is better", "per second (log)",
          target=100_000, target_label="target: 100,000/s with 1,000 callers")

    latency = [r for r in rows if r.get("p50_ms") is not None and r["group"] in
               ("baseline", "in-process", "pb", "peer")]
    ax = axes[0][1]
    labels = [_short(r["label"]) for r in latency]
    y = list(range(len(latency)))[::-1]
    ax.barh([v + 0.2 for v in y], [r["p50_ms"] for r in latency], height=0.4,
            color=[COLORS.get(r["group"], "#333") for r in latency], label="p50")
    ax.barh([v - 0.2 for v in y], [r["p99_ms"] for r in latency], height=0.4,
            color=[COLORS.get(r["group"], "#333") for r in latency], alpha=0.45, label="p99")
    for yi, r in zip(y, latency):
        ax.text(r["p50_ms"], yi + 0.2, f" {r['p50_ms']:.3g}", va="center", fontsize=7)
        ax.text(r["p99_ms"], yi - 0.2, f" {r['p99_ms']:.3g}", va="center", fontsize=7)
    ax.set_yticks(y)
    ax.set_yticklabels(labels, fontsize=8)
    ax.set_xscale("log")
    ax.set_xlim(right=max((r["p99_ms"] for r in latency), default=1) * 4)
    ax.set_title("Latency per call: p50 (solid) and p99 (pale), lower is better", fontsize=11,
                 loc="left")
    ax.set_xlabel("milliseconds (log)", fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(axis="x", alpha=0.3)

    replay = [r for r in rows if r["group"] == "replay" and r["key"] != "replay_write"]
    _bars(axes[1][0], replay, [r["rate"] for r in replay],
          "Replay: commands per second, higher is better", "commands per second",
          log=False, target=500_000, target_label="target: 500,000/s")

    snap = [r for r in rows if r["group"] == "snapshot" and r.get("max_ms") is not None]
    mib = next((r.get("extra", {}).get("model_mib") for r in snap), "?")
    seconds = results.get("snapshot", {}).get("seconds")
    _bars(axes[1][1], snap, [r["max_ms"] for r in snap],
          f"Snapshot of a {mib} MiB model: longest reactor stall, lower is better"
          + (f"\n(snapshot took {seconds:.2f} s)" if seconds else ""),
          "milliseconds (log)", target=20, target_label="target: 20 ms")

    memory = [r for r in rows if r.get("rss_mib") and r["group"] in ("replay", "overload")]
    values = [r["rss_mib"] for r in memory]
    for r in [r for r in memory if r["group"] == "overload"]:
        idle = r.get("extra", {}).get("idle_rss_mib")
        if idle:
            memory.append(dict(r, label=_short(r["label"]) + " (idle, before)"))
            values.append(idle)
    _bars(axes[2][0], memory, values,
          "Peak RSS: replay (short vs long journal) and overload (bounded vs unbounded)",
          "MiB", log=False)

    ax = axes[2][1]
    ax.axis("off")
    lines = ["Targets"]
    for t in payload.get("targets", []):
        mark = {True: "MET", False: "MISSED", None: "n/a"}[t["met"]]
        lines.append(f"[{mark}] {t['name']}\n        {t['detail']}")
    skipped = payload.get("skipped", [])
    if skipped:
        lines.append("Skipped")
        lines.extend(f"  {s['label']}: {s['reason'][:90]}" for s in skipped)
    ax.text(0, 1, "\n".join(lines), va="top", ha="left", fontsize=9, family="monospace",
            wrap=True)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in COLORS.values()]
    ax.legend(handles, list(COLORS), loc="lower left", fontsize=8, ncol=4, title="groups")

    fig.savefig(path, dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    with open(sys.argv[1]) as f:
        draw(json.load(f), sys.argv[2])
    print(f"chart written to {sys.argv[2]}")
