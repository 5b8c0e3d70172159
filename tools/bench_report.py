#!/usr/bin/env python3
"""Builds the benchmark's tables, comparisons and plots from the result files tools/benchmark.sh
writes (bench/results/TASK-SETTING-METHOD-sSEED.json) and from nothing else.

    python3 tools/bench_report.py [--results bench/results [MORE ...]] [--out bench/report.md]
        [--images docs/images] [--no-plots] [--tasks TASK ...] [--readme README.md [--check]]

With --readme it also rewrites the README's generated blocks, each between
`<!-- bench_report: KIND TASK SETTING -->` and `<!-- /bench_report -->` (KIND: table or comparisons of
the main methods, ablation-table or ablation-comparisons of the ablation rows and their references),
from the same files; with --check it writes nothing and fails where a block differs from the results.

The tables give mean +- sample standard deviation over the seeds, with n. A method "beats"
another where the difference of their means exceeds twice its standard error,
    |mean_A - mean_B| > 2 * sqrt(sd_A^2 / n_A + sd_B^2 / n_B),
and is "not distinguishable" from it otherwise; with fewer than 2 seeds on either side no claim
is made. The plots (one PNG per multi-step task: all, old and new mIoU after each step, one line
per method with a band of +- one standard deviation) need matplotlib, in the tools only.
"""

import argparse
import csv
import json
import math
import os
import re
import sys
from collections import defaultdict

MAIN = ["ft", "lwf", "mib", "plop", "gsc", "hrhf", "hrhf+gsc", "joint"]
# Each ablation row against the row it changes one thing of.
ABLATION_REFERENCE = {
    "hrhf+gsc-no-compensation": "hrhf+gsc",
    "hrhf+gsc-no-soft-sharp": "hrhf+gsc",
    "hrhf+gsc-no-relation": "hrhf+gsc",
    "hrhf+gsc-no-proto": "hrhf+gsc",
    "hrhf+gsc-no-fake": "hrhf+gsc",
    "hrhf-no-saa": "hrhf",
    "hrhf-real16": "hrhf",
    "mib-batch16": "mib",
    "hrhf-reached50": "hrhf",
    "hrhf-no-fake-ce": "hrhf",
}
# The comparisons the benchmark exists for, then each method against the strongest baselines.
KEY_PAIRS = [("hrhf+gsc", "mib"), ("hrhf+gsc", "plop"), ("hrhf", "mib"), ("hrhf", "plop"), ("gsc", "mib"),
             ("gsc", "plop"), ("hrhf+gsc", "hrhf"), ("hrhf+gsc", "gsc"), ("plop", "mib"),
             # The batch-size control: as many images (8 real + 8 fake against 16 real), as many real ones (16).
             ("hrhf", "mib-batch16"), ("hrhf+gsc", "mib-batch16"), ("hrhf-real16", "mib-batch16")]
TASK_ORDER = [("15-5", "overlap"), ("15-1", "overlap"), ("10-1", "overlap"), ("15-1", "disjoint")]
METRICS = ["old", "new", "all"]
# What the README adds to the name of a row that is not a plain method.
README_NOTES = {
    "gsc": "pack for prototypes only", "joint": "all data, upper reference",
    "hrhf+gsc-no-compensation": "gradient compensation off", "hrhf+gsc-no-soft-sharp": "soft and sharp terms off",
    "hrhf+gsc-no-relation": "relation term off", "hrhf+gsc-no-proto": "prototype re-labelling off",
    "hrhf+gsc-no-fake": "pack for prototypes only", "hrhf-no-saa": "packs without Scale-Aware Aggregation",
    "hrhf-real16": "16 real + 16 fake images", "mib-batch16": "16 real images",
}
# References, not contenders: never marked best.
REFERENCE_ROWS = {"joint"}


class ResultError(Exception):
    pass


