import Foundation
import HRHF

/// The presets and class lists `hrhf-convert --list-archs` prints.
public func architectureListing() -> String {
    let rows = ArchitectureDescription.presets.map { a in
        [
            a.name, a.flavor.rawValue, "\(a.block.rawValue) \(a.layers.map(String.init).joined(separator: "-"))",
            "\(a.baseWidth)", "\(a.outputStride)", a.asppRates.map(String.init).joined(separator: "/"),
            "\(a.headChannels)",
        ]
    }
    let table = formatTable(
        header: ["architecture", "flavor", "blocks", "width", "stride", "ASPP rates", "head"], rows: rows)
    let lists = DatasetClasses.named.keys.sorted().map { "  \($0): \(DatasetClasses.named[$0]!.count) classes" }
    return table + "\n\nclass lists (--classes):\n" + lists.joined(separator: "\n")
        + "\n\nCards for each are in zoo/archs and zoo/classes; --arch also takes such a JSON file."
}

public func conversionSummary(_ r: ConversionReport, card: ModelCard, out: String, seconds: Double) -> String {
    var rows: [[String]] = [
        [
            "source format",
            r.format + (r.wrapper.map { " (inside \"\($0)\")" } ?? "")
                + (r.strippedModulePrefix ? ", module. prefix removed" : ""),
        ],
        ["flavor", r.flavor.rawValue],
        ["architecture", "\(card.architecture.name), output stride \(card.architecture.outputStride)"],
        ["tensors read", "\(r.tensors)"],
        ["parameters", "\(r.parameters)"],
        [
            "classes",
            "\(card.classes.count): " + card.classNames.prefix(6).joined(separator: ", ")
                + (card.classes.count > 6 ? ", ..." : ""),
        ],
        ["steps", card.architecture.classesPerStep.map(String.init).joined(separator: ",")],
        ["source SHA-256", r.sha256],
        ["written", out],
        ["time", String(format: "%.2f s", seconds)],
    ]
    if !r.missingAllowed.isEmpty { rows.append(["missing (allowed)", r.missingAllowed.joined(separator: ", ")]) }
    if !r.unexpectedIgnored.isEmpty { rows.append(["dropped (allowed)", r.unexpectedIgnored.joined(separator: ", ")]) }
    if !r.ignoredEntries.isEmpty { rows.append(["other entries", r.ignoredEntries.joined(separator: ", ")]) }
    return formatTable(header: ["conversion", ""], rows: rows, leftAligned: true)
}
