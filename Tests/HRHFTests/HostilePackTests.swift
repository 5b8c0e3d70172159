import XCTest

@testable import HRHF

/// Packs that lie: every kind of refusal of the pack rules (names, entry kinds, sizes, order,
/// checksums, manifest fields against the teacher, image headers, label values), with
/// checksums rebuilt so each lie reaches the check meant for it; and the commands that read them.
final class HostilePackTests: XCTestCase {
    static let teacherCard = ModelCard(
        architecture: SynthesisTests.tinyArch,
        classNames: Array(DatasetClasses.shapes.prefix(6)))
    static let side = 4

    /// A valid two-image manifest of 4x4 images, classes 1-5, up to two targets per image.
    static func manifest() -> PackManifest {
        var options = InversionOptions()
        options.resolution = side
        options.maxClasses = 2
        let records = (0..<2).map { i in
            SynthesisRecord(
                index: i, image: "images/00000\(i).png", label: "labels/00000\(i).png",
                targets: [1 + i, 3], targetAreas: [0.2, 0.1], achievedAreas: [0.25, 0.05], absentMaxArea: 0,
                teacherConfidence: 0.9, losses: ["total": 1.5], seed: 7, batch: 0)
        }
        return PackManifest(
            generator: .init(
                name: "hrhf-synth", version: toolkitVersion, options: options, seed: 7,
                count: 2),
            teacher: .init(
                file: "teacher.safetensors", sha256: String(repeating: "0", count: 64),
                card: teacherCard),
            classes: (1...5).map { ClassInfo(id: $0, name: teacherCard.classes[$0].name) },
            shard: nil, images: records,
            quality: SynthesisQuality(records: records, imagesPerMinute: nil))
    }

    static func imagePNG(width: Int = side, height: Int = side) throws -> Data {
        try ImageIO.encodePNG(RGBImage(width: width, height: height, fill: (200, 30, 90)))
    }

    static func labelPNG(width: Int = side, height: Int = side, value: UInt16 = 1) throws -> Data {
        var values = [UInt16](repeating: 0, count: width * height)
        values[0] = value
        values[values.count - 1] = 255
        return try ImageIO.encodePalettePNG(IndexMask(width: width, height: height, values: values))
    }

    typealias Entry = (name: String, data: Data, kind: TarWriter.Kind)

    /// The entries of a valid pack of `manifest`, SHA256SUMS left out.
    static func entries(_ manifest: PackManifest = manifest()) throws -> [Entry] {
        var out: [Entry] = [("manifest.json", try manifest.encoded(), .file)]
        for r in manifest.images {
            out.append((r.image, try imagePNG(), .file))
            out.append((r.label, try labelPNG(), .file))
        }
        return out
    }

    /// Writes `entries` and, unless `sums` is given, a SHA256SUMS that lists them all correctly.
    static func write(_ entries: [Entry], sums: String? = nil, name: String = "pack.tar") throws -> URL {
        let url = temporaryDirectory().appendingPathComponent(name)
        let writer = try TarWriter(url: url)
        for e in entries { try writer.add(e.name, e.data, kind: e.kind) }
        let listed =
            entries.filter { if case .file = $0.kind { return true } else { return false } }
            .map { "\(sha256Hex($0.data))  \($0.name)" }.joined(separator: "\n") + "\n"
        try writer.add("SHA256SUMS", Data((sums ?? listed).utf8))
        try writer.finish()
        return url
    }

    /// A pack of a manifest changed by `change`, checksums right.
    static func pack(_ change: (inout PackManifest) -> Void) throws -> URL {
        var m = manifest()
        change(&m)
        return try write(try entries(m))
    }

    /// `read` throws a PackError whose text starts with the pack, names `entry` and holds `reason`.
    func assertRefused(
        _ url: URL, entry: String, _ reason: String, file: StaticString = #filePath, line: UInt = #line,
        _ read: (URL) throws -> Void = { _ = try SyntheticPack(url: $0) }
    ) {
        XCTAssertThrowsError(try read(url), file: file, line: line) { e in
            XCTAssertTrue(e is PackError, "\(type(of: e)): \(e)", file: file, line: line)
            let text = "\(e)"
            XCTAssertTrue(
                text.hasPrefix(url.path + ": entry \(entry): ") && text.contains(reason), text,
                file: file, line: line)
        }
    }

