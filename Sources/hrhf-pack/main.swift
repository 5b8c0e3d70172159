import ArgumentParser
import Foundation
import HRHF
import HRHFCommandLine

struct PackCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "hrhf-pack",
        abstract: "Inspect, verify, merge and look at synthetic packs.",
        subcommands: [Inspect.self, Verify.self, Merge.self, Sheet.self])
}

struct Inspect: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Generator options, teacher, class and area histograms, confidence.")
    @Argument(help: "The pack.") var pack: String

    func run() throws {
        let p = try SyntheticPack(url: URL(fileURLWithPath: pack))
        let m = p.manifest
        print(qualitySummary(m, out: pack, imagesPerMinute: nil, seconds: nil))
        print("")
        print(formatTable(header: ["generator", ""], rows: [
            ["name", "\(m.generator.name) \(m.generator.version)"], ["seed", "\(m.generator.seed)"],
            ["teacher", "\(m.teacher.file) (\(m.teacher.card.architecture.name))"], ["teacher SHA-256", m.teacher.sha256],
        ] + optionRows(m.generator.options), leftAligned: true))
        print("")
        let names = m.teacher.card.classNames
        let rows = m.classes.map { c -> [String] in
            let with = m.images.filter { $0.targets.contains(c.id) }
            let areas = with.compactMap { r in r.targets.firstIndex(of: c.id).map { r.achievedAreas[$0] } }
            return [String(c.id), c.id < names.count ? names[c.id] : "?", String(with.count),
                    areas.isEmpty ? "-" : String(format: "%.1f%%", 100 * areas.reduce(0, +) / Double(areas.count))]
        }
        print(formatTable(header: ["id", "class", "images", "mean achieved area"], rows: rows))
        print("")
        var histogram = [Int](repeating: 0, count: 10)
        for a in m.images.flatMap(\.achievedAreas) { histogram[min(9, Int(a * 10))] += 1 }
        print(formatTable(header: ["achieved area", "objects"], rows: histogram.enumerated().map {
            ["\($0.offset * 10)-\($0.offset * 10 + 10)%", String($0.element)] }))
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
            + "optionally the teacher.")
    @Argument(help: "The pack.") var pack: String
    @Option(help: "The teacher model: its SHA-256 and classes must be the ones the pack records.") var model: String?

    func run() throws {
        let p = try SyntheticPack(url: URL(fileURLWithPath: pack))
        try p.verifyImages()
        if let model {
            let url = URL(fileURLWithPath: model)
            let sha = try sha256Hex(file: url)
            guard sha == p.manifest.teacher.sha256 else {
                throw PackError(file: pack, entry: "manifest.json",
                                "teacher SHA-256 \(p.manifest.teacher.sha256) is not that of \(model) (\(sha))")
            }
            let card = try ModelFile.readCard(try SafeTensorsFile.read(url), path: model)
            guard card.classes == p.manifest.teacher.card.classes else {
                throw PackError(file: pack, entry: "manifest.json",
                                "field teacher.card.classes: not the classes of \(model)")
            }
        }
        print("\(pack): OK, \(p.manifest.images.count) images, \(p.files.count) entries, checksums match, "
              + "images and labels decode" + (model != nil ? ", teacher matches" : ""))
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
    static let configuration = CommandConfiguration(abstract: "A contact-sheet PNG: images beside their pseudo-label overlays, captioned.")
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