def load(*folders):
    """{(task, setting): {method: [result, ...]}} from every *.json in the folders, checked (a run in two
    folders is refused)."""
    groups = defaultdict(lambda: defaultdict(list))
    seen = {}
    for folder, name in [(f, n) for f in folders for n in sorted(os.listdir(f))]:
        if not name.endswith(".json"):
            continue
        path = os.path.join(folder, name)
        if name in seen:
            raise ResultError(f"{path}: the same run as {seen[name]}")
        seen[name] = path
        try:
            with open(path) as f:
                r = json.load(f)
            key = (r["task"], r["setting"], r["method"], r["seed"])
            steps = r["steps"]
            budget = r["budget"]
            budget["iterations_per_step"], budget["batch"], budget["eval_images"]
            r["code_commit"], r["machine"]["cpu"], r["machine"]["simd"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ResultError(f"{path}: not a benchmark result ({e})")
        if name != "%s-%s-%s-s%d.json" % key:
            raise ResultError(f"{path}: holds {key}, which is not what its name says")
        if not steps or [s["step"] for s in steps] != list(range(1, len(steps) + 1)):
            raise ResultError(f"{path}: steps must be 1, 2, ... in order")
        runs = groups[(r["task"], r["setting"])][r["method"]]
        if runs and (runs[0]["budget"] != budget or len(runs[0]["steps"]) != len(steps)):
            raise ResultError(f"{path}: budget or steps differ from {runs[0]['_file']}: runs of another budget "
                              "belong in another results folder")
        r["_file"] = path
        runs.append(r)
    return groups


def mean_sd(values):
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return mean, sd, n


def metric(runs, name, step=-1):
    """The metric (%) of every seed at a step (default the last); None where a run has no value (hrhf-distill's
    JSON leaves out a mean over no class, e.g. new classes absent from the evaluated images)."""
    values = [r["steps"][step].get(name) for r in runs]
    return None if any(v is None for v in values) else [100 * v for v in values]


def cell(values):
    if values is None:
        return "-"
    mean, sd, n = mean_sd(values)
    return f"{mean:.1f}" if sd is None else f"{mean:.1f} ± {sd:.1f}"


def compare(a, b):
    """(verdict, difference of means, 2 standard errors) of seed values a against b."""
    ma, sa, na = mean_sd(a)
    mb, sb, nb = mean_sd(b)
    diff = ma - mb
    if na < 2 or nb < 2:
        return "no claim (n=1)", diff, None
    bound = 2 * math.sqrt(sa ** 2 / na + sb ** 2 / nb)
    if abs(diff) > bound:
        return ("beats" if diff > 0 else "is beaten by"), diff, bound
    return "not distinguishable from", diff, bound


def ordered_methods(methods):
    main = [m for m in MAIN if m in methods]
    return main + sorted(m for m in methods if m not in MAIN)


def ordered_tasks(groups):
    known = [k for k in TASK_ORDER if k in groups]
    return known + sorted(k for k in groups if k not in TASK_ORDER)


def task_label(task, setting):
    return task if setting == "overlap" else f"{task} {setting}"


def summary_table(groups):
    """All mIoU at the last step of each task: every row, the main methods first."""
    tasks = ordered_tasks(groups)
    methods = ordered_methods({m for t in tasks for m in groups[t]})
    lines = ["| method | " + " | ".join(task_label(*t) + " all" for t in tasks) + " |",
             "| --- |" + " ---: |" * len(tasks)]
    for m in methods:
        cells = []
        for t in tasks:
            runs = groups[t].get(m)
            cells.append("" if not runs else f"{cell(metric(runs, 'all'))} (n={len(runs)})")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def task_table(runs_by_method):
    lines = ["| method | n | old | new | all |", "| --- | ---: | ---: | ---: | ---: |"]
    for m in ordered_methods(runs_by_method):
        runs = runs_by_method[m]
        lines.append(f"| {m} | {len(runs)} | " + " | ".join(cell(metric(runs, k)) for k in METRICS) + " |")
    return "\n".join(lines)


def step_table(runs_by_method):
    steps = max(len(r[0]["steps"]) for r in runs_by_method.values())
    lines = ["| method | n | " + " | ".join(f"step {s}" for s in range(1, steps + 1)) + " |",
             "| --- | ---: |" + " ---: |" * steps]
    for m in ordered_methods(runs_by_method):
        runs = runs_by_method[m]
        cells = [cell(metric(runs, "all", s)) for s in range(len(runs[0]["steps"]))]
        lines.append(f"| {m} | {len(runs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def class_iou_cell(runs, cls):
    """IoU % of class `cls` at the last step, mean over the seeds that have one ("-" for none): a class
    absent from the evaluated images has no IoU (null), and a run without per-class IoU has none."""
    values = [r["steps"][-1].get("perClass", [])[cls:cls + 1] for r in runs]
    values = [v[0] for v in values if v and v[0] is not None]
    return f"{100 * sum(values) / len(values):.1f}" if values else "-"


def class_table(runs_by_method):
    """IoU % of every seen class at the last step, mean over seeds, one column per main method: where a
    method's old / new mean comes from. None when the files hold no per-class IoU."""
    methods = [m for m in ordered_methods(runs_by_method) if m in MAIN]
    last = {m: [r["steps"][-1] for r in runs_by_method[m]] for m in methods}
    if not methods or any("perClass" not in s or "classNames" not in s for ss in last.values() for s in ss):
        return None
    names = last[methods[0]][0]["classNames"]
    old = set(last[methods[0]][0].get("oldClasses", []))
    if any(s["classNames"] != names or len(s["perClass"]) != len(names) for ss in last.values() for s in ss):
        raise ResultError("runs of one task name different classes")
    lines = ["| class | " + " | ".join(methods) + " |", "| --- |" + " ---: |" * len(methods)]
    for i, name in enumerate(names):
        kind = "old" if i in old else ("new" if i else "bg")
        cells = [class_iou_cell(runs_by_method[m], i) for m in methods]
        lines.append(f"| {i} {name} ({kind}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def read_step_packs(path):
    """The rows tools/bench_step_packs.py wrote: one per pack made between two steps of a run."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        for r in rows:
            for k in ("seed", "step", "class", "images"):
                r[k] = int(r[k])
            for k in ("target_area", "achieved_area", "area_correlation", "target_present"):
                r[k] = float(r[k])
    except (KeyError, TypeError, ValueError) as e:
        raise ResultError(f"{path}: not a step-pack table ({e})")
    return rows


def step_pack_table(task, setting, runs_by_method, step_packs, methods=("mib", "hrhf", "hrhf+gsc")):
    """Each class a pack rehearsed from the step after its own: the pack methods' packs' mean area correlation
    and share of images showing the class, beside each method's IoU of it at the last step. None without packs."""
    packs = defaultdict(list)
    for r in step_packs:
        if (r["task"], r["setting"]) == (task, setting) and r["method"] in ("hrhf", "hrhf+gsc"):
            packs[(r["step"], r["class"])].append(r)
    methods = [m for m in methods if m in runs_by_method]
    if not packs or not methods:
        return None
    names = runs_by_method[methods[0]][0]["steps"][-1].get("classNames")
    lines = ["| step | class | packs | area asked | area achieved | area correlation | images showing it | " +
             " | ".join(f"{m} IoU" for m in methods) + " |",
             "| ---: | --- | ---: | ---: | ---: | ---: | ---: |" + " ---: |" * len(methods)]
    for step, cls in sorted(packs):
        ps = packs[(step, cls)]
        mean = lambda key: sum(p[key] for p in ps) / len(ps)  # noqa: E731
        ious = [class_iou_cell(runs_by_method[m], cls) for m in methods]
        name = f"{cls} {names[cls]}" if names and cls < len(names) else str(cls)
        lines.append(f"| {step} | {name} | {len(ps)} | {100 * mean('target_area'):.0f}% | "
                     f"{100 * mean('achieved_area'):.0f}% | {mean('area_correlation'):.2f} | "
                     f"{100 * mean('target_present'):.0f}% | " + " | ".join(ious) + " |")
    return "\n".join(lines)


def readme_table(runs_by_method):
    """The README's table of a task: old / new / all at the last step, n, the best mean of each column (not
    counting the reference rows) in bold."""
    methods = ordered_methods(runs_by_method)
    values = {m: {k: metric(runs_by_method[m], k) for k in METRICS} for m in methods}
    best = {}
    for k in METRICS:
        means = [round(mean_sd(values[m][k])[0], 1) for m in methods if m not in REFERENCE_ROWS and values[m][k]]
        best[k] = max(means) if means else None
    lines = ["| method | n | old | new | all |", "| --- | ---: | ---: | ---: | ---: |"]
    for m in methods:
        cells = []
        for k in METRICS:
            text = cell(values[m][k])
            bold = m not in REFERENCE_ROWS and values[m][k] and round(mean_sd(values[m][k])[0], 1) == best[k]
            cells.append(f"**{text}**" if bold else text)
        label = f"{m} ({README_NOTES[m]})" if m in README_NOTES else m
        lines.append(f"| {label} | {len(runs_by_method[m])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def readme_block(groups, kind, task, setting):
    """The text of one generated README block."""
    runs_by_method = groups.get((task, setting))
    if not runs_by_method:
        raise ResultError(f"no results for {task_label(task, setting)}")
    main = {m: r for m, r in runs_by_method.items() if m in MAIN}
    pairs = ablation_pairs(runs_by_method)
    # The ablation rows with the rows they are set against.
    with_references = {m: runs_by_method[m] for m in ordered_methods({m for p in pairs for m in p})}
    if kind in ("ablation-table", "ablation-comparisons") and not pairs:
        raise ResultError(f"no ablation results for {task_label(task, setting)}")
    if kind == "table":
        return readme_table(main)
    if kind == "comparisons":
        return "\n".join(comparison_lines(main))
    if kind == "ablation-table":
        return readme_table(with_references)
    if kind == "ablation-comparisons":
        return "\n".join(comparison_lines(runs_by_method, pairs))
    raise ResultError(f"unknown block kind {kind!r} (table, comparisons, ablation-table or ablation-comparisons)")


README_BLOCK = re.compile(r"(<!-- bench_report: (\S+) (\S+) (\S+) -->\n)(.*?)(<!-- /bench_report -->)", re.S)


def update_readme(text, groups):
    """(new text, names of the blocks that changed) with every generated block rebuilt from groups."""
    changed = []

    def rebuild(match):
        head, kind, task, setting, old, tail = match.groups()
        new = readme_block(groups, kind, task, setting) + "\n"
        if new != old:
            changed.append(f"{kind} {task} {setting}")
        return head + new + tail

    updated = README_BLOCK.sub(rebuild, text)
    if text.count("<!-- bench_report:") != len(README_BLOCK.findall(text)):
        raise ResultError("a `<!-- bench_report: KIND TASK SETTING -->` marker has no `<!-- /bench_report -->`")
    return updated, changed


def ablation_pairs(runs_by_method):
    """Each ablation row against its reference, and the key pairs that hold an ablation row, as present."""
    pairs = [(a, ref) for a, ref in ABLATION_REFERENCE.items()]
    pairs += [p for p in KEY_PAIRS if p[0] in ABLATION_REFERENCE or p[1] in ABLATION_REFERENCE]
    return [p for p in pairs if p[0] in runs_by_method and p[1] in runs_by_method]


def comparison_lines(runs_by_method, pairs=None):
    """The given pairs (default: every key pair and ablation present), on all / old / new at the last step."""
    if pairs is None:
        pairs = [p for p in KEY_PAIRS if p[0] in runs_by_method and p[1] in runs_by_method]
        pairs += [p for p in ablation_pairs(runs_by_method) if p not in pairs]
    lines = []
    for a, b in pairs:
        parts = []
        for k in ["all", "old", "new"]:
            va, vb = metric(runs_by_method[a], k), metric(runs_by_method[b], k)
            if va is None or vb is None:
                continue
            verdict, diff, bound = compare(va, vb)
            margin = "" if bound is None else f", 2 SE {bound:.1f}"
            parts.append(f"{k}: {verdict} ({diff:+.1f}{margin})")
        lines.append(f"- **{a}** vs **{b}**: " + "; ".join(parts))
    return lines


def colour(method):
    """The same colour for a method in every plot: the main rows first, the ablations after them."""
    rows = MAIN + list(ABLATION_REFERENCE)
    palette = [f"C{i}" for i in range(10)] + ["#7f3f00", "#003f7f", "#3f7f00", "#7f007f", "#007f7f", "#555555"]
    return palette[rows.index(method) % len(palette)] if method in rows else "black"


def plot(task, setting, runs_by_method, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 4), sharex=True)
    for m in ordered_methods(runs_by_method):
        runs = runs_by_method[m]
        steps = list(range(1, len(runs[0]["steps"]) + 1))
        style = "-" if m in MAIN else "--"
        for ax, k in zip(axes, ["all", "old", "new"]):
            values = [metric(runs, k, s - 1) for s in steps]
            if any(v is None for v in values):
                continue
            stats = [mean_sd(v) for v in values]
            means = [s[0] for s in stats]
            ax.plot(steps, means, style, marker="o", markersize=3, color=colour(m), label=f"{m} (n={len(runs)})")
            if all(s[1] is not None for s in stats):
                ax.fill_between(steps, [mu - sd for mu, sd, _ in stats], [mu + sd for mu, sd, _ in stats],
                                color=colour(m), alpha=0.15, linewidth=0)
    for ax, k in zip(axes, ["all", "old", "new"]):
        ax.set_title(f"{k} mIoU %")
        ax.set_xlabel("step")
        ax.set_xticks(steps)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"Shapes {task_label(task, setting)}: mean over seeds, band ± 1 sd")
    fig.tight_layout()
    partial = path + ".partial.png"
    fig.savefig(partial, dpi=100)
    plt.close(fig)
    os.replace(partial, path)


def provenance(runs_by_method):
    """The commits and machines behind a task's runs: figures compare bitwise only within one of each."""
    runs = [r for rs in runs_by_method.values() for r in rs]
    commits = sorted({r["code_commit"] for r in runs})
    machines = sorted({"%s (%s)" % (r["machine"]["cpu"], r["machine"]["simd"]) for r in runs})
    text = f"Code of {', '.join(commits)}; {', '.join(machines)}."
    if len(commits) > 1 or len(machines) > 1:
        text += " Runs from more than one code commit or machine: differences include theirs."
    return text


def report(groups, image_dir, plots, out_dir, step_packs=None):
    """The markdown text (to be written into out_dir); writes the plots into image_dir when plots is true."""

    def image(name, caption):
        return f"![{caption}]({os.path.relpath(os.path.join(image_dir, name), out_dir)})"

    out = ["# Benchmark results", "",
           "Generated by `tools/bench_report.py` from `bench/results/` alone. Mean ± sample standard deviation "
           "over seeds (n seeds), mIoU % at the last step on the validation images each task's budget names. "
           "Old = step-0 foreground classes, new = classes added since, all = every seen class with background.",
           "",
           "A method **beats** another where |mean difference| > 2 · sqrt(sd_A²/n_A + sd_B²/n_B) (twice the "
           "standard error of the difference); otherwise they are **not distinguishable**. With n=1 no claim "
           "is made.", "", "## All mIoU at the last step", "", summary_table(groups), ""]
    for task, setting in ordered_tasks(groups):
        runs_by_method = groups[(task, setting)]
        any_runs = next(iter(runs_by_method.values()))
        budget = any_runs[0]["budget"]
        out += [f"## {task_label(task, setting)}", "",
                f"{len(any_runs[0]['steps'])} step(s) of {budget['iterations_per_step']} iterations, "
                f"{budget['eval_images']} validation images (a row's own batch: its files' budget). "
                + provenance(runs_by_method), "",
                task_table(runs_by_method), ""]
        if len(any_runs[0]["steps"]) > 1:
            out += ["All mIoU after each step:", "", step_table(runs_by_method), ""]
            if plots:
                name = f"bench-{task}-{setting}.png"
                main_rows = {m: r for m, r in runs_by_method.items() if m in MAIN}
                if main_rows:
                    plot(task, setting, main_rows, os.path.join(image_dir, name))
                    out += [image(name, task_label(task, setting)), ""]
                ablations = {m: r for m, r in runs_by_method.items() if m not in MAIN}
                if ablations:
                    name = f"bench-{task}-{setting}-ablations.png"
                    for m in {ABLATION_REFERENCE.get(a) for a in ablations} - {None}:
                        if m in runs_by_method:
                            ablations[m] = runs_by_method[m]
                    plot(task, setting, ablations, os.path.join(image_dir, name))
                    out += [image(name, task_label(task, setting) + " ablations"), ""]
        classes = class_table(runs_by_method)
        if classes:
            out += ["IoU % of each class at the last step, mean over the seeds:", "", classes, ""]
        packs = step_pack_table(task, setting, runs_by_method, step_packs or [])
        if packs:
            out += ["The packs made between steps (hrhf's and hrhf+gsc's, from `bench/step-packs.csv`; a step's "
                    "pack rehearses its class from the next step on): how well each class's areas were achieved "
                    "(area correlation, target against achieved, 1 is exact) beside its IoU at the last step:", "",
                    packs, ""]
        comparisons = comparison_lines(runs_by_method)
        if comparisons:
            out += ["Comparisons (difference of means A - B in points):", ""] + comparisons + [""]
    return "\n".join(out)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", nargs="+", default=["bench/results"],
                        help="result folders (an experiment's beside the benchmark's, to compare with its rows)")
    parser.add_argument("--out", default="bench/report.md")
    parser.add_argument("--images", default="docs/images")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--tasks", nargs="+", help="only these tasks (e.g. 15-1), all settings")
    parser.add_argument("--step-packs", help="tools/bench_step_packs.py's table (default: step-packs.csv beside "
                        "the results folder, when there)")
    parser.add_argument("--readme", help="rewrite this README's generated blocks from the same results")
    parser.add_argument("--check", action="store_true",
                        help="with --readme: write nothing, fail where a README block differs from the results")
    args = parser.parse_args()
    if args.check and not args.readme:
        parser.error("--check needs --readme")
    plots = not args.no_plots and not args.check
    if plots:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            sys.exit("bench_report: matplotlib is missing (pip install matplotlib, or --no-plots)")
    try:
        groups = load(*args.results)
        if args.tasks:
            groups = {k: v for k, v in groups.items() if k[0] in args.tasks}
    except (OSError, ResultError) as e:
        sys.exit(f"bench_report: {e}")
    if not groups:
        sys.exit(f"bench_report: no result files in {' '.join(args.results)}")
    if args.readme:
        try:
            with open(args.readme) as f:
                text = f.read()
            updated, changed = update_readme(text, groups)
        except (OSError, ResultError) as e:
            sys.exit(f"bench_report: {args.readme}: {e}")
        if args.check:
            if changed:
                sys.exit(f"bench_report: {args.readme}: these blocks differ from {' '.join(args.results)}: "
                         + "; ".join(changed) + " (run tools/bench_report.py --readme " + args.readme + ")")
            print(f"{args.readme}: every generated block matches {' '.join(args.results)}")
            return
        partial = args.readme + ".partial"
        with open(partial, "w") as f:
            f.write(updated)
        os.replace(partial, args.readme)
    packs_path = args.step_packs or os.path.join(os.path.dirname(os.path.abspath(args.results[0])), "step-packs.csv")
    try:
        step_packs = read_step_packs(packs_path) if args.step_packs or os.path.exists(packs_path) else None
    except (OSError, ResultError) as e:
        sys.exit(f"bench_report: {e}")
    os.makedirs(args.images, exist_ok=True)
    text = report(groups, args.images, plots, os.path.dirname(os.path.abspath(args.out)), step_packs)
    partial = args.out + ".partial"
    with open(partial, "w") as f:
        f.write(text)
    os.replace(partial, args.out)
    print(text)


if __name__ == "__main__":
    main()
