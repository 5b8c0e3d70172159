#!/usr/bin/env python3
"""How faithful the packs made between the steps of the benchmark's runs were, set beside what the
runs kept of each class: the evidence for why the pack methods keep some late classes and lose others.

    python3 tools/bench_step_packs.py [--work bench/work] [--out bench/step-packs.csv]

Reads the manifest of every `model-stepN-pack.tar` in the run folders tools/benchmark.sh leaves under
--work (TASK-SETTING-METHOD-sSEED/, not in git) and writes one CSV row per pack, committed: the class it
was made for, the mean share of an image its class was asked to cover and did cover, its area
correlation (target against achieved area, over its images), mean absolute area difference, class
fidelity, the teacher's mean confidence and the share of images in which the target class appears at
all. tools/bench_report.py sets these beside each class's IoU at the last step.
"""

import argparse
import csv
import json
import os
import re
import sys
import tarfile

RUN = re.compile(r"^(?P<task>\d+-\d+)-(?P<setting>overlap|disjoint)-(?P<method>.+)-s(?P<seed>\d+)$")
PACK = re.compile(r"^model-step(?P<step>\d+)-pack\.tar$")
MANIFEST_LIMIT = 16 << 20  # a manifest of 16 images is a few kB: anything near this is not one
FIELDS = ["task", "setting", "method", "seed", "step", "class", "images", "target_area", "achieved_area",
          "area_correlation", "area_mae", "fidelity", "mean_confidence", "target_present"]


class PackError(Exception):
    pass


def manifest(path):
    """The pack's manifest.json, read without extracting anything."""
    try:
        with tarfile.open(path, "r:") as tar:
            member = tar.getmember("manifest.json")
            if not member.isfile() or member.size > MANIFEST_LIMIT:
                raise PackError(f"{path}: manifest.json is not a file of at most {MANIFEST_LIMIT} bytes")
            return json.load(tar.extractfile(member))
    except (OSError, KeyError, tarfile.TarError, ValueError) as e:
        raise PackError(f"{path}: no readable manifest.json ({e})")


def pack_row(run, step, m, path):
    try:
        images = m["images"]
        quality = m["quality"]
        targets = {t for record in images for t in record["targets"]}
        if len(targets) != 1:
            raise PackError(f"{path}: a step pack targets one class, this one {sorted(targets)}")
        present = sum(1 for record in images if all(a > 0 for a in record["achievedAreas"]))
        count = max(len(images), 1)
        return dict(run, step=step, **{"class": targets.pop()}, images=len(images),
                    target_area=round(sum(sum(r["targetAreas"]) for r in images) / count, 4),
                    achieved_area=round(sum(sum(r["achievedAreas"]) for r in images) / count, 4),
                    area_correlation=round(quality["areaCorrelation"], 4),
                    area_mae=round(quality["areaMeanAbsoluteDifference"], 4), fidelity=round(quality["fidelity"], 4),
                    mean_confidence=round(quality["meanConfidence"], 4),
                    target_present=round(present / count, 4))
    except (KeyError, TypeError) as e:
        raise PackError(f"{path}: not a pack manifest ({e})")


def collect(work):
    rows = []
    for name in sorted(os.listdir(work)):
        match = RUN.match(name)
        folder = os.path.join(work, name)
        if not match or not os.path.isdir(folder):
            continue
        run = dict(match.groupdict(), seed=int(match["seed"]))
        for file in sorted(os.listdir(folder)):
            pack = PACK.match(file)
            if pack:
                path = os.path.join(folder, file)
                rows.append(pack_row(run, int(pack["step"]), manifest(path), path))
    rows.sort(key=lambda r: (r["task"], r["setting"], r["method"], r["seed"], r["step"]))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default="bench/work")
    parser.add_argument("--out", default="bench/step-packs.csv")
    args = parser.parse_args()
    try:
        rows = collect(args.work)
        partial = args.out + ".partial"
        with open(partial, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=FIELDS, lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)
        os.replace(partial, args.out)
        print(f"{args.out}: {len(rows)} step packs")
    except (OSError, PackError) as e:
        sys.exit(f"bench_step_packs: {e}")


if __name__ == "__main__":
    main()
