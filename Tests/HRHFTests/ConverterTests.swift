import XCTest

@testable import HRHF

/// Conversion of PyTorch checkpoints (zip, legacy, safetensors; torchvision and MiB flavours)
/// into native models whose logits match PyTorch's within relative error 1e-4, and refusal of
/// every kind of bad input with a message naming the file and the key.
final class ConverterTests: XCTestCase {
    let models = Fixtures.directory.appendingPathComponent("models")

    func options(_ arch: ArchitectureDescription, classes: String = "voc") -> ConversionOptions {
        ConversionOptions(architecture: arch, classNames: DatasetClasses.resolve(classes))
    }

    /// Converts, saves natively, reloads and compares the logits with PyTorch's.
    func roundTrip(_ file: String, _ arch: ArchitectureDescription, reference: String) throws -> ConversionReport {
        let (model, card, report) = try Converter.convert(models.appendingPathComponent(file), options(arch))
        let out = temporaryDirectory().appendingPathComponent("m.safetensors")
        try ModelFile.save(model, card: card, to: out)
        let (loaded, loadedCard) = try ModelFile.load(out)
        XCTAssertEqual(loadedCard, card)
        let ref = try Fixtures.file("models/\(reference)_logits.safetensors")
        let logits = withNoGrad { loaded.run(ref["input"]!).logits }
        assertClose(logits, ref["logits"]!, "\(file) logits")
        return report
    }

    func testTorchvisionZipLegacyAndSafetensorsAgree() throws {
        for file in ["tv_small.pth", "tv_small_legacy.pth", "tv_small.safetensors"] {
            let r = try roundTrip(file, ModelParityTests.tvSmall, reference: "tv_small")
            XCTAssertEqual(r.flavor, .torchvision)
            XCTAssertEqual(
                r.format, file.hasSuffix("safetensors") ? "safetensors" : file.contains("legacy") ? "legacy" : "zip")
        }
        let wrapped = try roundTrip("tv_basic.pth", ModelParityTests.tvBasic, reference: "tv_basic")
        XCTAssertEqual(wrapped.wrapper, "state_dict")
        _ = try roundTrip("tv_basic_legacy.pth", ModelParityTests.tvBasic, reference: "tv_basic")
    }

    func testMiBCheckpointsInsideModelStateWithModulePrefix() throws {
        for file in ["mib_small.pth", "mib_small_legacy.pth"] {
            let r = try roundTrip(file, ModelParityTests.mibSmall, reference: "mib_small")
            XCTAssertEqual(r.flavor, .mib)
            XCTAssertEqual(r.wrapper, "model_state")
            XCTAssertTrue(r.strippedModulePrefix)
            XCTAssertEqual(Set(r.ignoredEntries), ["epoch", "best_score"])
        }
    }

    func testCardRecordsClassesStepsAndSource() throws {
        let (_, card, report) = try Converter.convert(
            models.appendingPathComponent("mib_small.pth"),
            options(ModelParityTests.mibSmall))
        XCTAssertEqual(card.architecture.classesPerStep, [4, 2])
        XCTAssertEqual(card.classNames, Array(DatasetClasses.voc.prefix(6)))
        XCTAssertEqual(
            card.history,
            [IncrementalStep(step: 0, classes: [0, 1, 2, 3]), IncrementalStep(step: 1, classes: [4, 5])])
        XCTAssertEqual(card.source?.sha256, report.sha256)
        XCTAssertEqual(report.sha256, try sha256Hex(file: models.appendingPathComponent("mib_small.pth")))
        XCTAssertEqual(report.sha256.count, 64)
    }

    func testMiBModelsRefuseInputsBeyondTheirPoolingWindow() throws {
        let model = try DeepLabV3(ModelParityTests.mibSmall)
        XCTAssertNoThrow(try model.checkInput(height: 512, width: 400, name: "ok.png"))
        XCTAssertThrowsError(try model.checkInput(height: 600, width: 400, name: "big.png")) { e in
            XCTAssertTrue("\(e)".hasPrefix("big.png") && "\(e)".contains("--size"), "\(e)")
        }
        XCTAssertNoThrow(try DeepLabV3(ModelParityTests.tvSmall).checkInput(height: 2000, width: 2000, name: "any.png"))
    }

    func testStepClassesMustMatchTheCheckpoint() {
        var o = options(ModelParityTests.mibSmall)
        o.stepClasses = [5, 1]
        XCTAssertThrowsError(try Converter.convert(models.appendingPathComponent("mib_small.pth"), o)) { e in
            XCTAssertTrue("\(e)".contains("cls.*.weight") && "\(e)".contains("[4, 2]"), "\(e)")
        }
    }

    func assertRefused(
        _ url: URL, _ expected: [String], arch: ArchitectureDescription = ModelParityTests.tvSmall,
        file: StaticString = #filePath, line: UInt = #line
    ) {
        XCTAssertThrowsError(try Converter.convert(url, options(arch)), file: file, line: line) { e in
            let text = "\(e)"
            XCTAssertTrue(text.contains(url.path), "message must name the file: \(text)", file: file, line: line)
            for s in expected {
                XCTAssertTrue(text.contains(s), "expected \"\(s)\" in: \(text)", file: file, line: line)
            }
        }
    }

