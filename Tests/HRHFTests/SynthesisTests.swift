import HRHFCommandLine
import XCTest

@testable import HRHF

final class SynthesisTests: XCTestCase {
    /// A tiny teacher with random weights: enough to exercise every code path quickly.
    static let tinyArch = ArchitectureDescription(
        name: "tiny", flavor: .torchvision, block: .basic, layers: [1, 1, 1, 1],
        baseWidth: 4, outputStride: 8, headChannels: 8, classesPerStep: [6])

    static func tinyTeacher() throws -> (URL, DeepLabV3, ModelCard) {
        let model = try DeepLabV3(tinyArch, seed: 11)
        // Random running statistics, so evaluation mode is not the identity.
        var rng = SeededGenerator(seed: 12)
        for (name, t) in model.namedBuffers() where name.hasSuffix("running_var") {
            for i in 0..<t.count { t.pointer[i] = 0.5 + rng.nextUnitFloat() }
        }
        let card = ModelCard(architecture: tinyArch, classNames: Array(DatasetClasses.shapes.prefix(6)))
        let url = temporaryDirectory().appendingPathComponent("teacher.safetensors")
        try ModelFile.save(model, card: card, to: url)
        return (url, model, card)
    }

    static func smallOptions() -> InversionOptions {
        var o = InversionOptions()
        o.iterations = 3
        o.warmup = 1
        o.batchSize = 2
        o.resolution = 16
        o.jitter = 2
        return o
    }

    func testSAALossesHaveFiniteDifferenceGradients() throws {
        let (_, model, card) = try Self.tinyTeacher()
        var o = Self.smallOptions()
        o.weightTV1 = 0.1
        let inversion = try SegInversion(
            teacher: model, normalization: card.normalization, classes: [1, 2, 3, 4, 5], options: o)
        var rng = SeededGenerator(seed: 3)
        let targets = inversion.drawTargets(firstIndex: 0, count: 2, seed: 3, rng: &rng)
        let x = randn([2, 3, 16, 16], seed: 4)
        // Each term on its own. The ranking inside top-k can change under a step, so the step is
        // small (1e-3) and the tolerances allow for float32 noise at that step.
        func saa(_ t: SegInversion.Terms, _ i: Int) -> Tensor { t.objective.named[i].1 }
        let pick: [(SegInversion.Terms) -> Tensor] = [
            { saa($0, 0) }, { saa($0, 1) }, { saa($0, 2) }, { $0.tv2 + $0.tv1 }, { $0.l2 },
        ]
        for term in pick {
            checkGradients([x], samples: 12, step: 1e-3, atol: 3e-3, rtol: 2e-2) { t in
                term(inversion.terms(t[0], targets: targets))
            }
        }
        // The statistics term through the first batch-norm layer (before max pooling: deeper
        // layers sit behind pooling and ReLU kinks that a finite step in a 16-pixel image keeps
        // crossing; their backward is covered op by op and by the hook's own check).
        checkGradients([x], samples: 12, step: 1e-2) { t in
            _ = inversion.terms(t[0], targets: targets)
            let r = inversion.recorder.records[0]
            return sqrt(sum(square(r.mean - r.runningMean))) + sqrt(sum(square(r.variance - r.runningVar)))
        }
        XCTAssertTrue(model.parameters.allSatisfy { $0.grad == nil }, "no weight gradients")
    }

    func testTargetsRespectTheAreaBoundsAndTheClassList() throws {
        let (_, model, card) = try Self.tinyTeacher()
        var o = Self.smallOptions()
        o.maxClasses = 3
        let inversion = try SegInversion(
            teacher: model, normalization: card.normalization, classes: [2, 3, 5], options: o)
        var rng = SeededGenerator(seed: 9)
        let drawn = inversion.drawTargets(firstIndex: 0, count: 200, seed: 9, rng: &rng)
        for t in drawn {
            XCTAssertTrue((1...3).contains(t.classes.count))
            XCTAssertTrue(Set(t.classes).isSubset(of: [2, 3, 5]))
            XCTAssertLessThanOrEqual(t.areas.reduce(0, +), o.areaTotalMax + 1e-5)
            XCTAssertTrue(t.areas.allSatisfy { $0 <= o.areaMax })
        }
        XCTAssertThrowsError(
            try SegInversion(teacher: model, normalization: card.normalization, classes: [0, 9], options: o)
        ) { e in
            XCTAssertEqual((e as? OptionError)?.option, "--classes")
        }
        o.resolution = 8
        XCTAssertThrowsError(
            try SegInversion(teacher: model, normalization: card.normalization, classes: [2], options: o)
        ) { e in
            XCTAssertEqual(e as? OptionError, OptionError(option: "--resolution", "8: at least 16 pixels"))
        }
    }