    func testTheValidPackReads() throws {
        let pack = try SyntheticPack(url: try Self.write(try Self.entries()))
        XCTAssertEqual(pack.manifest, Self.manifest())
        XCTAssertEqual(pack.files.count, 6)
        try pack.verifyImages()
        XCTAssertEqual(try pack.label(pack.manifest.images[1]).values, [1] + [UInt16](repeating: 0, count: 14) + [255])
    }

    func testNamesOutsideTheWhitelistAreRefused() throws {
        let valid = try Self.entries()
        let image = valid[1].data
        let cases: [(String, String)] = [
            ("./images/000000.png", "paths with . or empty components"),
            ("images//000000.png", "paths with . or empty"),
            ("/images/000000.png", "absolute paths"), ("images/../images/000000.png", "paths with .."),
            ("images\\000000.png", "not a pack entry name"), ("images/00000.png", "not a pack entry name"),
            ("images/0000000000.png", "not a pack entry name"), ("images/000000.PNG", "not a pack entry name"),
            ("images/00000\u{1}.png", "control characters"), ("notes.txt", "not a pack entry name"),
        ]
        for (name, reason) in cases {
            // Beside the real entry, before SHA256SUMS: the checksums list it too.
            assertRefused(try Self.write(valid + [(name, image, .file)]), entry: name, reason)
        }
        assertRefused(
            try Self.write([valid[0], valid[1], valid[1]] + valid.dropFirst(2)), entry: "images/000000.png",
            "appears twice")
    }

    func testEntriesThatAreNotRegularFilesAreRefused() throws {
        let valid = try Self.entries()
        let kinds: [(TarWriter.Kind, String)] = [
            (.symlink("/etc/passwd"), "links are not allowed"),
            (.hardlink("manifest.json"), "links are not allowed"),
            (.characterDevice, "device or special entries"),
        ]
        for (kind, reason) in kinds {
            var entries = valid
            entries[1] = (entries[1].name, Data(), kind)
            assertRefused(try Self.write(entries), entry: "images/000000.png", reason)
        }
        // libarchive writes a directory's name with a trailing /, which no entry name has.
        assertRefused(
            try Self.write(valid + [("images", Data(), .directory)]), entry: "images/",
            "paths with . or empty")
    }

