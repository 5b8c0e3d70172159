#!/usr/bin/env python3
"""Builds DIR/results.md from the JSON reports tools/benchmark.sh leaves in DIR (default bench;
stdlib only).

    python3 tools/bench_table.py ITERATIONS_15_5 ITERATIONS_PER_STEP_15_1 [DIR]
"""
import json
import os
import sys

ORDER = ["ft", "lwf", "mib", "gsc", "hrhf", "hrhf+gsc", "joint"]


def fmt(v):
    return "-" if v is None else f"{100 * v:.1f}"


folder = sys.argv[3] if len(sys.argv) > 3 else "bench"
rows = []
for task in ["15-5", "15-1"]:
    names = [f[len(task) + 1:-5] for f in os.listdir(folder) if f.startswith(task + "-") and f.endswith(".json")]
    names.sort(key=lambda m: (ORDER.index(m) if m in ORDER else 99, m))
    for m in names:
        reports = json.load(open(os.path.join(folder, f"{task}-{m}.json")))
        last = reports[-1]
        rows.append((task, m, len(reports), last["old"], last["new"], last["all"]))
with open(os.path.join(folder, "results.md"), "w") as out:
    out.write(f"Shapes, overlap setting, from the zoo model; {sys.argv[1]} iterations for 15-5 and {sys.argv[2]} per step "
              "for 15-1 (lr 0.01; 8 real images per batch, the pack methods hrhf and hrhf+gsc add 8 fake ones); mIoU % at the last step on the first 200 validation images. "
              "Old = classes 1-15 (background excluded); new = classes 16-20; all = classes 0-20, background included.\n\n")
    out.write("| task | method | steps | old | new | all |\n| --- | --- | ---: | ---: | ---: | ---: |\n")
    for t, m, steps, o, n, a in rows:
        out.write(f"| {t} | {m} | {steps} | {fmt(o)} | {fmt(n)} | {fmt(a)} |\n")
print(open(os.path.join(folder, "results.md")).read())
