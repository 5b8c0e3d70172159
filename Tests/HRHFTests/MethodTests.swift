import Foundation
import HRHFCommandLine
import XCTest

@testable import HRHF

final class MethodTests: XCTestCase {
    func testEveryRowIsValidAndSumsInTheBenchmarksOrder() throws {
        let names = Method.table.map(\.name)
        XCTAssertEqual(Set(names).count, names.count, "one row per method")
        for m in ["ft", "lwf", "mib", "plop", "gsc", "hrhf", "hrhf+gsc", "joint"] {
            XCTAssertTrue(names.contains(m), m)
        }
        for m in Method.table {
            XCTAssertNoThrow(try m.validate(), m.name)
            XCTAssertEqual(m.terms.map(\.rank), m.terms.map(\.rank).sorted(), "\(m.name): terms in the sum's order")
        }
        let hrhf = try Method.named("hrhf+gsc")
        XCTAssertEqual(hrhf.terms.map(\.label), ["ce", "kd", "fake_ce", "fake_kd", "soft", "sharp", "rel"])
        XCTAssertEqual(hrhf.terms.map(\.weight), [1, 10, 1, 10, 0.25, 0.02, 0.25])
        XCTAssertTrue(hrhf.readsPacks)
        XCTAssertFalse(try Method.named("gsc").readsPacks)
        XCTAssertEqual(try Method.named("joint").trainingSet, .allSteps)
        // Each ablation row is hrhf+gsc with the options tools/benchmark.sh gave before it had rows.
        func ablation(_ name: String, _ change: (inout Method) -> Void) throws {
            var m = hrhf
            m.name = name
            change(&m)
            XCTAssertEqual(try Method.named(name), m, name)
        }
        try ablation("hrhf+gsc-no-proto") { $0.background = .unbiased }
        try ablation("hrhf+gsc-no-compensation") { $0.gradientCompensation = false }
        try ablation("hrhf+gsc-no-relation") { $0.setWeight(.rel, on: .both, 0) }
        try ablation("hrhf+gsc-no-soft-sharp") {
            $0.setWeight(.soft, on: .both, 0)
            $0.setWeight(.sharp, on: .both, 0)
        }
    }

    func testSetWeightKeepsTheSumsOrder() throws {
        var m = try Method.named("hrhf")
        m.setWeight(.lwfKD, on: .real, 2)
        XCTAssertEqual(m.terms.map(\.label), ["ce", "kd", "lwf_kd", "fake_ce", "fake_kd"])
        m.setWeight(.soft, on: .both, 0.5)
        m.setWeight(.feat, on: .fake, 3)
        XCTAssertEqual(m.terms.map(\.label), ["ce", "kd", "lwf_kd", "fake_ce", "fake_kd", "fake_feat", "soft"])
        m.setWeight(.kd, on: .real, 4)
        XCTAssertEqual(m.terms[1], WeightedTerm(.kd, 4, .real))
        m.setWeight(.kd, on: .real, 0)
        m.setWeight(.ce, on: .fake, 0)
        XCTAssertEqual(m.terms.map(\.label), ["ce", "lwf_kd", "fake_kd", "fake_feat", "soft"])
        var ft = try Method.named("ft")
        ft.setWeight(.kd, on: .fake, 10)
        XCTAssertTrue(ft.readsPacks, "a fake-half term makes a method read packs")
    }

    func testOptionErrorsNameTheOptionAndTheReason() throws {
        func error(_ body: () throws -> Void) -> OptionError? {
            do { try body() } catch { return error as? OptionError }
            return nil
        }
        XCTAssertEqual(
            error { _ = try Method.named("nope") }?.description,
            "method: unknown method nope: " + Method.table.map(\.name).joined(separator: ", "))
        var m = try Method.named("mib")
        m.terms[1].weight = -1
        XCTAssertEqual(
            error { try m.validate() },
            OptionError(option: "kd", "weight -1.0: a weight is a finite number above 0"))
        m = try Method.named("mib")
        m.terms.append(WeightedTerm(.ce, 1, .both))
        XCTAssertEqual(error { try m.validate() }?.option, "ce")
        m = try Method.named("mib")
        m.terms.append(m.terms[1])
        XCTAssertEqual(error { try m.validate() }, OptionError(option: "kd", "given twice in method mib"))
        m.terms = [WeightedTerm(.kd, 10, .fake)]
        XCTAssertEqual(error { try m.validate() }, OptionError(option: "method", "mib has no term on the real images"))
        var o = try DistillationOptions.preset("hrhf")
        o.fakeRatio = 1
        XCTAssertEqual(error { try o.validate() }?.option, "fake ratio")
        o.fakeRatio = 0.5
        (o.compensationMin, o.compensationMax) = (2, 1)
        XCTAssertEqual(error { try o.validate() }, OptionError(option: "compensation range", "2.0,1.0: 0 < MIN <= MAX"))
    }