    func testSizesOrderAndChecksumsAreChecked() throws {
        let valid = try Self.entries()
        var big = valid
        big[1].data = Data(count: 5000)
        let url = try Self.write(big)
        assertRefused(url, entry: "images/000000.png", "5000 bytes is over the limit of 4096") {
            _ = try SyntheticPack(url: $0, entryLimit: 4096)
        }
        assertRefused(
            try Self.write(Array(valid.dropFirst()) + [valid[0]]), entry: "manifest.json",
            "not the first entry")
        assertRefused(try Self.write([]), entry: "manifest.json", "not the first entry (SHA256SUMS is)")
        // An entry after SHA256SUMS.
        let late = temporaryDirectory().appendingPathComponent("late.tar")
        let writer = try TarWriter(url: late)
        let sums = valid.map { "\(sha256Hex($0.data))  \($0.name)" }.joined(separator: "\n") + "\n"
        for e in valid.dropLast() { try writer.add(e.name, e.data) }
        try writer.add("SHA256SUMS", Data(sums.utf8))
        try writer.add(valid.last!.name, valid.last!.data)
        try writer.finish()
        assertRefused(late, entry: "SHA256SUMS", "not the last entry: labels/000001.png follows it")

        let lines = valid.map { "\(sha256Hex($0.data))  \($0.name)" }
        let sumCases: [(String, String, String)] = [
            (
                ([lines[0].prefix(64).uppercased() + lines[0].dropFirst(64)] + lines.dropFirst()).joined(
                    separator: "\n")
                    + "\n", "SHA256SUMS", "line 1 is not 64 lowercase hex digits"
            ),
            (
                lines.joined(separator: "\n").replacingOccurrences(of: "  ", with: " ") + "\n", "SHA256SUMS",
                "line 1 is not"
            ),
            ((lines + [lines[1]]).joined(separator: "\n") + "\n", "images/000000.png", "listed twice"),
            (
                (lines + ["\(String(repeating: "a", count: 64))  images/000007.png"]).joined(separator: "\n") + "\n",
                "images/000007.png", "listed in SHA256SUMS but not an entry"
            ),
            (
                (lines + ["\(String(repeating: "a", count: 64))  SHA256SUMS"]).joined(separator: "\n") + "\n",
                "SHA256SUMS", "listed in SHA256SUMS but not an entry"
            ),
            (lines.dropLast().joined(separator: "\n") + "\n", "labels/000001.png", "not listed in SHA256SUMS"),
            (lines.joined(separator: "\n\n") + "\n", "SHA256SUMS", "line 2 is not"),
            (lines.joined(separator: "\n"), "SHA256SUMS", "does not end with a line feed"),
            (lines.joined(separator: "\r\n") + "\r\n", "manifest.json\r", "listed in SHA256SUMS but not an entry"),
        ]
        for (text, entry, reason) in sumCases { assertRefused(try Self.write(valid, sums: text), entry: entry, reason) }
        var flipped = valid
        flipped[2].data[flipped[2].data.count / 2] ^= 1
        let damaged = try Self.write(flipped, sums: lines.joined(separator: "\n") + "\n")
        assertRefused(damaged, entry: "labels/000000.png", "checksum mismatch")
    }

