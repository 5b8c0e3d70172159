import ArgumentParser
import Foundation
import HRHF
import HRHFCommandLine

struct PackCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "hrhf-pack",
        abstract: "Inspect, verify, merge, export, import and look at synthetic packs.",
        subcommands: [Inspect.self, Verify.self, Merge.self, Sheet.self, Export.self, Import.self])
}

struct Inspect: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Generator options, teacher, class and area histograms, confidence.")
    @Argument(help: "The pack.") var pack: String

    func run() throws {
        let p = try SyntheticPack(url: URL(fileURLWithPath: pack))
        let m = p.manifest
        print(qualitySummary(m, out: pack, imagesPerMinute: nil, seconds: nil))
        print("")
        print(
            formatTable(
                header: ["generator", ""],
                rows: [
                    ["name", "\(m.generator.name) \(m.generator.version)"], ["seed", "\(m.generator.seed)"],
                    ["teacher", "\(m.teacher.file) (\(m.teacher.card.architecture.name))"],
                    ["teacher SHA-256", m.teacher.sha256],
                ] + optionRows(m.generator.options), leftAligned: true))
        print("")
        let names = m.teacher.card.classNames
        let rows = m.classes.map { c -> [String] in
            let with = m.images.filter { $0.targets.contains(c.id) }
            let areas = with.compactMap { r in r.targets.firstIndex(of: c.id).map { r.achievedAreas[$0] } }
            return [
                String(c.id), c.id < names.count ? names[c.id] : "?", String(with.count),
                areas.isEmpty ? "-" : String(format: "%.1f%%", 100 * areas.reduce(0, +) / Double(areas.count)),
            ]
        }
        print(formatTable(header: ["id", "class", "images", "mean achieved area"], rows: rows))
        print("")
        var histogram = [Int](repeating: 0, count: 10)
        for a in m.images.flatMap(\.achievedAreas) { histogram[min(9, Int(a * 10))] += 1 }
        print(
            formatTable(
                header: ["achieved area", "objects"],
                rows: histogram.enumerated().map {
                    ["\($0.offset * 10)-\($0.offset * 10 + 10)%", String($0.element)]
                }))
    }

    func optionRows(_ o: InversionOptions) -> [[String]] {
        let data = (try? JSONEncoder().encode(o)) ?? Data()
        let dict = (try? JSONSerialization.jsonObject(with: data)) as? [String: Any] ?? [:]
        return dict.keys.sorted().map { ["option \($0)", "\(dict[$0]!)"] }
    }
}

struct Verify: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Check entries, checksums, the manifest against its teacher, every image and label; "
            + "optionally the teacher and how far its argmax agrees with the labels.")
    @Argument(help: "The pack.") var pack: String
    @Option(
        help: ArgumentHelp(
            "The teacher model: its SHA-256 and classes must be the ones the pack records, and "
                + "its argmax on each image must agree with the label.")) var model: String?
    @Option(
        help: ArgumentHelp(
            "With --model: the least share of each label's pixels (not 255) on which it must "
                + "equal the teacher's argmax.")) var minAgreement = SyntheticPack.defaultLabelAgreement

    func run() throws {
        let p = try SyntheticPack(url: URL(fileURLWithPath: pack))
        try p.verifyImages()
        var agreement = ""
        if let model {
            let url = URL(fileURLWithPath: model)
            let sha = try sha256Hex(file: url)
            guard sha == p.manifest.teacher.sha256 else {
                throw PackError(
                    file: pack, entry: "manifest.json",
                    "teacher SHA-256 \(p.manifest.teacher.sha256) is not that of \(model) (\(sha))")
            }
            let (network, card) = try ModelFile.load(url)
            guard card.classes == p.manifest.teacher.card.classes else {
                throw PackError(
                    file: pack, entry: "manifest.json",
                    "field teacher.card.classes: not the classes of \(model)")
            }
            let shares = try p.checkLabels(Predictor(model: network, card: card), minimum: minAgreement)
            for (record, share) in zip(p.manifest.images.sorted { $0.index < $1.index }, shares) {
                print(String(format: "%@: %.2f%% of pixels agree with the teacher", record.label, 100 * share))
            }
            agreement = String(format: ", labels agree with the teacher (lowest %.2f%%)", 100 * (shares.min() ?? 1))
        }
        print(
            "\(pack): OK, \(p.manifest.images.count) images, \(p.files.count) entries, checksums match, "
                + "images and labels decode" + (model != nil ? ", teacher matches" : "") + agreement)
    }
}

struct Export: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Write the pack as a PASCAL VOC folder that MiB's and PLOP's loaders read (PNG images: this "
            + "toolkit encodes no JPEG).")
    @Argument(help: "The pack.") var pack: String
    @Option(help: "The folder to write (new, empty, or an earlier export of the same pack).") var voc: String

    func run() throws {
        let p = try SyntheticPack(url: URL(fileURLWithPath: pack))
        let ids = try VOCExport.write(p, to: URL(fileURLWithPath: voc))
        print(
            "exported \(ids.count) images of \(pack) to \(voc): JPEGImages/ (PNG), SegmentationClass/, "
                + "SegmentationClassAug/, ImageSets/Segmentation/train.txt, splits/ (MiB's lists), list/ (PLOP's)")
    }
}

struct Import: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Make a pack from a folder of images and labels (images/ + labels/, or JPEGImages/ + "
            + "SegmentationClass/), the teacher recorded for provenance.")
    @Argument(help: "The folder.") var folder: String
    @Option(help: "The teacher model the labels are said to come from.") var model: String
    @Option(help: "The pack to write.") var out: String
    @Option(parsing: .upToNextOption, help: "The pack's classes (teacher class ids); default: those the labels show.")
    var classes: [Int] = []

    func run() throws {
        let manifest = try PackImport.run(
            folder: URL(fileURLWithPath: folder), teacher: URL(fileURLWithPath: model),
            classes: classes.isEmpty ? nil : classes, to: URL(fileURLWithPath: out))
        print(
            "imported \(manifest.images.count) images of \(manifest.generator.options.resolution) pixels into "
                + "\(out), classes \(manifest.classes.map { String($0.id) }.joined(separator: " "))")
    }
}

struct Merge: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Join shard parts into the pack a single run gives.")
    @Argument(help: "The parts.") var parts: [String]
    @Option(help: "The merged pack.") var out: String

    func run() throws {
        let packs = try parts.map { try SyntheticPack(url: URL(fileURLWithPath: $0)) }
        let m = try SyntheticPack.merge(packs, to: URL(fileURLWithPath: out))
        print("merged \(parts.count) parts into \(out): \(m.images.count) images")
    }
}

struct Sheet: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "A contact-sheet PNG: images beside their pseudo-label overlays, captioned.")
    @Argument(help: "The pack.") var pack: String
    @Option(help: "The PNG to write.") var out: String
    @Option(help: "Images on the sheet.") var limit: Int = 16
    @Option(help: "Images per row.") var columns: Int = 4

    func run() throws {
        let p = try SyntheticPack(url: URL(fileURLWithPath: pack))
        try ImageIO.writePNG(try contactSheet(p, columns: columns, limit: limit), to: URL(fileURLWithPath: out))
        print("contact sheet: \(out)")
    }
}

PackCommand.main()