    /// A pack of some classes (as made between steps) still pushes down every other old class.
    func testAbsentClassesAreEveryOtherForegroundClassOfTheTeacher() throws {
        let (_, model, card) = try Self.tinyTeacher()
        let inversion = try SegInversion(
            teacher: model, normalization: card.normalization, classes: [4], options: Self.smallOptions())
        let k = inversion.saaCounts([(classes: [4], areas: [0.2])], classes: 6, pixels: 256)
        // Classes 1, 2, 3 and 5 absent, each weighing a quarter, each on the top 2% (5 of 256 pixels).
        XCTAssertEqual(k.absMask, [0, 0.25, 0.25, 0.25, 0, 0.25])
        XCTAssertEqual(k.kAbs, [0, 5, 5, 5, 0, 5])
    }

    func testEveryClassLeadsEquallyManyImagesAcrossBatches() throws {
        let (_, model, card) = try Self.tinyTeacher()
        var o = Self.smallOptions()
        o.maxClasses = 1
        let classes = [1, 2, 3, 4, 5]
        let inversion = try SegInversion(
            teacher: model, normalization: card.normalization, classes: classes, options: o)
        // Batches of 3 drawn separately (as shards do), 15 images: one class each, so each class
        // exactly 3 times; a different seed gives another order.
        var counts = [Int: Int]()
        var firstOrder: [Int] = []
        for b in 0..<5 {
            var rng = SeededGenerator(seed: SegInversion.batchSeed(11, b))
            for t in inversion.drawTargets(firstIndex: 3 * b, count: 3, seed: 11, rng: &rng) {
                counts[t.classes[0], default: 0] += 1
                firstOrder.append(t.classes[0])
            }
        }
        XCTAssertEqual(counts, [1: 3, 2: 3, 3: 3, 4: 3, 5: 3])
        var rng = SeededGenerator(seed: 1)
        let other = inversion.drawTargets(firstIndex: 0, count: 5, seed: 12, rng: &rng).map { $0.classes[0] }
        XCTAssertEqual(Set(other), Set(classes))
        XCTAssertNotEqual(other, Array(firstOrder.prefix(5)), "the order depends on the seed")
    }

