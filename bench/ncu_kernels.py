#!/usr/bin/env python3
"""Per-kernel summary of an `ncu --csv --page raw` report (GPU machine).

Groups the profiled launches by kernel name and grid size and prints, per
group, the launch count and the median of each metric (time in us, the
others as ncu reports them). Usage (scripts/gpu_check.sh --profile runs it):

  ncu --csv --page raw --metrics gpu__time_duration.sum,launch__grid_size,... \\
      gpu_bench --db DIR --context ctx_000 --iters 1 > report.csv
  python3 bench/ncu_kernels.py report.csv
"""
import collections
import csv
import sys


def number(text):
    """A metric's value; 0 where ncu reports none (e.g. "No-CC")."""
    try:
        return float(text.replace(",", "") or 0)
    except ValueError:
        return 0.0


def main(path):
    rows = list(csv.reader(open(path)))
    starts = [i for i, r in enumerate(rows) if r and r[0] == "ID"]
    if not starts:
        sys.exit(f"{path}: no ncu raw table (was the profile empty?)")
    header = rows[starts[0]]
    col = {name: i for i, name in enumerate(header)}
    # Requested metrics carry a roll-up suffix (".sum", ".avg.pct_of_...").
    # Newer ncu also lists every device and launch attribute (no suffix) and
    # each metric under every roll-up (avg, max, min, sum): one column per
    # metric is kept, the duration's sum and the others' average.
    metrics, seen = [], set()
    for m in header:
        base, _, rollup = m.partition(".")
        if "__" not in m or not rollup or base in seen:
            continue
        variants = [x for x in header if x.partition(".")[0] == base]
        want = ".sum" if base == "gpu__time_duration" else ".avg"
        metrics.append(next((x for x in variants if x[len(base):].startswith(want)), m))
        seen.add(base)
    groups = collections.OrderedDict()
    for r in rows[starts[0] + 2:]:  # (the row after the header holds the units)
        if len(r) < len(header):
            continue
        name = r[col["Kernel Name"]].split("(")[0].split("<")[0].replace("void ", "").replace("sqz::gpu::", "")
        key = (name, r[col["launch__grid_size"]] if "launch__grid_size" in col else "")
        groups.setdefault(key, []).append([number(r[col[m]]) for m in metrics])
    print("kernel grid launches " + " ".join(metrics))
    for (name, grid), values in groups.items():
        med = [sorted(v[i] for v in values)[len(values) // 2] for i in range(len(metrics))]
        shown = [f"{x / 1000:.1f}us" if m.startswith("gpu__time_duration") else f"{x:.1f}"
                 for m, x in zip(metrics, med)]
        print(f"{name} {grid} {len(values)} " + " ".join(shown))


if __name__ == "__main__":
    main(sys.argv[1])
