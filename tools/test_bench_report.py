#!/usr/bin/env python3
"""Checks of tools/bench_report.py on result files built here: the mean and standard deviation,
the 2-standard-error verdicts, n=1 without a claim, refused files, and the plots.

    /opt/torchvenv/bin/python tools/test_bench_report.py   # the plot check needs matplotlib
"""

import importlib.util
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import unittest

TOOLS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, TOOLS)
import bench_report  # noqa: E402
import bench_step_packs  # noqa: E402

BUDGET = {"iterations_per_step": 200, "batch": 8, "eval_images": 200}


def write_result(folder, task, setting, method, seed, alls, old=0.5, new=0.4, budget=BUDGET):
    """A result file whose steps have the given all mIoU (fractions), one per step; new None: left out."""
    steps = [{"step": s + 1, "all": a, "old": old} | ({} if new is None else {"new": new}) for s, a in enumerate(alls)]
    record = {"task": task, "setting": setting, "method": method, "seed": seed, "budget": budget, "steps": steps,
              "commit": "abc1234", "code_commit": "abc1234", "machine": {"cpu": "Xeon", "simd": "avx512", "cores": 2}}
    path = os.path.join(folder, f"{task}-{setting}-{method}-s{seed}.json")
    with open(path, "w") as f:
        json.dump(record, f)
    return path