    func testWithoutSAAEachImageIsOneClassAllOverAndTheLossIsPlainCrossEntropy() throws {
        let (_, model, card) = try Self.tinyTeacher()
        var o = Self.smallOptions()
        o.scaleAwareAggregation = false
        let inversion = try SegInversion(
            teacher: model, normalization: card.normalization, classes: [1, 2, 3, 4, 5], options: o)
        var rng = SeededGenerator(seed: 3)
        let targets = inversion.drawTargets(firstIndex: 0, count: 5, seed: 3, rng: &rng)
        XCTAssertEqual(targets.map(\.classes.count), [1, 1, 1, 1, 1])
        XCTAssertEqual(Set(targets.map { $0.classes[0] }), [1, 2, 3, 4, 5], "each class leads once")
        XCTAssertEqual(targets.map(\.areas), Array(repeating: [1], count: 5))
        let x = randn([2, 3, 16, 16], seed: 4)
        let pair = Array(targets.prefix(2))
        let t = inversion.terms(x, targets: pair)
        let named = t.objective.named
        XCTAssertEqual(named.map(\.0), ["ce"])
        // By hand: the mean over the pixels of -log softmax at the image's target class.
        let logits = withNoGrad { model.run(x).logits }
        let c = model.numClasses, hw = 16 * 16
        for b in 0..<2 {
            var total = 0.0
            for i in 0..<hw {
                let row = (0..<c).map { Double(logits.pointer[(b * c + $0) * hw + i]) }
                let top = row.max()!
                let logSum = top + log(row.map { exp($0 - top) }.reduce(0, +))
                total += logSum - row[pair[b].classes[0]]
            }
            XCTAssertEqual(Double(named[0].1.pointer[b]), total / Double(hw), accuracy: 1e-5)
        }
        // The image's loss is the cross-entropy and the priors: SAA's weights take no part.
        let per = inversion.perImage(t)
        var heavier = o
        (heavier.lambdaOut, heavier.lambdaAbsent) = (100, 100)
        let other = try SegInversion(
            teacher: model, normalization: card.normalization, classes: [1, 2, 3, 4, 5], options: heavier)
        let perOther = other.perImage(other.terms(x, targets: pair))
        for b in 0..<2 {
            let expected = named[0].1.pointer[b] + o.weightTV2 * t.tv2.pointer[b] + o.weightL2 * t.l2.pointer[b]
            XCTAssertEqual(per.pointer[b], expected, accuracy: 1e-5)
            XCTAssertEqual(perOther.pointer[b], per.pointer[b])
        }
        // With SAA the same images and targets give SAA's three terms and another loss.
        var withSAA = o
        withSAA.scaleAwareAggregation = true
        let saa = try SegInversion(
            teacher: model, normalization: card.normalization, classes: [1, 2, 3, 4, 5], options: withSAA)
        let saaTerms = saa.terms(x, targets: pair)
        XCTAssertEqual(saaTerms.objective.named.map(\.0), ["in", "out", "absent"])
        XCTAssertGreaterThan(abs(saa.perImage(saaTerms).pointer[0] - per.pointer[0]), 1e-3)
        checkGradients([x], samples: 12, step: 1e-3, atol: 3e-3, rtol: 2e-2) { v in
            inversion.terms(v[0], targets: pair).objective.named[0].1
        }
    }

    func testANoSAAPackRecordsCrossEntropyAndResumesOnlyWithoutSAA() throws {
        let teacher = try Self.tinyTeacher()
        let dir = temporaryDirectory()
        var o = Self.smallOptions()
        o.scaleAwareAggregation = false
        func job(_ options: InversionOptions, _ name: String) -> SynthesisJob {
            SynthesisJob(
                teacherURL: teacher.0, model: teacher.1, card: teacher.2, classes: [1, 2, 3, 4, 5], count: 4,
                options: options, seed: 21, out: dir.appendingPathComponent(name))
        }
        let manifest = try job(o, "plain.tar").run(resume: false).manifest
        let read = try SyntheticPack(url: dir.appendingPathComponent("plain.tar"))
        XCTAssertEqual(read.manifest, manifest)
        for r in manifest.images {
            XCTAssertEqual(r.losses.keys.sorted(), ["bn_batch", "ce", "l2", "tv1", "tv2"])
            XCTAssertEqual(r.targets.count, 1)
            XCTAssertEqual(r.targetAreas, [1])
        }
        let saaManifest = try job(Self.smallOptions(), "saa.tar").run(resume: false).manifest
        XCTAssertEqual(
            saaManifest.images[0].losses.keys.sorted(), ["absent", "bn_batch", "in", "l2", "out", "tv1", "tv2"])
        // An interrupted run without SAA is not continued with SAA, and is continued without it.
        XCTAssertThrowsError(try job(o, "cut.tar").run(resume: false, stopAfterBatches: 1))
        XCTAssertThrowsError(try job(Self.smallOptions(), "cut.tar").run(resume: true)) { e in
            XCTAssertTrue("\(e)".contains("the interrupted run used other options"), "\(e)")
        }
        let resumed = try job(o, "cut.tar").run(resume: true)
        XCTAssertEqual(resumed.resumedImages, 2)
        XCTAssertEqual(
            try Data(contentsOf: dir.appendingPathComponent("cut.tar")),
            try Data(contentsOf: dir.appendingPathComponent("plain.tar")))
    }

