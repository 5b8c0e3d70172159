import Foundation
import XCTest

@testable import HRHF

/// hrhf-pack export --voc, import and verify --model's label check, on the committed two-image pack
/// and its teacher (16 classes; the pack shows class 6).
final class PackInterchangeTests: XCTestCase {
    static let pack = PackFixtureTests.packs.appendingPathComponent("shapes-32px-2.tar")
    static let teacher = PackFixtureTests.teacher

    /// Runs hrhf-pack and asserts it failed cleanly: status 1, stderr naming `names`, nothing at `out`.
    func assertRefused(
        _ arguments: [String], naming names: [String], out: URL? = nil,
        file: StaticString = #filePath, line: UInt = #line
    ) throws {
        assertFailed(try runTool("hrhf-pack", arguments), naming: names, out: out, file: file, line: line)
    }

    func text(_ url: URL) throws -> String { String(decoding: try Data(contentsOf: url), as: UTF8.self) }

    /// The files MiB's VOCSegmentation opens: `splits/train_aug.txt` lines `/JPEGImages/ID.png
    /// /SegmentationClassAug/ID.png` (each ending in a line feed, since MiB drops every line's last
    /// character), RGB images and VOC-palette labels whose indices are the pack's label values.
    func testExportWritesTheLayoutMiBReads() throws {
        let dir = temporaryDirectory().appendingPathComponent("PascalVOC12")
        let pack = try SyntheticPack(url: Self.pack)
        XCTAssertEqual(try VOCExport.write(pack, to: dir), ["000000", "000001"])
        let files = try FileManager.default.subpathsOfDirectory(atPath: dir.path).sorted()
        XCTAssertEqual(
            files,
            [
                "ImageSets", "ImageSets/Segmentation", "ImageSets/Segmentation/train.txt",
                "JPEGImages", "JPEGImages/000000.png", "JPEGImages/000001.png",
                "SegmentationClass", "SegmentationClass/000000.png", "SegmentationClass/000001.png",
                "SegmentationClassAug", "SegmentationClassAug/000000.png", "SegmentationClassAug/000001.png",
                "VOCdevkit", "VOCdevkit/VOC2012", "hrhf-pack-export.txt", "list", "list/train.txt",
                "list/train_aug.txt",
                "splits", "splits/train.txt", "splits/train_aug.txt",
            ])
        XCTAssertEqual(try text(dir.appendingPathComponent("ImageSets/Segmentation/train.txt")), "000000\n000001\n")
        XCTAssertEqual(
            try text(dir.appendingPathComponent("splits/train_aug.txt")),
            "/JPEGImages/000000.png /SegmentationClassAug/000000.png\n"
                + "/JPEGImages/000001.png /SegmentationClassAug/000001.png\n")
        XCTAssertEqual(
            try text(dir.appendingPathComponent("splits/train.txt")),
            "/JPEGImages/000000.png /SegmentationClass/000000.png\n"
                + "/JPEGImages/000001.png /SegmentationClass/000001.png\n")
        // PLOP joins image paths under VOCdevkit/VOC2012/, label paths under the folder itself.
        XCTAssertEqual(
            try text(dir.appendingPathComponent("list/train_aug.txt")),
            "/../../JPEGImages/000000.png /SegmentationClassAug/000000.png\n"
                + "/../../JPEGImages/000001.png /SegmentationClassAug/000001.png\n")
        let plopImage = dir.appendingPathComponent("VOCdevkit/VOC2012/../../JPEGImages/000001.png")
        XCTAssertEqual(
            try Data(contentsOf: plopImage),
            try Data(contentsOf: dir.appendingPathComponent("JPEGImages/000001.png")))
        XCTAssertEqual(
            try text(dir.appendingPathComponent("list/train.txt")),
            "/../../JPEGImages/000000.png /SegmentationClass/000000.png\n"
                + "/../../JPEGImages/000001.png /SegmentationClass/000001.png\n")
        for (k, record) in pack.manifest.images.enumerated() {
            let id = String(format: "%06d", k)
            let label = try Data(contentsOf: dir.appendingPathComponent("SegmentationClass/\(id).png"))
            XCTAssertEqual(try Data(contentsOf: dir.appendingPathComponent("SegmentationClassAug/\(id).png")), label)
            let header = try PNGHeader(label, name: id)
            XCTAssertEqual([header.colorType, header.bitDepth, header.width], [3, 8, 32])
            XCTAssertTrue(label.range(of: Data("PLTE".utf8) + Data(vocPalette)) != nil, "the VOC palette, 256 colours")
            let values = try ImageIO.decodeIndexPNG(label, name: id)
            XCTAssertEqual(values, try pack.label(record))
            XCTAssertTrue(values.values.contains(6), "the pack's class 6 keeps its id")
            let image = try Data(contentsOf: dir.appendingPathComponent("JPEGImages/\(id).png"))
            XCTAssertEqual(try PNGHeader(image, name: id).colorType, 2)
            XCTAssertEqual(try ImageIO.decodeRGB(image, name: id), try pack.image(record))
        }
        // The same pack again is allowed (and changes nothing); another pack or foreign files are not mixed in.
        let before = try Data(contentsOf: dir.appendingPathComponent("JPEGImages/000001.png"))
        XCTAssertEqual(try runTool("hrhf-pack", ["export", Self.pack.path, "--voc", dir.path]).status, 0)
        XCTAssertEqual(try Data(contentsOf: dir.appendingPathComponent("JPEGImages/000001.png")), before)
        let other = PackFixtureTests.packs.appendingPathComponent("shapes-32px-shard-2of2.tar")
        try assertRefused(
            ["export", other.path, "--voc", dir.path],
            naming: [dir.appendingPathComponent("hrhf-pack-export.txt").path, "names another pack"])
        let foreign = temporaryDirectory()
        try Data("x".utf8).write(to: foreign.appendingPathComponent("2007_000032.jpg"))
        try assertRefused(
            ["export", Self.pack.path, "--voc", foreign.path],
            naming: [foreign.path, "not an export of this pack"])
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: foreign.path), ["2007_000032.jpg"])
        let link = temporaryDirectory().appendingPathComponent("link")
        try FileManager.default.createSymbolicLink(at: link, withDestinationURL: dir)
        try assertRefused(
            ["export", Self.pack.path, "--voc", link.path],
            naming: [link.path, "exists and is not a folder (a link or a file)"])
    }

    /// export then import gives a pack whose images and labels are the original's, and two imports
    /// of one folder give the same bytes.
    func testImportRoundTripsAnExportReproducibly() throws {
        let dir = temporaryDirectory()
        let original = try SyntheticPack(url: Self.pack)
        try VOCExport.write(original, to: dir.appendingPathComponent("voc"))
        let a = dir.appendingPathComponent("a.tar"), b = dir.appendingPathComponent("b.tar")
        let r = try runTool(
            "hrhf-pack",
            [
                "import", dir.appendingPathComponent("voc").path, "--model",
                Self.teacher.path, "--out", a.path,
            ])
        XCTAssertEqual(r.status, 0, r.stderr)
        try PackImport.run(folder: dir.appendingPathComponent("voc"), teacher: Self.teacher, classes: nil, to: b)
        XCTAssertEqual(try sha256Hex(file: a), try sha256Hex(file: b))
        let imported = try SyntheticPack(url: a)
        let m = imported.manifest
        XCTAssertEqual(m.generator.name, "hrhf-pack import")
        XCTAssertEqual(m.generator.options.resolution, 32)
        XCTAssertEqual(m.teacher.sha256, try sha256Hex(file: Self.teacher))
        XCTAssertEqual(m.teacher.card, original.manifest.teacher.card)
        XCTAssertEqual(m.classes, [ClassInfo(id: 6, name: original.manifest.teacher.card.classes[6].name)])
        XCTAssertEqual(m.images.count, 2)
        for (old, new) in zip(original.manifest.images, m.images) {
            XCTAssertEqual(try imported.image(new), try original.image(old))
            XCTAssertEqual(try imported.label(new), try original.label(old))
            XCTAssertEqual(new.targets, [6])
            XCTAssertEqual(new.targetAreas, new.achievedAreas)
            let label = try original.label(old)
            XCTAssertEqual(new.achievedAreas[0], Double(label.values.filter { $0 == 6 }.count) / 1024)
            XCTAssertEqual(new.teacherConfidence, old.teacherConfidence, accuracy: 1e-3)
        }
        // The committed fixture tools/test_hrhf_pack.py reads is what import makes today (the confidences up
        // to the last bits a different thread count may change).
        let committed = try SyntheticPack(url: PackFixtureTests.packs.appendingPathComponent("imported-32px-2.tar"))
        var expected = committed.manifest
        for (k, record) in m.images.enumerated() {
            XCTAssertEqual(expected.images[k].teacherConfidence, record.teacherConfidence, accuracy: 1e-6)
            expected.images[k].teacherConfidence = record.teacherConfidence
        }
        expected.quality = m.quality
        XCTAssertEqual(expected, m)
        for name in m.images.flatMap({ [$0.image, $0.label] }) {
            XCTAssertEqual(committed.files[name], imported.files[name], name)
        }
        // --classes widens the pack's classes; a class not listed in --classes is refused.
        let wide = dir.appendingPathComponent("wide.tar")
        try PackImport.run(folder: dir.appendingPathComponent("voc"), teacher: Self.teacher, classes: [7, 6], to: wide)
        XCTAssertEqual(try SyntheticPack(url: wide).manifest.classes.map(\.id), [6, 7])
        let narrow = dir.appendingPathComponent("narrow.tar")
        try assertRefused(
            [
                "import", dir.appendingPathComponent("voc").path, "--model", Self.teacher.path,
                "--out", narrow.path, "--classes", "7",
            ],
            naming: ["SegmentationClass/000000.png", "shows class 6, which --classes does not list"],
            out: narrow)
    }

    /// A DeepInversion-style folder (images/ + labels/) with one hostile file per case: each refused
    /// with the file and the reason, and no pack or .partial left.
    func testImportRefusesHostileFolders() throws {
        let original = try SyntheticPack(url: Self.pack)
        let record = original.manifest.images[0]
        let image = try original.image(record), label = try original.label(record)
        func folder(_ change: (URL) throws -> Void) throws -> URL {
            let dir = temporaryDirectory()
            for sub in ["images", "labels"] {
                try FileManager.default.createDirectory(
                    at: dir.appendingPathComponent(sub),
                    withIntermediateDirectories: true)
            }
            try ImageIO.writePNG(image, to: dir.appendingPathComponent("images/run_0.png"))
            try ImageIO.writePalettePNG(label, to: dir.appendingPathComponent("labels/run_0.png"))
            try change(dir)
            return dir
        }
        var lying = label
        lying.values[5] = 16
        var empty = label
        empty.values = empty.values.map { $0 == 6 ? 255 : $0 }
        func writeLabel(_ mask: IndexMask, as name: String) -> (URL) throws -> Void {
            { try ImageIO.writePalettePNG(mask, to: $0.appendingPathComponent("labels/\(name)")) }
        }
        func writeImage(_ data: Data) -> (URL) throws -> Void {
            { try data.write(to: $0.appendingPathComponent("images/run_0.png")) }
        }
        let cases: [(String, (URL) throws -> Void, String)] = [
            (
                "labels/.hidden.png", { try Data().write(to: $0.appendingPathComponent("labels/.hidden.png")) },
                "not an allowed label name"
            ),
            (
                "labels/a b.png", { try Data().write(to: $0.appendingPathComponent("labels/a b.png")) },
                "not an allowed label name"
            ),
            ("labels/run_1.png", writeLabel(label, as: "run_1.png"), "no image run_1.png, .jpg or .jpeg"),
            (
                "labels/run_0.png", writeLabel(lying, as: "run_0.png"),
                "value 16 at pixel (5, 0) is neither a teacher class (0 to 15) nor 255"
            ),
            ("labels/run_0.png", writeLabel(empty, as: "run_0.png"), "shows no class but background and ignore"),
            (
                "labels/run_0.png",
                writeLabel(
                    IndexMask(width: 16, height: 16, values: [UInt16](repeating: 6, count: 256)),
                    as: "run_0.png"), "16x16, its image is 32x32"
            ),
            (
                "images/run_0.png", writeImage(try ImageIO.encodePNG(RGBImage(width: 32, height: 16))),
                "32x16: a pack's images are square"
            ),
            ("images/run_0.png", writeImage(Data("not an image".utf8)), "neither a PNG nor a JPEG file"),
            (
                "images/run_0.png",
                { dir in
                    let target = dir.appendingPathComponent("elsewhere.png")
                    try FileManager.default.moveItem(at: dir.appendingPathComponent("images/run_0.png"), to: target)
                    try FileManager.default.createSymbolicLink(
                        at: dir.appendingPathComponent("images/run_0.png"),
                        withDestinationURL: target)
                }, "cannot open"
            ),
            (
                "images/run_0.png",
                { dir in
                    try FileManager.default.removeItem(at: dir.appendingPathComponent("images/run_0.png"))
                    XCTAssertEqual(mkfifo(dir.appendingPathComponent("images/run_0.png").path, 0o644), 0)
                }, "not a regular file"
            ),
            (
                "labels/run_0.png",
                { dir in
                    try FileManager.default.removeItem(at: dir.appendingPathComponent("labels/run_0.png"))
                    try FileManager.default.createDirectory(
                        at: dir.appendingPathComponent("labels/run_0.png"),
                        withIntermediateDirectories: false)
                }, "not a regular file"
            ),
        ]
        for (file, change, reason) in cases {
            let dir = try folder(change)
            let out = dir.appendingPathComponent("out.tar")
            try assertRefused(
                ["import", dir.path, "--model", Self.teacher.path, "--out", out.path],
                naming: [dir.appendingPathComponent(file).path, reason], out: out)
        }
        // Files over the budget are refused from their size, before they are read.
        let big = try folder { _ in }
        XCTAssertThrowsError(
            try PackImport.run(
                folder: big, teacher: Self.teacher, classes: nil,
                to: big.appendingPathComponent("out.tar"), fileLimit: 100)
        ) {
            XCTAssertTrue("\($0)".contains("bytes is over the limit of 100"), "\($0)")
        }
        let none = temporaryDirectory()
        try assertRefused(
            ["import", none.path, "--model", Self.teacher.path, "--out", none.path + "/o.tar"],
            naming: [none.path, "holds neither images/ + labels/ nor JPEGImages/ + SegmentationClass/"])
    }

    /// A pack whose labels lie about the teacher, its checksums rebuilt so every other check passes,
    /// is refused by verify --model, naming the label and the agreement.
    func testVerifyModelRefusesLabelsThatLieAboutTheTeacher() throws {
        let original = try SyntheticPack(url: Self.pack)
        let ok = try runTool("hrhf-pack", ["verify", Self.pack.path, "--model", Self.teacher.path])
        XCTAssertEqual(ok.status, 0, ok.stderr)
        XCTAssertTrue(ok.stdout.contains("labels/000000.png: 100.00% of pixels agree with the teacher"), ok.stdout)
        let tampered = temporaryDirectory().appendingPathComponent("tampered.tar")
        let record = original.manifest.images[0]
        var label = try original.label(record)
        label.values = label.values.map { $0 == 6 ? 7 : $0 }
        let lie = try ImageIO.encodePalettePNG(label)
        try SyntheticPack.write(
            manifest: original.manifest,
            files: { name in
                name == record.label ? lie : original.files[name]!
            }, to: tampered)
        XCTAssertEqual(try runTool("hrhf-pack", ["verify", tampered.path]).status, 0, "consistent but for the teacher")
        let share = Double(label.values.filter { $0 != 7 }.count) / 1024
        try assertRefused(
            ["verify", tampered.path, "--model", Self.teacher.path],
            naming: [
                tampered.path, "labels/000000.png",
                String(
                    format: "agrees with the teacher's argmax on %.2f%% of its pixels, below the minimum of 95.00%%",
                    100 * share),
            ])
        let lenient = try runTool(
            "hrhf-pack",
            [
                "verify", tampered.path, "--model", Self.teacher.path,
                "--min-agreement", "0.1",
            ])
        XCTAssertEqual(lenient.status, 0, lenient.stderr)
    }
}