    func testManifestFieldsAreCheckedAgainstTheTeacher() throws {
        let m = "manifest.json"
        let cases: [((inout PackManifest) -> Void, String)] = [
            ({ $0.format = "other" }, "not a synthetic-pack manifest"),
            ({ $0.formatVersion = 9 }, "format version 9 is not one this toolkit reads"),
            ({ $0.formatVersion = 0 }, "format version 0"),
            (
                { $0.teacher.card.classes[2].id = 7 },
                "field teacher.card.classes[2].id: is 7, channel 2 must be class 2"
            ),
            (
                {
                    $0.teacher.card.classes = (0..<300).map { ClassInfo(id: $0, name: "c\($0)") }
                    $0.teacher.card.architecture.classesPerStep = [300]
                    $0.teacher.card.history = [IncrementalStep(step: 0, classes: Array(0..<300))]
                },
                "field teacher.card.classes: 300 classes, not 1 to 255"
            ),
            (
                { $0.teacher.card.classes.removeLast() },
                "field teacher.card.classes: card lists 5 classes, the architecture has 6"
            ),
            (
                { $0.teacher.card.architecture.classesPerStep = [Int.max, 2] },
                "field teacher.card.architecture.classesPerStep: 2 is not a positive count, or the sum overflows"
            ),
            (
                { $0.teacher.card.normalization.std[1] = 0 },
                "field teacher.card.normalization: needs three finite means"
            ),
            (
                { $0.teacher.card.formatVersion = 2 },
                "field teacher.card.formatVersion: 2 is not one this toolkit reads"
            ),
            (
                { $0.teacher.sha256 = String(repeating: "A", count: 64) },
                "field teacher.sha256: not 64 lowercase hex digits"
            ),
            (
                {
                    $0.generator.count = -1
                    $0.shard = .init(index: 1, count: 1)
                    $0.images = []
                },
                "field generator.count: -1 is negative"
            ),
            ({ $0.classes[0].id = 0 }, "field classes[0]: background (0) is not a pack class"),
            ({ $0.classes[0].id = 100_000_000 }, "field classes[0]: 100000000 is not a class of the teacher (0 to 5)"),
            ({ $0.classes[0].id = -1 }, "field classes[0]: -1 is not a class of the teacher"),
            ({ $0.classes[0].name = "cat" }, "field classes[0]: 1 is named \"cat\" but the teacher calls it"),
            ({ $0.classes[1] = $0.classes[0] }, "field classes[1]: class 1 is listed twice"),
            ({ $0.classes = [] }, "field classes: no classes"),
            ({ $0.generator.options.maxClasses = 0 }, "field generator.options.maxClasses: 0, not 1 or more"),
            ({ $0.generator.options.maxClasses = -100_000_000 }, "field generator.options.maxClasses: -100000000"),
            ({ $0.generator.options.resolution = 0 }, "field generator.options.resolution: 0, not 1 to 4096"),
            ({ $0.generator.options.resolution = 32768 }, "field generator.options.resolution: 32768, not 1 to 4096"),
            ({ $0.generator.count = 3 }, "field images: 2 records, generator.count is 3"),
            ({ $0.shard = .init(index: 3, count: 2) }, "field shard: part 3 of 2"),
            ({ $0.shard = .init(index: 0, count: 0) }, "field shard: part 0 of 0"),
            (
                { $0.images[1].index = -1 },
                "field images[1].index: -1, not 0 to generator.count - 1 (1) and below 1000000000"
            ),
            (
                {
                    $0.shard = .init(index: 1, count: 1)
                    $0.generator.count = 1 << 40
                    $0.images[1].index = 1 << 32
                },
                "field images[1].index: 4294967296, not 0 to generator.count - 1 (1099511627775) and below 1000000000"
            ),
            ({ $0.images[1].index = 0 }, "field images[1].index: 0 appears twice"),
            ({ $0.images[1].image = "images/000000.png" }, "field images[1]: image \"images/000000.png\" and label"),
            ({ $0.images[1].label = "./labels/000001.png" }, "are not images/000001.png and labels/000001.png"),
            ({ $0.images[0].targets = [100_000_000, 3] }, "field images[0].targets[0]: 100000000 is not a pack class"),
            ({ $0.images[0].targets = [-3, 3] }, "field images[0].targets[0]: -3 is not a pack class"),
            ({ $0.images[0].targets = [3, 3] }, "field images[0].targets[1]: 3 appears twice"),
            ({ $0.images[0].targets = [1, 2, 3] }, "field images[0]: 3 targets, 2 target areas and 2 achieved areas"),
            (
                {
                    $0.images[0].targets = []
                    $0.images[0].targetAreas = []
                    $0.images[0].achievedAreas = []
                },
                "field images[0]: 0 targets"
            ),
            (
                {
                    $0.images[0].targets = [1, 2, 3]
                    $0.images[0].targetAreas = [0, 0, 0]
                    $0.images[0].achievedAreas = [0, 0, 0]
                }, "1 to maxClasses (2)"
            ),
            ({ $0.images[0].achievedAreas = [0.1] }, "field images[0]: 2 targets, 2 target areas and 1 achieved areas"),
            ({ $0.images[0].targetAreas[1] = -0.5 }, "field images[0].targetAreas[1]: -0.5 is outside [0, 1]"),
            ({ $0.images[1].achievedAreas[0] = 1.5 }, "field images[1].achievedAreas[0]: 1.5 is outside [0, 1]"),
            ({ $0.images[1].absentMaxArea = 2 }, "field images[1].absentMaxArea: 2.0 is outside [0, 1]"),
            ({ $0.images[1].teacherConfidence = -1 }, "field images[1].teacherConfidence: -1.0 is outside [0, 1]"),
        ]
        for (change, reason) in cases { assertRefused(try Self.pack(change), entry: m, reason) }

        // JSON-level lies: not JSON, the wrong types, a non-integer version, deep nesting.
        let valid = try Self.entries()
        let text = String(decoding: valid[0].data, as: UTF8.self)
        let deep = String(repeating: "[", count: 100_000) + String(repeating: "]", count: 100_000)
        let zeros = Array(repeating: "0", count: 1 << 22).joined(separator: ",")
        let raw: [(String, String)] = [
            ("{", "not a synthetic-pack manifest"),
            (
                text.replacingOccurrences(of: "\"formatVersion\" : 1", with: "\"formatVersion\" : 1.5"),
                "format version 1.5"
            ),
            (
                text.replacingOccurrences(of: "\"index\" : 1,", with: "\"index\" : \"1\","),
                "does not follow the manifest schema"
            ),
            (
                text.replacingOccurrences(of: "\"index\" : 1,", with: "\"index\" : 1e30,"),
                "does not follow the manifest schema"
            ),
            (
                text.replacingOccurrences(of: "\"losses\" : {", with: "\"deep\" : " + deep + ", \"losses\" : {"),
                "nested deeper than 32 levels"
            ),
            (
                text.replacingOccurrences(of: "\"losses\" : {", with: "\"many\" : [" + zeros + "], \"losses\" : {"),
                "more than 4194304 JSON values"
            ),
            (String(repeating: "\"[[[[,,,,\\\"\",", count: 1000) + text, "not a synthetic-pack manifest"),
        ]
        // Fields a version-1 manifest does not have, and a key given twice.
        func first(_ old: String, _ new: String) -> String {
            text.replacingCharacters(in: text.range(of: old)!, with: new)
        }
        let strict: [(String, String)] = [
            (first("\"classes\" : [", "\"labelOffset\" : 1, \"classes\" : ["), "field labelOffset: unknown field"),
            (
                first("\"absentMaxArea\" : 0,", "\"absentMaxArea\" : 0, \"remap\" : {},"),
                "field images[0].remap: unknown field"
            ),
            (
                first("\"asppRates\"", "\"extra\" : true, \"asppRates\""),
                "field teacher.card.architecture.extra: unknown"
            ),
            (
                first("\"absentMaxArea\" : 0,", "\"absentMaxArea\" : 0, \"absentMaxArea\" : 0.5,"),
                "the key \"absentMaxArea\" appears twice in one object"
            ),
        ]
        for (json, reason) in raw + strict {
            var entries = valid
            entries[0].data = Data(json.utf8)
            assertRefused(try Self.write(entries), entry: m, reason)
        }
        // Free-form objects take any key; null stands for an absent optional field.
        let accepted = [
            first("\"total\" : 1.5", "\"total\" : 1.5, \"anything\" : 2"),
            first("\"teacher\" : {", "\"shard\" : null, \"teacher\" : {"),
        ]
        for json in accepted {
            var entries = valid
            entries[0].data = Data(json.utf8)
            XCTAssertNoThrow(try SyntheticPack(url: try Self.write(entries)), json)
        }
    }

