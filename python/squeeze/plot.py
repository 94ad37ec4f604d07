"""Pick a budget by looking: recall of attention mass against the fraction of
the KV read, from a `sqctl eval --json` report (or squeeze.quality's).

    sqctl eval --db DIR --context NAME --queries Q.safetensors --json > eval.json
    python -m squeeze.plot eval.json --out recall.png

One panel per head kind (all, concentrated, spread query heads, as sqctl eval
classifies them): for each configuration, the share of the true attention
mass the selection captured (solid) and the best any selection of that size
could capture (the oracle, dashed), against the share of the context's KV
bytes read. Budgets and calibrated thresholds, flat and hierarchical, are
separate series.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any

KINDS = ("all", "concentrated", "spread")


def _series(report: dict) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for c in report["configs"]:
        if c["mode"] == "dense":
            continue
        key = f"{c['mode']} {'hierarchical' if c['hierarchical'] else 'flat'}"
        groups.setdefault(key, []).append(c)
    for rows in groups.values():
        rows.sort(key=lambda c: c["read_fraction"])
    return groups


def plot_eval(report: dict[str, Any], out: str, title: str | None = None) -> str:
    """Writes the recall-vs-KV-read figure of an eval report to `out` (PNG)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = _series(report)
    if not groups:
        raise ValueError("the report has no sparse configurations to plot")
    kinds = [k for k in KINDS if any(c.get(k, {}).get("samples", 0) for c in report["configs"])]
    fig, axes = plt.subplots(1, len(kinds), figsize=(4.2 * len(kinds), 3.8), sharey=True, squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, kind in zip(axes[0], kinds):
        for i, (name, rows) in enumerate(sorted(groups.items())):
            x = [100 * r["read_fraction"] for r in rows]
            ax.plot(x, [r[kind]["recall_mean"] for r in rows], "o-", color=colors[i % len(colors)], label=name)
            ax.plot(x, [r[kind]["oracle_mean"] for r in rows], "--", color=colors[i % len(colors)], alpha=0.5)
            for r, xi in zip(rows, x):
                lab = f"{r['budget']:g}" if r["mode"] == "budget" else f"q{r['threshold_quantile']:g}"
                ax.annotate(lab, (xi, r[kind]["recall_mean"]), fontsize=6, textcoords="offset points",
                            xytext=(3, -8))
        heads = report.get(f"heads_{kind}") if kind != "all" else None
        ax.set_title(f"{kind} query heads" + (f" ({heads})" if heads is not None else ""), fontsize=10)
        ax.set_xlabel("KV read (% of the context's bytes)")
        ax.set_xlim(left=0)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("attention mass captured (dashed: oracle)")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.suptitle(title or f"context {report.get('context', '?')}: recall vs KV read", fontsize=11)
    fig.tight_layout()
    fig.savefig(out, dpi=130)
    plt.close(fig)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m squeeze.plot", description=__doc__.split("\n")[0])
    p.add_argument("report", help="`sqctl eval --json` output ('-' for stdin)")
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument("--title")
    a = p.parse_args(argv)
    try:
        report = json.load(sys.stdin if a.report == "-" else open(a.report))
        plot_eval(report, a.out, a.title)
    except (OSError, ValueError, KeyError) as e:
        print(f"error: {a.report}: {e}", file=sys.stderr)
        return 1
    print(a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