    func testPicklesThatCallFunctionsAreRefusedWithoutRunningThem() {
        let marker = "/tmp/hrhf-pwned"
        try? FileManager.default.removeItem(atPath: marker)
        let hostile = models.appendingPathComponent("hostile")
        assertRefused(hostile.appendingPathComponent("os_system.pth"), ["refused global", "system"])
        assertRefused(hostile.appendingPathComponent("os_system_legacy.pth"), ["refused global", "system"])
        assertRefused(hostile.appendingPathComponent("builtins_eval.pth"), ["refused global", "eval"])
        assertRefused(hostile.appendingPathComponent("builtins_eval_legacy.pth"), ["refused global", "eval"])
        XCTAssertFalse(FileManager.default.fileExists(atPath: marker), "nothing may run")
    }

    func testDamagedFilesAreRefused() throws {
        let dir = temporaryDirectory()
        let original = try Data(contentsOf: models.appendingPathComponent("tv_small.pth"))
        let truncated = dir.appendingPathComponent("truncated.pth")
        try original.prefix(original.count / 2).write(to: truncated)
        assertRefused(truncated, ["damaged zip checkpoint"])

        let legacy = try Data(contentsOf: models.appendingPathComponent("tv_small_legacy.pth"))
        let truncatedLegacy = dir.appendingPathComponent("truncated_legacy.pth")
        try legacy.prefix(legacy.count - 1000).write(to: truncatedLegacy)
        assertRefused(truncatedLegacy, ["storage", "file ends inside"])

        let garbage = dir.appendingPathComponent("garbage.pth")
        try Data("this is not a checkpoint at all".utf8).write(to: garbage)
        assertRefused(garbage, ["unknown file type"])

        assertRefused(
            models.appendingPathComponent("hostile/short_storage.pth"),
            ["backbone.conv1.weight", "storage 0 declares 588 elements of F32 but holds 1176 bytes"])
        assertRefused(
            models.appendingPathComponent("hostile/complex_dtype.pth"), ["refused global torch.ComplexFloatStorage"])
    }

    func testWrongShapesAndMissingKeysNameTheKey() throws {
        var narrow = ModelParityTests.tvSmall
        narrow.headChannels = 16
        assertRefused(
            models.appendingPathComponent("tv_small.pth"),
            ["classifier.0.convs.0.0.weight: shape [8, 128, 1, 1] where the model has [16, 128, 1, 1]"], arch: narrow)
        // A state dict lacking one tensor.
        let st = try SafeTensorsFile.read(models.appendingPathComponent("tv_small.safetensors"))
        let partial = SafeTensorsFile(tensors: st.tensors.filter { $0.name != "backbone.layer2.0.conv2.weight" })
        let url = temporaryDirectory().appendingPathComponent("partial.safetensors")
        try partial.write(to: url)
        assertRefused(url, ["missing keys: backbone.layer2.0.conv2.weight"])
        // ...which --allow-missing accepts.
        var o = options(ModelParityTests.tvSmall)
        o.allowMissing = ["backbone.layer2.*"]
        let (_, _, report) = try Converter.convert(url, o)
        XCTAssertTrue(report.missingAllowed.contains("backbone.layer2.0.conv2.weight"))
        // Dropping the aux head is an explicit choice.
        var drop = options(ModelParityTests.tvSmall)
        drop.allowUnexpected = ["aux_classifier.*"]
        let (model, _, dropped) = try Converter.convert(models.appendingPathComponent("tv_small.pth"), drop)
        XCTAssertFalse(model.architecture.auxHead)
        XCTAssertEqual(dropped.unexpectedIgnored.count, 8)
    }

    func testUnknownSafetensorsDTypeNamesTheKey() throws {
        let header = #"{"backbone.conv1.weight":{"dtype":"C64","shape":[1],"data_offsets":[0,8]}}"#
        var data = Data()
        withUnsafeBytes(of: UInt64(header.utf8.count).littleEndian) { data.append(contentsOf: $0) }
        data.append(contentsOf: Array(header.utf8) + [UInt8](repeating: 0, count: 8))
        let url = temporaryDirectory().appendingPathComponent("c64.safetensors")
        try data.write(to: url)
        assertRefused(url, ["backbone.conv1.weight", "unsupported dtype C64"])
    }

    func testConvertCommandExitsNonZeroAndWritesNothingOnBadInput() throws {
        let out = temporaryDirectory().appendingPathComponent("never.safetensors")
        let archFile = temporaryDirectory().appendingPathComponent("arch.json")
        try JSONEncoder().encode(ModelParityTests.tvSmall).write(to: archFile)
        let bad = try runTool(
            "hrhf-convert",
            [
                models.appendingPathComponent("hostile/os_system.pth").path,
                "--arch", archFile.path, "--out", out.path,
            ])
        XCTAssertNotEqual(bad.status, 0)
        XCTAssertTrue(bad.stderr.contains("os_system.pth") && bad.stderr.contains("refused global"), bad.stderr)
        XCTAssertFalse(FileManager.default.fileExists(atPath: out.path))
        XCTAssertFalse(FileManager.default.fileExists(atPath: out.path + ".partial"))

        let good = try runTool(
            "hrhf-convert",
            [
                models.appendingPathComponent("tv_small_legacy.pth").path,
                "--arch", archFile.path, "--classes", "voc", "--out", out.path,
            ])
        XCTAssertEqual(good.status, 0, good.stderr)
        let parameters = try DeepLabV3(ModelParityTests.tvSmall).parameterCount
        XCTAssertTrue(good.stdout.contains("parameters") && good.stdout.contains("\(parameters)"), good.stdout)
        XCTAssertTrue(FileManager.default.fileExists(atPath: out.path))
    }
}