    func testImagesAndLabelsMustBeTheManifestsSizeAndKind() throws {
        let valid = try Self.entries()
        func with(_ index: Int, _ data: Data) -> [Entry] {
            var entries = valid
            entries[index].data = data
            return entries
        }
        // A label larger than its image (the overlay of `sheet` wrote past its buffer).
        assertRefused(
            try Self.write(with(2, try Self.labelPNG(width: 64, height: 64))), entry: "labels/000000.png",
            "IHDR gives 64x64, the manifest's resolution is 4")
        assertRefused(
            try Self.write(with(1, try Self.imagePNG(width: 4, height: 5))), entry: "images/000000.png",
            "IHDR gives 4x5")
        assertRefused(
            try Self.write(with(2, try Self.imagePNG())), entry: "labels/000000.png",
            "a 8-bit PNG of colour type 2: a label is an 8-bit palette or grey PNG")
        var interlaced = try Self.labelPNG()
        interlaced[28] = 1
        assertRefused(try Self.write(with(4, interlaced)), entry: "labels/000001.png", "an interlaced PNG")
        assertRefused(
            try Self.write(with(1, Self.hugeOneBitPNG())), entry: "images/000000.png",
            "a 1-bit PNG of colour type 0: an image is an 8-bit PNG")
        assertRefused(
            try Self.write(with(1, Data("not a png at all, but long enough".utf8))),
            entry: "images/000000.png", "not a PNG file")
        // An entry no record names, and a record whose entries are absent.
        assertRefused(
            try Self.write(valid + [("images/000005.png", try Self.imagePNG(), .file)]),
            entry: "images/000005.png", "not named by any record of the manifest")
        assertRefused(
            try Self.write(Array(valid.prefix(3))), entry: "images/000001.png",
            "named by the manifest but absent")
    }

