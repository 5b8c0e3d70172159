import HRHFCommandLine
import XCTest

@testable import HRHF

/// What a user sees of a long run, fresh or resumed: rates from this process's work only, and a
/// first line naming what a resumed run continues from.
final class ProgressTests: XCTestCase {
    /// A clock the test moves by hand.
    final class ManualClock {
        var now = Date(timeIntervalSince1970: 1_000_000)
        func read() -> Date { now }
    }

    /// Five images of classes 1-5 in batches of 2, 3 iterations each (SynthesisTests' options).
    static func job(_ teacher: (URL, DeepLabV3, ModelCard), out: URL) -> SynthesisJob {
        SynthesisJob(
            teacherURL: teacher.0, model: teacher.1, card: teacher.2, classes: [1, 2, 3, 4, 5], count: 5,
            options: SynthesisTests.smallOptions(), seed: 21, out: out)
    }

    func testRateAndETACountOnlyTheIterationsOfThisProcess() {
        let clock = ManualClock()
        let resumed = ProgressLine("synth", total: 1000, alreadyDone: 800, clock: clock.read)
        XCTAssertEqual(resumed.text(800), "synth 800/1000 ( 80%) 0.00 it/s ETA ?", "no rate before any work here")
        clock.now += 10
        // 50 iterations in 10 s: 5 it/s (not 85), 150 left: 30 s.
        XCTAssertEqual(resumed.text(850, detail: "loss 1.000"), "synth 850/1000 ( 85%) 5.00 it/s ETA 0:30  loss 1.000")
        XCTAssertEqual(resumed.finish(), 10)

        let fresh = ProgressLine("train", total: 1000, clock: clock.read)
        clock.now += 10
        XCTAssertEqual(fresh.text(50), "train 50/1000 (  5%) 5.00 it/s ETA 3:10")
    }

    func testResumeLinesNameTheFileAndTheWorkDone() {
        let checkpoint = URL(fileURLWithPath: "/runs/m.safetensors.ckpt")
        XCTAssertEqual(
            resumeLine(checkpoint: checkpoint, iterationsDone: 400, of: 1000),
            "resuming from /runs/m.safetensors.ckpt: iterations 1-400 of 1000 already done")
        let directory = URL(fileURLWithPath: "/runs/p.tar.partial.d")
        let work = SynthesisJob.ResumedWork(directory: directory, batches: [0, 1, 2, 5], images: 32)
        XCTAssertEqual(
            resumeLine(work, batchesInRun: 8),
            "resuming from /runs/p.tar.partial.d: 4 of 8 batches already done (batches 0-2,5, 32 images)")
        let nothing = SynthesisJob.ResumedWork(directory: directory, batches: [], images: 0)
        XCTAssertEqual(
            resumeLine(nothing, batchesInRun: 8),
            "resuming from /runs/p.tar.partial.d: 0 of 8 batches already done")
    }

    func testRangeListJoinsRuns() {
        XCTAssertEqual(rangeList([0, 1, 2, 5, 7, 8]), "0-2,5,7-8")
        XCTAssertEqual(rangeList([3]), "3")
        XCTAssertEqual(rangeList([]), "")
    }

    /// An interrupted synthesis resumed: `started` names the work directory and its finished
    /// batches, and progress counts from the resumed iterations onward.
    func testResumedSynthesisReportsItsFinishedBatches() throws {
        let teacher = try SynthesisTests.tinyTeacher()
        let out = temporaryDirectory().appendingPathComponent("p.tar")
        let job = Self.job(teacher, out: out)
        var fresh: SynthesisJob.ResumedWork?? = .none
        XCTAssertThrowsError(try job.run(resume: false, stopAfterBatches: 1, started: { fresh = $0 }))
        XCTAssertEqual(fresh.map { $0 == nil }, true, "a fresh run resumes nothing")

        var resumed: SynthesisJob.ResumedWork?
        var seen: [(done: Int, total: Int)] = []
        let outcome = try job.run(resume: true, started: { resumed = $0 }) { done, total, _ in
            seen.append((done, total))
        }
        XCTAssertEqual(resumed?.directory.path, out.path + ".partial.d")
        XCTAssertEqual(resumed?.batches, [0])
        XCTAssertEqual(resumed?.images, 2)
        XCTAssertEqual(outcome.resumedImages, 2)
        // 3 batches of 3 iterations; batch 0's 3 were done before: this run reports 4 through 9.
        XCTAssertEqual(seen.first?.done, 4)
        XCTAssertEqual(seen.last?.done, 9)
        XCTAssertEqual(seen.count, 6)
        XCTAssertTrue(seen.allSatisfy { $0.total == 9 })
    }

    /// The command's first line names the work directory it resumes from and what is done there.
    func testResumedSynthCommandNamesWhatItResumesFromFirst() throws {
        let teacher = try SynthesisTests.tinyTeacher()
        let out = temporaryDirectory().appendingPathComponent("p.tar")
        // The library job and the flags below describe the same run (SynthesisTests.smallOptions).
        XCTAssertThrowsError(try Self.job(teacher, out: out).run(resume: false, stopAfterBatches: 1))
        let r = try runTool(
            "hrhf-synth",
            [
                "--model", teacher.0.path, "--classes", "1-5", "--count", "5",
                "--seed", "21", "--synth-iterations", "3", "--warmup", "1",
                "--synth-batch", "2", "--resolution", "16", "--jitter", "2",
                "--threads", "1", "--resume", "--out", out.path,
            ])
        XCTAssertEqual(r.status, 0, r.stderr)
        let lines = r.stdout.split(separator: "\n").map(String.init)
        XCTAssertEqual(
            lines.first,
            "resuming from \(out.path).partial.d: 1 of 3 batches already done (batches 0, 2 images)")
        XCTAssertTrue(
            lines.dropFirst().first?.hasPrefix("inverting teacher.safetensors into 5 images") == true,
            r.stdout)
        XCTAssertEqual(try SyntheticPack(url: out).manifest.images.count, 5)
    }
}