    func testListMethodsPrintsTheTable() throws {
        let (status, stdout, _) = try runTool("hrhf-distill", ["--list-methods"])
        XCTAssertEqual(status, 0)
        XCTAssertEqual(stdout, Method.listing() + "\n")
        let lines = stdout.split(separator: "\n").map(String.init)
        XCTAssertEqual(lines.count, Method.table.count + 2)
        let row = try XCTUnwrap(lines.first { $0.hasPrefix("hrhf+gsc ") })
        XCTAssertEqual(
            row.split(separator: " ", omittingEmptySubsequences: true).joined(separator: " "),
            "hrhf+gsc 1 ce, 10 kd 1 ce, 10 kd 0.25 soft, 0.02 sharp, 0.25 rel proto GSC background step")
    }

    func testAnUnknownMethodIsAnOptionError() throws {
        let out = temporaryDirectory().appendingPathComponent("m.safetensors")
        let (status, stdout, stderr) = try runTool(
            "hrhf-distill",
            [
                "--old", "missing.safetensors", "--data", "missing",
                "--method", "nope", "--out", out.path,
            ])
        XCTAssertEqual(status, 1)
        XCTAssertTrue(stderr.contains("method: unknown method nope: ft, lwf, mib"), stderr)
        XCTAssertEqual(stdout, "")
        XCTAssertFalse(FileManager.default.fileExists(atPath: out.path))
        XCTAssertFalse(FileManager.default.fileExists(atPath: out.path + ".partial"))
    }

    func testADivergedLossIsATrainingError() throws {
        let model = try DeepLabV3(SynthesisTests.tinyArch, seed: 1)
        let trainer = Trainer(
            model: model, config: TrainingConfig(iterations: 3, batchSize: 1, cropSize: 8),
            checkpoint: nil)
        let finite = { mean(model.parameters[0]) }
        XCTAssertThrowsError(try trainer.run(loss: { it in it == 0 ? finite() : Tensor(scalar: .infinity) })) { error in
            XCTAssertEqual(error as? TrainingError, TrainingError(iteration: 1, "the loss became inf"))
            XCTAssertEqual("\(error)", "training, iteration 1: the loss became inf")
        }
    }

    func testClassListsAreOptionsWithBoundedRanges() throws {
        XCTAssertEqual(try parseClassList("1-3,5, 7-8"), [1, 2, 3, 5, 7, 8])
        for bad in ["", "1-", "3-1", "0-5", "1,,2", "1-2-3", "x", "1-99999999999"] {
            XCTAssertThrowsError(try parseClassList(bad), bad) { error in
                XCTAssertEqual(
                    error as? OptionError,
                    OptionError(
                        option: "--classes",
                        "\(bad): class ids from 1 to 1000 such as 1-15 or 1,3,5-7"))
            }
        }
    }

    /// hrhf-distill passes synthesis into a two-step run: the pack after step 1 is written and summarised.
    func testTheCommandLineSynthesisesBetweenSteps() throws {
        let (teacher, model, card) = try SynthesisTests.tinyTeacher()
        let dir = temporaryDirectory()
        let firstPack = dir.appendingPathComponent("p0.tar")
        var o = SynthesisTests.smallOptions()
        o.resolution = 24
        _ = try SynthesisJob(
            teacherURL: teacher, model: model, card: card, classes: [1, 2, 3, 4, 5], count: 2,
            options: o, seed: 1, out: firstPack
        ).run(resume: false)
        let out = dir.appendingPathComponent("m.safetensors")
        let (status, stdout, stderr) = try runTool(
            "hrhf-distill",
            [
                "--old", teacher.path, "--pack", firstPack.path, "--data", DataTests.shapesRoot.path, "--dataset",
                "shapes",
                "--task", "1-5,6,7", "--step", "1", "--last-step", "2", "--method", "hrhf", "--iterations", "1",
                "--batch", "2", "--crop", "24", "--eval-limit", "0", "--synth-count", "2", "--synth-iterations", "2",
                "--synth-batch", "2", "--resolution", "24", "--out", out.path,
            ])
        XCTAssertEqual(status, 0, stderr)
        let pack = dir.appendingPathComponent("m-step1-pack.tar")
        XCTAssertEqual(try SyntheticPack(url: pack).manifest.classes.map(\.id), [6])
        let lines = stdout.split(separator: "\n").map { $0.trimmingCharacters(in: .whitespaces) }
        XCTAssertTrue(lines.contains { $0.hasPrefix("pack ") && $0.hasSuffix(pack.path) }, stdout)
        XCTAssertTrue(
            lines.contains(
                "step 2 of 1-5,6,7 (overlap), method hrhf: classes 7, 1 real images, 2 packs, "
                    + "1 iterations"), stdout)
        XCTAssertEqual(try ModelFile.load(out).0.numClasses, 8)
    }
}