    func testLabelValuesOutsideTheTeachersClassesAreRefusedWhenDecoded() throws {
        var entries = try Self.entries()
        entries[4].data = try Self.labelPNG(value: 9)
        let url = try Self.write(entries)
        let pack = try SyntheticPack(url: url) // values are read when a label is decoded
        assertRefused(
            url, entry: "labels/000001.png",
            "value 9 at pixel (0, 0) is neither a teacher class (0 to 5) nor 255"
        ) { _ in
            _ = try pack.label(pack.manifest.images[1])
        }
        assertRefused(url, entry: "labels/000001.png", "value 9") { _ in try pack.verifyImages() }
        XCTAssertNoThrow(try pack.label(pack.manifest.images[0]))
        // A record from elsewhere is not trusted either.
        var foreign = pack.manifest.images[0]
        foreign.image = "images/000042.png"
        assertRefused(url, entry: "images/000042.png", "not an entry of the pack") { _ in _ = try pack.image(foreign) }
    }

    func testContactSheetOptionsAndSizeAreBounded() throws {
        let pack = try SyntheticPack(url: try Self.write(try Self.entries()))
        let sheet = try contactSheet(pack, columns: 100, limit: 1000)
        // Two images in two columns: cells of (2 * 4 + 12) x (4 + 10 + 9 * 2) plus the 4-pixel margin.
        XCTAssertEqual(sheet.width, 2 * 20 + 4)
        XCTAssertEqual(sheet.height, 32 + 4)
        // maxClasses of 10^8 (once a 4 GB sheet): caption lines are bounded by the 5 pack classes.
        let wide = try SyntheticPack(url: try Self.pack { $0.generator.options.maxClasses = 100_000_000 })
        XCTAssertEqual(try contactSheet(wide).height, 4 + 10 + 9 * 5 + 4)
        for (columns, limit) in [(0, 16), (4, 0), (-1, 16), (4, Int.min)] {
            XCTAssertThrowsError(try contactSheet(pack, columns: columns, limit: limit)) { e in
                let text = "\(e)"
                XCTAssertTrue(text.hasPrefix(pack.url.path) && text.contains("at least one column and one image"), text)
            }
        }
        XCTAssertThrowsError(try contactSheet(pack, maxPixels: 1000)) { e in
            XCTAssertTrue("\(e)".contains("is over the limit of 1000 pixels"), "\(e)")
        }
    }

    func testAnEmptyShardIsValidButGivesNoBatches() throws {
        let url = try Self.pack {
            $0.shard = .init(index: 2, count: 2)
            $0.images = []
        }
        let pack = try SyntheticPack(url: url)
        XCTAssertThrowsError(
            try PackSampler(
                packs: [pack], batchSize: 2, augmentation: Augmentation(cropSize: 4),
                normalization: .imagenet, seed: 1)
        ) { e in
            XCTAssertTrue("\(e)".hasPrefix(url.path) && "\(e)".contains("the packs hold no images"), "\(e)")
        }
        XCTAssertThrowsError(try contactSheet(pack)) { e in XCTAssertTrue("\(e)".contains("no images"), "\(e)") }
        let full = try SyntheticPack(url: try Self.write(try Self.entries()))
        let sampler = try PackSampler(
            packs: [full], batchSize: 3, augmentation: Augmentation(cropSize: 4),
            normalization: .imagenet, seed: 1)
        XCTAssertEqual(try sampler.batch(0).shape, [3, 3, 4, 4])
        // Batch 1 was prepared in the background while the caller used batch 0: the same values as
        // made now; after a change of share the batch prepared for the old share is dropped.
        XCTAssertEqual(try sampler.batch(1).array, try sampler.makeBatch(1).array)
        sampler.share = 1..<3
        XCTAssertEqual(try sampler.batch(2).array, try sampler.makeBatch(2).array)
        XCTAssertEqual(try sampler.batch(3).shape, [2, 3, 4, 4])
    }