class BenchReportTests(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.results = os.path.join(self.tmp.name, "results")
        os.mkdir(self.results)

    def tearDown(self):
        self.tmp.cleanup()

    def test_mean_and_sample_standard_deviation(self):
        self.assertEqual(bench_report.cell([50.0, 52.0, 54.0]), "52.0 ± 2.0")
        self.assertEqual(bench_report.cell([61.25]), "61.2")
        mean, sd, n = bench_report.mean_sd([1.0, 2.0, 3.0, 4.0])
        self.assertEqual((mean, n), (2.5, 4))
        self.assertAlmostEqual(sd, 1.2909944, places=6)

    def test_a_difference_beyond_two_standard_errors_beats(self):
        verdict, diff, bound = bench_report.compare([60.0, 61.0, 62.0], [50.0, 51.0, 52.0])
        self.assertEqual(verdict, "beats")
        self.assertAlmostEqual(diff, 10.0)
        self.assertAlmostEqual(bound, 2 * (2 / 3) ** 0.5)
        self.assertEqual(bench_report.compare([50.0, 51.0, 52.0], [60.0, 61.0, 62.0])[0], "is beaten by")

    def test_a_difference_within_two_standard_errors_is_not_distinguishable(self):
        verdict, diff, bound = bench_report.compare([50.0, 55.0, 60.0], [52.0, 53.0, 54.0])
        self.assertEqual(verdict, "not distinguishable from")
        self.assertAlmostEqual(diff, 2.0)
        self.assertAlmostEqual(bound, 2 * (25 / 3 + 1 / 3) ** 0.5)
        # Just inside and just outside the bound: sd 1 on both sides, n 3, 2 SE = 1.633.
        self.assertEqual(bench_report.compare([51.6, 52.6, 53.6], [50.0, 51.0, 52.0])[0], "not distinguishable from")
        self.assertEqual(bench_report.compare([51.7, 52.7, 53.7], [50.0, 51.0, 52.0])[0], "beats")

    def test_one_seed_makes_no_claim(self):
        verdict, diff, bound = bench_report.compare([70.0], [50.0, 51.0, 52.0])
        self.assertEqual((verdict, bound), ("no claim (n=1)", None))
        self.assertAlmostEqual(diff, 19.0)

    def test_report_from_files(self):
        for seed, (a, b) in enumerate([(0.60, 0.50), (0.61, 0.51), (0.62, 0.52)]):
            write_result(self.results, "15-1", "overlap", "hrhf+gsc", seed, [0.8, 0.7, a])
            write_result(self.results, "15-1", "overlap", "mib", seed, [0.8, 0.7, b])
        write_result(self.results, "15-1", "overlap", "hrhf+gsc-no-proto", 0, [0.8, 0.7, 0.65])
        write_result(self.results, "15-5", "overlap", "mib", 0, [0.686])
        groups = bench_report.load(self.results)
        text = bench_report.report(groups, self.tmp.name, False, self.tmp.name)
        self.assertIn("| mib | 68.6 (n=1) | 51.0 ± 1.0 (n=3) |", text)
        self.assertIn("| hrhf+gsc |  | 61.0 ± 1.0 (n=3) |", text)
        self.assertIn("| hrhf+gsc | 3 | 50.0 ± 0.0 | 40.0 ± 0.0 | 61.0 ± 1.0 |", text)
        self.assertIn("| hrhf+gsc | 3 | 80.0 ± 0.0 | 70.0 ± 0.0 | 61.0 ± 1.0 |", text)
        self.assertIn("3 step(s) of 200 iterations, 200 validation images (a row's own batch: its files' budget). "
                      "Code of abc1234; Xeon (avx512).\n", text)
        self.assertIn("- **hrhf+gsc** vs **mib**: all: beats (+10.0, 2 SE 1.6); old: not distinguishable from "
                      "(+0.0, 2 SE 0.0)", text)
        self.assertIn("- **hrhf+gsc-no-proto** vs **hrhf+gsc**: all: no claim (n=1) (+4.0)", text)

    def test_the_readme_table_marks_the_best_contender_of_each_column(self):
        for seed in range(2):
            write_result(self.results, "15-1", "overlap", "mib", seed, [0.5 + seed / 100], old=0.6, new=0.3)
            write_result(self.results, "15-1", "overlap", "gsc", seed, [0.55], old=0.5, new=0.3)
            write_result(self.results, "15-1", "overlap", "joint", seed, [0.7], old=0.8, new=0.6)
        table = bench_report.readme_block(bench_report.load(self.results), "table", "15-1", "overlap")
        self.assertEqual(table.splitlines()[2:], [
            "| mib | 2 | **60.0 ± 0.0** | **30.0 ± 0.0** | 50.5 ± 0.7 |",
            "| gsc (pack for prototypes only) | 2 | 50.0 ± 0.0 | **30.0 ± 0.0** | **55.0 ± 0.0** |",
            "| joint (all data, upper reference) | 2 | 80.0 ± 0.0 | 60.0 ± 0.0 | 70.0 ± 0.0 |"])

    def test_readme_blocks_are_rebuilt_and_a_stale_one_is_reported(self):
        for seed in range(2):
            write_result(self.results, "15-1", "overlap", "mib", seed, [0.5])
            write_result(self.results, "15-1", "overlap", "plop", seed, [0.4 + seed / 100])
        groups = bench_report.load(self.results)
        readme = ("intro\n<!-- bench_report: comparisons 15-1 overlap -->\nstale\n<!-- /bench_report -->\nend\n")
        updated, changed = bench_report.update_readme(readme, groups)
        self.assertEqual(changed, ["comparisons 15-1 overlap"])
        self.assertEqual(updated, "intro\n<!-- bench_report: comparisons 15-1 overlap -->\n- **plop** vs **mib**: "
                         "all: is beaten by (-9.5, 2 SE 1.0); old: not distinguishable from (+0.0, 2 SE 0.0); new: "
                         "not distinguishable from (+0.0, 2 SE 0.0)\n<!-- /bench_report -->\nend\n")
        self.assertEqual(bench_report.update_readme(updated, groups), (updated, []))
        with self.assertRaisesRegex(bench_report.ResultError, "no results for 10-1"):
            bench_report.update_readme("<!-- bench_report: table 10-1 overlap -->\n<!-- /bench_report -->", groups)
        with self.assertRaisesRegex(bench_report.ResultError, "has no `<!-- /bench_report -->`"):
            bench_report.update_readme("<!-- bench_report: table 15-1 overlap -->\n", groups)

    def test_readme_blocks_split_the_main_rows_from_the_ablations(self):
        for seed in range(2):
            for method, final in [("mib", 0.5), ("hrhf", 0.6), ("hrhf+gsc", 0.58), ("hrhf+gsc-no-proto", 0.6),
                                  ("mib-batch16", 0.55)]:
                write_result(self.results, "15-1", "overlap", method, seed, [final + seed / 1000])
        groups = bench_report.load(self.results)
        rows = lambda text: [line.split(" | ")[0][2:] for line in text.splitlines()[2:]]  # noqa: E731
        self.assertEqual(rows(bench_report.readme_block(groups, "table", "15-1", "overlap")), ["mib", "hrhf", "hrhf+gsc"])
        self.assertEqual(rows(bench_report.readme_block(groups, "ablation-table", "15-1", "overlap")),
                         ["mib", "hrhf", "hrhf+gsc", "hrhf+gsc-no-proto (prototype re-labelling off)",
                          "mib-batch16 (16 real images)"])
        pairs = [line.split(":")[0] for line in
                 bench_report.readme_block(groups, "ablation-comparisons", "15-1", "overlap").splitlines()]
        self.assertEqual(pairs, ["- **hrhf+gsc-no-proto** vs **hrhf+gsc**", "- **mib-batch16** vs **mib**",
                                 "- **hrhf** vs **mib-batch16**", "- **hrhf+gsc** vs **mib-batch16**"])
        main_pairs = bench_report.readme_block(groups, "comparisons", "15-1", "overlap")
        self.assertNotIn("batch16", main_pairs)
        self.assertNotIn("no-proto", main_pairs)
        with self.assertRaisesRegex(bench_report.ResultError, "no ablation results for 15-5"):
            write_result(self.results, "15-5", "overlap", "mib", 0, [0.5])
            bench_report.readme_block(bench_report.load(self.results), "ablation-table", "15-5", "overlap")

    def test_the_readme_blocks_are_the_committed_results(self):
        root = os.path.dirname(TOOLS)
        groups = bench_report.load(os.path.join(root, "bench", "results"))
        with open(os.path.join(root, "README.md")) as f:
            readme = f.read()
        self.assertGreaterEqual(readme.count("<!-- bench_report:"), 2)
        self.assertEqual(bench_report.update_readme(readme, groups)[1], [],
                         "run tools/bench_report.py --readme README.md after adding results")

    def test_the_class_table_averages_each_class_over_the_seeds_that_have_it(self):
        for seed in range(2):
            path = write_result(self.results, "15-1", "overlap", "mib", seed, [0.5, 0.4])
            with open(path) as f:
                record = json.load(f)
            record["steps"][-1] |= {"classNames": ["background", "disc", "chevron"], "oldClasses": [1],
                                    "perClass": [0.9, 0.5 + seed / 10, 0.2 if seed else None]}
            with open(path, "w") as f:
                json.dump(record, f)
        groups = bench_report.load(self.results)
        self.assertEqual(bench_report.class_table(groups[("15-1", "overlap")]).splitlines()[2:],
                         ["| 0 background (bg) | 90.0 |", "| 1 disc (old) | 55.0 |", "| 2 chevron (new) | 20.0 |"])
        text = bench_report.report(groups, self.tmp.name, False, self.tmp.name)
        self.assertIn("IoU % of each class at the last step, mean over the seeds:", text)

    def test_an_experiment_folder_joins_the_benchmark_and_may_not_repeat_a_run(self):
        other = os.path.join(self.tmp.name, "experiment")
        os.mkdir(other)
        write_result(self.results, "15-1", "overlap", "hrhf", 0, [0.57])
        write_result(other, "15-1", "overlap", "hrhf-reached50", 0, [0.56])
        groups = bench_report.load(self.results, other)
        self.assertEqual(sorted(groups[("15-1", "overlap")]), ["hrhf", "hrhf-reached50"])
        write_result(other, "15-1", "overlap", "hrhf", 0, [0.57])
        with self.assertRaisesRegex(bench_report.ResultError, r"hrhf-s0\.json: the same run as .*results"):
            bench_report.load(self.results, other)

    def test_runs_of_two_machines_are_flagged(self):
        write_result(self.results, "15-5", "overlap", "mib", 0, [0.5])
        path = write_result(self.results, "15-5", "overlap", "mib", 1, [0.5])
        with open(path) as f:
            record = json.load(f)
        record["machine"]["simd"] = "avx2"
        with open(path, "w") as f:
            json.dump(record, f)
        text = bench_report.report(bench_report.load(self.results), self.tmp.name, False, self.tmp.name)
        self.assertIn("Code of abc1234; Xeon (avx2), Xeon (avx512). Runs from more than one code commit or "
                      "machine", text)

    def test_a_file_whose_name_disagrees_is_refused(self):
        path = write_result(self.results, "15-1", "overlap", "mib", 0, [0.5])
        os.rename(path, os.path.join(self.results, "15-1-overlap-mib-s1.json"))
        with self.assertRaisesRegex(bench_report.ResultError, r"15-1-overlap-mib-s1\.json: holds .*not what its name"):
            bench_report.load(self.results)

    def test_runs_of_another_budget_are_refused(self):
        write_result(self.results, "15-1", "overlap", "mib", 0, [0.5])
        write_result(self.results, "15-1", "overlap", "mib", 1, [0.5], budget=dict(BUDGET, iterations_per_step=80))
        with self.assertRaisesRegex(bench_report.ResultError, r"mib-s1\.json: budget or steps differ from .*mib-s0"):
            bench_report.load(self.results)

    def test_a_budget_without_its_evaluation_images_is_refused(self):
        write_result(self.results, "15-1", "overlap", "mib", 0, [0.5], budget={"iterations_per_step": 80, "batch": 8})
        refusal = r"mib-s0\.json: not a benchmark result \('eval_images'\)"
        with self.assertRaisesRegex(bench_report.ResultError, refusal):
            bench_report.load(self.results)

    def test_missing_steps_are_refused(self):
        path = write_result(self.results, "15-1", "overlap", "mib", 0, [0.5, 0.4])
        with open(path) as f:
            record = json.load(f)
        record["steps"] = record["steps"][1:]
        with open(path, "w") as f:
            json.dump(record, f)
        with self.assertRaisesRegex(bench_report.ResultError, r"mib-s0\.json: steps must be 1, 2, \.\.\. in order"):
            bench_report.load(self.results)

    @unittest.skipUnless(importlib.util.find_spec("matplotlib"), "matplotlib is not installed")
    def test_the_command_writes_the_report_and_a_plot_per_multi_step_task(self):
        for seed in range(3):
            write_result(self.results, "15-1", "overlap", "mib", seed, [0.8, 0.7 + seed / 100, 0.5])
            write_result(self.results, "15-1", "overlap", "mib-batch16", seed, [0.8, 0.7, 0.55], new=None)
            write_result(self.results, "15-5", "overlap", "mib", seed, [0.68])
        images = os.path.join(self.tmp.name, "images")
        out = os.path.join(self.tmp.name, "report.md")
        subprocess.run([sys.executable, os.path.join(TOOLS, "bench_report.py"), "--results", self.results,
                        "--out", out, "--images", images], check=True, capture_output=True)
        self.assertEqual(sorted(os.listdir(images)),
                         ["bench-15-1-overlap-ablations.png", "bench-15-1-overlap.png"])
        with open(os.path.join(images, "bench-15-1-overlap.png"), "rb") as f:
            self.assertEqual(f.read(8), b"\x89PNG\r\n\x1a\n")
        with open(out) as f:
            text = f.read()
        self.assertIn("![15-1](images/bench-15-1-overlap.png)", text)
        self.assertIn("| mib | 3 | 80.0 ± 0.0 | 71.0 ± 1.0 | 50.0 ± 0.0 |", text)
        self.assertIn("![15-1 ablations](images/bench-15-1-overlap-ablations.png)", text)
        self.assertIn("| mib-batch16 | 3 | 50.0 ± 0.0 | - | 55.0 ± 0.0 |", text)



def write_pack(path, target, achieved, quality, manifest_bytes=None):
    """A step pack holding only its manifest: one record per achieved area, all targeting `target`."""
    records = [{"targets": [target], "achievedAreas": [a], "targetAreas": [0.2]} for a in achieved]
    data = manifest_bytes if manifest_bytes is not None else json.dumps({"images": records, "quality": quality}).encode()
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo("manifest.json")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))