    func testTheNoSAAFlagTurnsScaleAwareAggregationOff() throws {
        XCTAssertTrue(try SynthesisOptionGroup.parse([]).options.scaleAwareAggregation)
        XCTAssertFalse(try SynthesisOptionGroup.parse(["--no-saa"]).options.scaleAwareAggregation)
    }

    func testPearson() {
        XCTAssertEqual(pearson([1, 2, 3], [2, 4, 6]), 1, accuracy: 1e-12)
        XCTAssertEqual(pearson([1, 2, 3], [3, 2, 1]), -1, accuracy: 1e-12)
        XCTAssertEqual(pearson([1, 2, 3, 4], [1, 3, 2, 4]), 0.8, accuracy: 1e-12)
    }

    func makeJob(_ teacher: (URL, DeepLabV3, ModelCard), out: URL, count: Int = 5, shard: (Int, Int)? = nil)
        -> SynthesisJob
    {
        SynthesisJob(
            teacherURL: teacher.0, model: teacher.1, card: teacher.2, classes: [1, 2, 3, 4, 5], count: count,
            options: Self.smallOptions(), seed: 21, shard: shard, out: out)
    }

    func testPackIsReproducibleShardableResumableAndReadable() throws {
        let teacher = try Self.tinyTeacher()
        let dir = temporaryDirectory()
        let a = dir.appendingPathComponent("a.tar"), b = dir.appendingPathComponent("b.tar")
        let outcome = try makeJob(teacher, out: a).run(resume: false)
        XCTAssertEqual(outcome.manifest.images.count, 5)
        XCTAssertFalse(FileManager.default.fileExists(atPath: a.path + ".partial"))
        XCTAssertFalse(FileManager.default.fileExists(atPath: a.path + ".partial.d"))
        _ = try makeJob(teacher, out: b).run(resume: false)
        XCTAssertEqual(try sha256Hex(file: a), try sha256Hex(file: b), "same seed and options, same bytes")

        // Two shards merged equal one run.
        let s1 = dir.appendingPathComponent("s1.tar"), s2 = dir.appendingPathComponent("s2.tar")
        _ = try makeJob(teacher, out: s1, shard: (1, 2)).run(resume: false)
        _ = try makeJob(teacher, out: s2, shard: (2, 2)).run(resume: false)
        let merged = dir.appendingPathComponent("merged.tar")
        _ = try SyntheticPack.merge([try SyntheticPack(url: s1), try SyntheticPack(url: s2)], to: merged)
        XCTAssertEqual(try sha256Hex(file: merged), try sha256Hex(file: a))
        XCTAssertThrowsError(
            try SyntheticPack.merge([try SyntheticPack(url: s1)], to: dir.appendingPathComponent("x.tar"))
        ) { e in
            XCTAssertTrue("\(e)".contains("a shard is missing"), "\(e)")
        }

        // A killed run resumes from its last complete batch to the same pack.
        let c = dir.appendingPathComponent("c.tar")
        XCTAssertThrowsError(try makeJob(teacher, out: c).run(resume: false, stopAfterBatches: 1))
        XCTAssertTrue(FileManager.default.fileExists(atPath: c.path + ".partial.d/batches/000000.json"))
        XCTAssertThrowsError(try makeJob(teacher, out: c).run(resume: false)) { e in
            XCTAssertTrue("\(e)".contains("--resume"))
        }
        // A damaged batch record is named, not silently synthesised again.
        let record = URL(fileURLWithPath: c.path + ".partial.d/batches/000000.json")
        let intact = try Data(contentsOf: record)
        try Data("[{".utf8).write(to: record)
        XCTAssertThrowsError(try makeJob(teacher, out: c).run(resume: true)) { e in
            XCTAssertTrue(e is PackError && "\(e)".contains(record.path) && "\(e)".contains("unreadable"), "\(e)")
        }
        try intact.write(to: record)
        let resumed = try makeJob(teacher, out: c).run(resume: true)
        XCTAssertEqual(resumed.resumedImages, 2)
        XCTAssertEqual(resumed.imagesMade, 3)
        XCTAssertEqual(try sha256Hex(file: c), try sha256Hex(file: a))

        // The pack reads back: manifest, records, images and pseudo-labels.
        let pack = try SyntheticPack(url: a)
        XCTAssertEqual(pack.manifest.generator.seed, 21)
        XCTAssertEqual(pack.manifest.teacher.sha256, try sha256Hex(file: teacher.0))
        let r = pack.manifest.images[3]
        XCTAssertEqual(r.image, "images/000003.png")
        XCTAssertEqual(try pack.image(r).width, 16)
        XCTAssertEqual(try pack.label(r).values.count, 256)
        XCTAssertEqual(r.achievedAreas.count, r.targets.count)
        let sheet = try contactSheet(pack)
        XCTAssertGreaterThan(sheet.width, 64)

        // Standard tools read it.
        let tar = Process()
        tar.executableURL = URL(fileURLWithPath: "/usr/bin/tar")
        tar.arguments = ["-tf", a.path]
        let pipe = Pipe()
        tar.standardOutput = pipe
        try tar.run()
        let listing = String(decoding: pipe.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        tar.waitUntilExit()
        XCTAssertEqual(tar.terminationStatus, 0)
        let names = listing.split(separator: "\n").map(String.init)
        XCTAssertEqual(names.first, "manifest.json")
        XCTAssertEqual(names.last, "SHA256SUMS")
        XCTAssertEqual(names.count, 12)
        if FileManager.default.isExecutableFile(atPath: "/usr/bin/python3")
            || FileManager.default.isExecutableFile(atPath: "/usr/local/bin/python3")
        {
            let py = Process()
            py.executableURL = URL(fileURLWithPath: "/usr/bin/env")
            py.arguments = [
                "python3", "-c", "import tarfile,sys; t=tarfile.open(sys.argv[1]); print(len(t.getnames()))", a.path,
            ]
            let out = Pipe()
            py.standardOutput = out
            try py.run()
            let text = String(decoding: out.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
            py.waitUntilExit()
            XCTAssertEqual(text.trimmingCharacters(in: .whitespacesAndNewlines), "12")
        }
    }

    /// A valid pack's entries, for building damaged ones.
    func entries(of url: URL) throws -> [(String, Data)] {
        let reader = try ArchiveReader(path: url.path, format: .tar)
        var out: [(String, Data)] = []
        while let e = try reader.next() { out.append((e.name, try reader.readData(entry: e.name, limit: 1 << 24))) }
        return out
    }

    func assertRefused(
        _ build: (TarWriter) throws -> Void, _ expected: String, limit: Int = SyntheticPack.defaultEntryLimit,
        file: StaticString = #filePath, line: UInt = #line
    ) throws {
        let url = temporaryDirectory().appendingPathComponent("hostile.tar")
        let w = try TarWriter(url: url)
        try build(w)
        try w.finish()
        XCTAssertThrowsError(try SyntheticPack(url: url, entryLimit: limit), file: file, line: line) { e in
            XCTAssertTrue("\(e)".hasPrefix(url.path) && "\(e)".contains(expected), "\(e)", file: file, line: line)
        }
    }

    func testHostileAndDamagedPacksAreRefusedNamingTheEntry() throws {
        let teacher = try Self.tinyTeacher()
        let good = temporaryDirectory().appendingPathComponent("good.tar")
        _ = try makeJob(teacher, out: good, count: 2).run(resume: false)
        let valid = try entries(of: good)
        func copy(_ w: TarWriter, replacing: [String: Data] = [:]) throws {
            for (n, d) in valid { try w.add(n, replacing[n] ?? d) }
        }
        let manifest = valid[0].1
        try assertRefused(
            { w in
                try w.add("manifest.json", manifest)
                try w.add("/etc/evil", Data("x".utf8))
            }, "entry /etc/evil: absolute paths")
        try assertRefused(
            { w in
                try w.add("manifest.json", manifest)
                try w.add("images/../../evil", Data("x".utf8))
            }, "entry images/../../evil: paths with ..")
        let kinds: [(String, TarWriter.Kind, String)] = [
            ("images/000000.png", .symlink("/etc/passwd"), "links"),
            ("labels/000000.png", .hardlink("manifest.json"), "links"),
            ("images/000001.png", .characterDevice, "device"),
        ]
        for (name, kind, reason) in kinds {
            try assertRefused(
                { w in
                    try w.add("manifest.json", manifest)
                    try w.add(name, Data(), kind: kind)
                },
                "entry \(name): \(reason)")
        }
        let limit = manifest.count + 100
        try assertRefused(
            { w in
                try w.add("manifest.json", manifest)
                try w.add("images/000000.png", Data(count: limit + 1))
            },
            "entry images/000000.png: \(limit + 1) bytes is over the limit", limit: limit)
        try assertRefused(
            { w in
                try w.add("manifest.json", manifest)
                try w.add("manifest.json", manifest)
            }, "entry manifest.json: appears twice")
        let future = String(decoding: manifest, as: UTF8.self).replacingOccurrences(
            of: "\"formatVersion\" : 1", with: "\"formatVersion\" : 9")
        try assertRefused(
            { w in try copy(w, replacing: ["manifest.json": Data(future.utf8)]) },
            "entry manifest.json: format version 9")
        try assertRefused(
            { w in for (n, d) in valid.dropFirst() { try w.add(n, d) } },
            "manifest.json: missing, or not the first entry")
        // One flipped byte in an image fails the checksum.
        var damaged = valid[1].1
        damaged[damaged.count / 2] ^= 0x01
        try assertRefused(
            { w in try copy(w, replacing: [valid[1].0: damaged]) }, "entry \(valid[1].0): checksum mismatch")
        // An entry outside the whitelist.
        try assertRefused(
            { w in
                for (n, d) in valid.dropLast() { try w.add(n, d) }
                try w.add("extra.txt", Data("x".utf8))
                try w.add(valid.last!.0, valid.last!.1)
            }, "entry extra.txt: not a pack entry name")
        // An entry the checksums do not list.
        let sumsWithoutManifest =
            String(decoding: valid.last!.1, as: UTF8.self).split(separator: "\n").dropFirst()
            .joined(separator: "\n") + "\n"
        try assertRefused(
            { w in try copy(w, replacing: ["SHA256SUMS": Data(sumsWithoutManifest.utf8)]) },
            "entry manifest.json: not listed in SHA256SUMS")
    }

    func testCommandsVerifyAndRefuseAFlippedByte() throws {
        let teacher = try Self.tinyTeacher()
        let dir = temporaryDirectory()
        let pack = dir.appendingPathComponent("p.tar")
        let r = try runTool(
            "hrhf-synth",
            [
                "--model", teacher.0.path, "--classes", "1-5", "--count", "2", "--synth-iterations", "2",
                "--synth-batch", "2", "--resolution", "16", "--out", pack.path, "--threads", "1",
            ])
        XCTAssertEqual(r.status, 0, r.stderr)
        XCTAssertTrue(r.stdout.contains("area correlation") && r.stdout.contains("class fidelity"), r.stdout)
        let ok = try runTool("hrhf-pack", ["verify", pack.path, "--model", teacher.0.path])
        XCTAssertEqual(ok.status, 0, ok.stderr)
        XCTAssertTrue(ok.stdout.contains("teacher matches"))
        var bytes = try Data(contentsOf: pack)
        bytes[bytes.count / 2] ^= 0x01
        let bad = dir.appendingPathComponent("bad.tar")
        try bytes.write(to: bad)
        let refused = try runTool("hrhf-pack", ["verify", bad.path])
        XCTAssertNotEqual(refused.status, 0)
        XCTAssertTrue(refused.stderr.contains("bad.tar"), refused.stderr)
        let other = try DeepLabV3(Self.tinyArch, seed: 99)
        let otherURL = dir.appendingPathComponent("other.safetensors")
        try ModelFile.save(other, card: teacher.2, to: otherURL)
        let wrongTeacher = try runTool("hrhf-pack", ["verify", pack.path, "--model", otherURL.path])
        XCTAssertNotEqual(wrongTeacher.status, 0)
        XCTAssertTrue(wrongTeacher.stderr.contains("teacher SHA-256"), wrongTeacher.stderr)
    }
}