    func testTheFakeHalfCanLeaveOutImagesThatMissedTheirAreas() throws {
        // Image 0 got 0.25 of its asked 0.2 and 0.05 of 0.1; image 1 only 0.02 of its first class's 0.2.
        let url = try Self.pack { m in
            m.images[1].achievedAreas = [0.02, 0.1]
            m.quality = SynthesisQuality(records: m.images, imagesPerMinute: nil)
        }
        let pack = try SyntheticPack(url: url)
        XCTAssertTrue(pack.manifest.images[0].reaches(0.5))
        XCTAssertFalse(pack.manifest.images[0].reaches(0.6), "0.05 is under 0.6 of 0.1")
        XCTAssertFalse(pack.manifest.images[1].reaches(0.5), "0.02 is under 0.5 of 0.2")
        XCTAssertTrue(pack.manifest.images[1].reaches(0.09))
        func sampler(_ share: Float?) throws -> PackSampler {
            try PackSampler(
                packs: [pack], batchSize: 2, augmentation: Augmentation(cropSize: 4), normalization: .imagenet,
                seed: 1, minimumAchievedShare: share)
        }
        let kept = try sampler(0.5)
        XCTAssertEqual(kept.images.map(\.record.index), [0])
        XCTAssertEqual(kept.offered, 2)
        XCTAssertEqual(try kept.batch(0).shape, [2, 3, 4, 4], "the batch draws its two slots from the one image")
        XCTAssertEqual(try sampler(nil).images.map(\.record.index), [0, 1])
        XCTAssertThrowsError(try sampler(0.9)) { e in
            XCTAssertTrue(
                "\(e)".hasPrefix(url.path) && "\(e)".contains("none of the 2 images shows its classes on 0.9"), "\(e)")
        }
        var options = try DistillationOptions.preset("hrhf")
        for bad: Float in [0, -0.5, 1.5, .nan] {
            options.fakeMinimumAchievedShare = bad
            XCTAssertThrowsError(try options.validate()) { e in
                XCTAssertTrue("\(e)".contains("fake min achieved"), "\(e)")
            }
        }
        options.fakeMinimumAchievedShare = 1
        XCTAssertNoThrow(try options.validate())
    }