QUALITY = {"areaCorrelation": -0.25, "areaMeanAbsoluteDifference": 0.2, "fidelity": 0, "meanConfidence": 0.8}


class StepPackTests(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.work = os.path.join(self.tmp.name, "work")
        self.run_dir = os.path.join(self.work, "15-1-overlap-hrhf-s2")
        os.makedirs(self.run_dir)

    def tearDown(self):
        self.tmp.cleanup()

    def test_each_step_pack_becomes_a_row(self):
        write_pack(os.path.join(self.run_dir, "model-step4-pack.tar"), 19, [0.1, 0.0, 0.3, 0.2], QUALITY)
        os.makedirs(os.path.join(self.work, "pack-1-15-s2.tar.d"))  # not a run folder: ignored
        rows = bench_step_packs.collect(self.work)
        self.assertEqual(rows, [{"task": "15-1", "setting": "overlap", "method": "hrhf", "seed": 2, "step": 4,
                                 "class": 19, "images": 4, "target_area": 0.2, "achieved_area": 0.15,
                                 "area_correlation": -0.25, "area_mae": 0.2,
                                 "fidelity": 0.0, "mean_confidence": 0.8, "target_present": 0.75}])

    def test_a_pack_of_two_classes_or_without_a_manifest_is_refused_by_name(self):
        path = os.path.join(self.run_dir, "model-step1-pack.tar")
        with tarfile.open(path, "w") as tar:
            info = tarfile.TarInfo("manifest.json")
            info.type = tarfile.SYMTYPE
            info.linkname = "/etc/passwd"
            tar.addfile(info)
        with self.assertRaisesRegex(bench_step_packs.PackError, r"model-step1-pack\.tar: manifest\.json is not a file"):
            bench_step_packs.collect(self.work)
        manifest = {"images": [{"targets": [16, 17], "achievedAreas": [0.1, 0.1]}], "quality": QUALITY}
        write_pack(path, 0, [], {}, manifest_bytes=json.dumps(manifest).encode())
        with self.assertRaisesRegex(bench_step_packs.PackError, r"model-step1-pack\.tar: a step pack targets one class"):
            bench_step_packs.collect(self.work)

    def test_the_report_sets_each_pack_beside_the_class_iou(self):
        results = os.path.join(self.tmp.name, "results")
        os.mkdir(results)
        for seed in range(2):
            for method, chevron in [("mib", 0.2), ("hrhf", 0.04)]:
                path = write_result(results, "15-1", "overlap", method, seed, [0.5, 0.4])
                with open(path) as f:
                    record = json.load(f)
                record["steps"][-1] |= {"classNames": ["background", "disc", "chevron"], "perClass": [0.9, 0.5, chevron]}
                with open(path, "w") as f:
                    json.dump(record, f)
        packs = [{"task": "15-1", "setting": "overlap", "method": "hrhf", "seed": s, "step": 1, "class": 2,
                  "target_area": 0.28, "achieved_area": a, "area_correlation": c, "target_present": 1.0}
                 for s, c, a in [(0, -0.2, 0.02), (1, 0.0, 0.08)]]
        groups = bench_report.load(results)
        table = bench_report.step_pack_table("15-1", "overlap", groups[("15-1", "overlap")], packs)
        self.assertEqual(table.splitlines()[2:], ["| 1 | 2 chevron | 2 | 28% | 5% | -0.10 | 100% | 20.0 | 4.0 |"])
        self.assertIsNone(bench_report.step_pack_table("10-1", "overlap", groups[("15-1", "overlap")], packs))

if __name__ == "__main__":
    unittest.main()
