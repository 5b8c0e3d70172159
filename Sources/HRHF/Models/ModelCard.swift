import Foundation

/// One output class of a model: logits channel k is class `id` k.
public struct ClassInfo: Codable, Equatable, Sendable {
    public var id: Int
    public var name: String

    public init(id: Int, name: String) {
        self.id = id
        self.name = name
    }
}

/// Which classes one incremental step added (step 0: background and the base classes).
public struct IncrementalStep: Codable, Equatable, Sendable {
    public var step: Int
    public var classes: [Int]
    public var note: String?

    public init(step: Int, classes: [Int], note: String? = nil) {
        self.step = step
        self.classes = classes
        self.note = note
    }
}

/// Where converted weights came from.
public struct SourceInfo: Codable, Equatable, Sendable {
    public var file: String
    public var sha256: String
    public var format: String
    public var flavor: String
}

/// The self-description stored in every native weight file's safetensors metadata.
public struct ModelCard: Codable, Equatable, Sendable {
    public static let formatName = "hrhf-model"
    public static let currentVersion = 1

    public var format = ModelCard.formatName
    public var formatVersion = ModelCard.currentVersion
    public var architecture: ArchitectureDescription
    public var classes: [ClassInfo]
    public var history: [IncrementalStep]
    public var normalization: Normalization
    public var source: SourceInfo?
    /// Free-form facts: the training command, its measured figures, the dataset.
    public var notes: [String: String]

    public init(
        architecture: ArchitectureDescription, classNames: [String], normalization: Normalization = .imagenet,
        source: SourceInfo? = nil, notes: [String: String] = [:]
    ) {
        self.architecture = architecture
        classes = classNames.enumerated().map { ClassInfo(id: $0.offset, name: $0.element) }
        var start = 0
        history = architecture.classesPerStep.enumerated().map { step, count in
            defer { start += count }
            return IncrementalStep(step: step, classes: Array(start..<(start + count)))
        }
        self.normalization = normalization
        self.source = source
        self.notes = notes
    }

    /// Checks the card before anything is built from it: the architecture's bounds, one class
    /// per output with ids 0, 1, ..., a history that adds those classes step by step as
    /// `classesPerStep` says, and a finite normalisation. Errors name `file` and the field.
    public func validate(file: String) throws {
        guard format == Self.formatName else { throw WeightFileError(file: file, key: "format", "is \(format)") }
        guard (1...Self.currentVersion).contains(formatVersion) else {
            throw WeightFileError(file: file, key: "formatVersion", "\(formatVersion) is not one this toolkit reads")
        }
        try architecture.validate(file: file)
        guard classes.count == architecture.numClasses else {
            throw WeightFileError(
                file: file, key: "classes",
                "card lists \(classes.count) classes, the architecture "
                    + "has \(architecture.numClasses) outputs")
        }
        if let k = classes.indices.first(where: { classes[$0].id != $0 }) {
            throw WeightFileError(
                file: file, key: "classes[\(k)].id",
                "is \(classes[k].id), channel \(k) must be class \(k)")
        }
        guard history.count == architecture.classesPerStep.count else {
            throw WeightFileError(
                file: file, key: "history",
                "has \(history.count) steps, classesPerStep "
                    + "\(architecture.classesPerStep.count)")
        }
        var start = 0, previousStep = -1
        for (k, (step, count)) in zip(history, architecture.classesPerStep).enumerated() {
            guard step.step > previousStep, step.classes == Array(start..<(start + count)) else {
                throw WeightFileError(
                    file: file, key: "history[\(k)]",
                    "step \(step.step) must follow step "
                        + "\(previousStep) and add classes \(start)..<\(start + count)")
            }
            start += count
            previousStep = step.step
        }
        guard normalization.mean.count == 3, normalization.std.count == 3, normalization.mean.allSatisfy(\.isFinite),
            normalization.std.allSatisfy({ $0.isFinite && $0 > 0 })
        else {
            throw WeightFileError(
                file: file, key: "normalization",
                "needs three finite means and three finite positive deviations")
        }
    }

    public var classNames: [String] { classes.map(\.name) }
}

/// A JSON decoding failure as an error naming the file and the field at fault. `json` tells
/// a number that fits no field (Foundation reports it without a path) from broken JSON.
func decodingFailure(_ error: Error, json: Data, file: String, what: String) -> WeightFileError {
    let context: DecodingError.Context
    switch error as? DecodingError {
    case .typeMismatch(_, let c)?, .valueNotFound(_, let c)?, .dataCorrupted(let c)?: context = c
    case .keyNotFound(let key, let c)?:
        context = DecodingError.Context(codingPath: c.codingPath + [key], debugDescription: "missing")
    default: return WeightFileError(file: file, "\(what) is not valid: \(error)")
    }
    if context.codingPath.isEmpty, (try? JSONSerialization.jsonObject(with: json)) != nil {
        return WeightFileError(
            file: file,
            "\(what) is not valid: a number does not fit its field "
                + "(a fraction, or out of range, where an integer belongs)")
    }
    let field = context.codingPath.reduce("") { path, key in
        key.intValue.map { "\(path)[\($0)]" } ?? (path.isEmpty ? key.stringValue : "\(path).\(key.stringValue)")
    }
    return WeightFileError(
        file: file, key: field.isEmpty ? nil : field,
        "\(what) is not valid: \(context.debugDescription)")
}

/// The native model file: safetensors whose metadata key `hrhf.card` holds the card as JSON.
public enum ModelFile {
    static let cardKey = "hrhf.card"

    public static func save(_ model: DeepLabV3, card: ModelCard, to url: URL) throws {
        try card.validate(file: url.path)
        precondition(card.architecture == model.architecture, "card and model describe different networks")
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        let json = String(decoding: try encoder.encode(card), as: UTF8.self)
        try SafeTensorsFile(tensors: model.stateDict(), metadata: [cardKey: json, "format": "pt"]).write(to: url)
    }

    public static func readCard(_ file: SafeTensorsFile, path: String) throws -> ModelCard {
        guard let json = file.metadata[cardKey] else {
            throw WeightFileError(
                file: path,
                "no model card (metadata key \(cardKey)): not a native HRHF model; convert it with hrhf-convert")
        }
        do {
            let card = try JSONDecoder().decode(ModelCard.self, from: Data(json.utf8))
            try card.validate(file: path)
            return card
        } catch let e as WeightFileError {
            throw e
        } catch {
            throw decodingFailure(error, json: Data(json.utf8), file: path, what: "model card")
        }
    }

    /// Builds the network the card describes and loads every weight, checking names and shapes.
    public static func load(_ url: URL) throws -> (model: DeepLabV3, card: ModelCard) {
        let file = try SafeTensorsFile.read(url)
        let card = try readCard(file, path: url.path)
        let model = try DeepLabV3(card.architecture)
        try model.loadStateDict(
            Dictionary(file.tensors.map { ($0.name, $0.tensor) }, uniquingKeysWith: { a, _ in a }),
            source: url.path)
        model.eval()
        return (model, card)
    }
}