    func testCommandsRefuseLyingPacksAndPlantedLinks() throws {
        let dir = temporaryDirectory()
        let good = try Self.write(try Self.entries())
        let sheet = dir.appendingPathComponent("sheet.png")
        let ok = try runTool("hrhf-pack", ["sheet", good.path, "--out", sheet.path])
        XCTAssertEqual(ok.status, 0, ok.stderr)
        XCTAssertEqual(try ImageIO.readRGB(sheet).width, 44)
        try FileManager.default.removeItem(at: sheet)

        // Checksums rebuilt around a lie: inspect, verify and sheet all refuse it.
        let lying = try Self.pack { $0.images[0].targets = [100_000_000, 3] }
        for command in [["inspect", lying.path], ["verify", lying.path], ["sheet", lying.path, "--out", sheet.path]] {
            assertFailed(
                try runTool("hrhf-pack", command),
                naming: [lying.path, "manifest.json", "images[0].targets[0]"], out: sheet)
        }
        var entries = try Self.entries()
        entries[2].data = try Self.labelPNG(width: 64, height: 64)
        let oversized = try Self.write(entries)
        assertFailed(
            try runTool("hrhf-pack", ["sheet", oversized.path, "--out", sheet.path]),
            naming: [oversized.path, "labels/000000.png", "IHDR gives 64x64"], out: sheet)
        entries = try Self.entries()
        entries[4].data = try Self.labelPNG(value: 200)
        let badLabel = try Self.write(entries)
        let verified = try runTool("hrhf-pack", ["verify", badLabel.path])
        assertFailed(verified, naming: [badLabel.path, "labels/000001.png", "value 200"])
        XCTAssertFalse(verified.stdout.contains("OK"))
        for (columns, limit) in [("0", "16"), ("4", "-3")] {
            let arguments = ["sheet", good.path, "--out", sheet.path, "--columns=\(columns)", "--limit=\(limit)"]
            assertFailed(
                try runTool("hrhf-pack", arguments),
                naming: [good.path, "at least one column and one image"], out: sheet)
        }

        // A link planted at OUT.partial is refused and its target left as it was.
        let target = dir.appendingPathComponent("precious.txt")
        try Data("keep".utf8).write(to: target)
        func plant(_ out: URL) throws {
            try FileManager.default.createSymbolicLink(atPath: out.path + ".partial", withDestinationPath: target.path)
        }
        try plant(sheet)
        assertFailed(
            try runTool("hrhf-pack", ["sheet", good.path, "--out", sheet.path]),
            naming: [sheet.path + ".partial", "not a regular file"])
        XCTAssertFalse(FileManager.default.fileExists(atPath: sheet.path))
        XCTAssertEqual(try Data(contentsOf: target), Data("keep".utf8))

        var first = Self.manifest(), second = Self.manifest()
        first.shard = .init(index: 1, count: 2)
        first.images = [first.images[0]]
        second.shard = .init(index: 2, count: 2)
        second.images = [second.images[1]]
        let parts = [try Self.write(try Self.entries(first)), try Self.write(try Self.entries(second))].map(\.path)
        let merged = dir.appendingPathComponent("merged.tar")
        try plant(merged)
        assertFailed(
            try runTool("hrhf-pack", ["merge"] + parts + ["--out", merged.path]),
            naming: [merged.path + ".partial", "not a regular file"])
        XCTAssertFalse(FileManager.default.fileExists(atPath: merged.path))
        XCTAssertEqual(try Data(contentsOf: target), Data("keep".utf8))
        try FileManager.default.removeItem(atPath: merged.path + ".partial")
        let joined = try runTool("hrhf-pack", ["merge"] + parts + ["--out", merged.path])
        XCTAssertEqual(joined.status, 0, joined.stderr)
        XCTAssertEqual(try SyntheticPack(url: merged).manifest.images, Self.manifest().images)
    }

    /// A 1-bit grey PNG whose IHDR says 32768 x 32768 (3.2 GB once decoded to RGB): 57 bytes.
    static func hugeOneBitPNG(side: Int = 32768, bitDepth: UInt8 = 1) -> Data {
        func chunk(_ type: String, _ body: [UInt8]) -> [UInt8] {
            let typed = Array(type.utf8) + body
            return bigEndian(body.count) + typed + bigEndian(Int(crc32(typed)))
        }
        let ihdr = bigEndian(side) + bigEndian(side) + [bitDepth, 0, 0, 0, 0]
        // A zlib stream of an empty stored block: enough for the header to be read.
        let idat: [UInt8] = [0x78, 0x01, 0x01, 0x00, 0x00, 0xFF, 0xFF, 0x00, 0x00, 0x00, 0x01]
        return Data(
            [0x89, 0x50, 0x4E, 0x47, 0x0D, 0x0A, 0x1A, 0x0A] + chunk("IHDR", ihdr) + chunk("IDAT", idat)
                + chunk("IEND", []))
    }

    static func bigEndian(_ v: Int) -> [UInt8] { (0..<4).map { UInt8(truncatingIfNeeded: v >> (24 - 8 * $0)) } }

    static let crcTable: [UInt32] = (0..<256).map { (n: UInt32) in
        (0..<8).reduce(n) { c, _ in c & 1 != 0 ? (c >> 1) ^ 0xEDB8_8320 : c >> 1 }
    }

    /// PNG's CRC-32 of a chunk's type and data.
    static func crc32(_ bytes: [UInt8]) -> UInt32 {
        ~bytes.reduce(0xFFFF_FFFF) { crc, b in crcTable[Int((crc ^ UInt32(b)) & 0xFF)] ^ (crc >> 8) }
    }
}
