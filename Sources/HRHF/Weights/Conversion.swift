import Foundation

/// What `hrhf-convert` is asked to do.
public struct ConversionOptions {
    public var architecture: ArchitectureDescription
    /// nil: detect from the keys.
    public var flavor: ArchitectureDescription.Flavor?
    public var outputStride: Int?
    /// Dataset class names (index = id); the model's outputs take the first ones.
    public var classNames: [String]
    public var stepClasses: [Int]?
    public var allowMissing: [String]
    public var allowUnexpected: [String]

    public init(
        architecture: ArchitectureDescription, flavor: ArchitectureDescription.Flavor? = nil,
        outputStride: Int? = nil, classNames: [String], stepClasses: [Int]? = nil,
        allowMissing: [String] = [], allowUnexpected: [String] = []
    ) {
        self.architecture = architecture
        self.flavor = flavor
        self.outputStride = outputStride
        self.classNames = classNames
        self.stepClasses = stepClasses
        self.allowMissing = allowMissing
        self.allowUnexpected = allowUnexpected
    }
}

public struct ConversionReport {
    public var format: String
    public var wrapper: String?
    public var strippedModulePrefix: Bool
    public var flavor: ArchitectureDescription.Flavor
    public var tensors: Int
    public var parameters: Int
    public var missingAllowed: [String]
    public var unexpectedIgnored: [String]
    public var ignoredEntries: [String]
    public var sha256: String
}

public enum Converter {
    /// Reads a checkpoint, maps it onto the described network and returns the model with its
    /// card. Every key and shape is checked; nothing is written.
    public static func convert(_ input: URL, _ options: ConversionOptions) throws
        -> (model: DeepLabV3, card: ModelCard, report: ConversionReport)
    {
        let path = input.path
        let sha = try sha256Hex(file: input)
        let loaded = try TorchCheckpoint.read(input)
        guard !loaded.tensors.isEmpty else { throw WeightFileError(file: path, "no tensors found") }
        let values = loaded.dictionary
        let detected = try detectFlavor(Array(values.keys), file: path)
        if let wanted = options.flavor, wanted != detected {
            throw WeightFileError(
                file: path, "keys are of the \(detected.rawValue) flavour, --flavor says \(wanted.rawValue)")
        }
        var arch = options.architecture
        if arch.flavor != detected {
            // The layers come from the preset; MiB's default output stride is 16.
            arch = ArchitectureDescription(
                name: arch.name, flavor: detected, block: arch.block, layers: arch.layers,
                baseWidth: arch.baseWidth, outputStride: options.outputStride ?? (detected == .mib ? 16 : 8),
                headChannels: arch.headChannels, classesPerStep: arch.classesPerStep)
        } else if let os = options.outputStride, os != arch.outputStride {
            arch = ArchitectureDescription(
                name: arch.name, flavor: arch.flavor, block: arch.block, layers: arch.layers,
                baseWidth: arch.baseWidth, outputStride: os, headChannels: arch.headChannels,
                classesPerStep: arch.classesPerStep)
        }
        let unexpectedAllowed = { (key: String) in options.allowUnexpected.contains { globMatch($0, key) } }
        // Classifier outputs per step, from the checkpoint's shapes.
        var found: [Int] = []
        switch detected {
        case .torchvision:
            guard let w = values["classifier.4.weight"], w.rank == 4 else {
                throw WeightFileError(file: path, key: "classifier.4.weight", "missing or not a convolution weight")
            }
            found = [w.shape[0]]
            arch.auxHead =
                values.keys.contains { $0.hasPrefix("aux_classifier.") }
                && !unexpectedAllowed("aux_classifier.0.weight")
        case .mib:
            var k = 0
            while let w = values["cls.\(k).weight"] {
                guard w.rank == 4 else {
                    throw WeightFileError(file: path, key: "cls.\(k).weight", "not a convolution weight")
                }
                found.append(w.shape[0])
                k += 1
            }
            guard !found.isEmpty else { throw WeightFileError(file: path, key: "cls.0.weight", "missing") }
        }
        arch.classesPerStep = options.stepClasses ?? found
        // Bounds (and a sum that cannot overflow) before the steps are compared or anything is built.
        try arch.validate(file: path)
        if options.stepClasses != nil {
            if detected == .mib && arch.classesPerStep != found {
                throw WeightFileError(
                    file: path, key: "cls.*.weight",
                    "classifiers have \(found) outputs per step, "
                        + "--step-classes says \(arch.classesPerStep)")
            }
            if detected == .torchvision && arch.numClasses != found[0] {
                throw WeightFileError(
                    file: path, key: "classifier.4.weight",
                    "has \(found[0]) outputs, --step-classes adds up to \(arch.numClasses)")
            }
        }
        guard options.classNames.count >= arch.numClasses else {
            throw WeightFileError(
                file: path,
                "the model has \(arch.numClasses) outputs but only \(options.classNames.count) class names were given")
        }
        let model = try DeepLabV3(arch)
        let ownKeys = Set(model.stateDict().map(\.name))
        let missingAllowed = { (key: String) in
            key.hasSuffix("num_batches_tracked") || options.allowMissing.contains { globMatch($0, key) }
        }
        try model.loadStateDict(values, source: path, allowMissing: missingAllowed, allowUnexpected: unexpectedAllowed)
        let card = ModelCard(
            architecture: arch, classNames: Array(options.classNames.prefix(arch.numClasses)),
            source: SourceInfo(
                file: input.lastPathComponent, sha256: sha, format: loaded.format,
                flavor: detected.rawValue))
        let report = ConversionReport(
            format: loaded.format, wrapper: loaded.wrapper, strippedModulePrefix: loaded.strippedModulePrefix,
            flavor: detected, tensors: loaded.tensors.count, parameters: model.parameterCount,
            missingAllowed: ownKeys.filter { values[$0] == nil }.sorted(),
            unexpectedIgnored: values.keys.filter { !ownKeys.contains($0) }.sorted(),
            ignoredEntries: loaded.ignoredEntries, sha256: sha)
        return (model, card, report)
    }

    static func detectFlavor(_ keys: [String], file: String) throws -> ArchitectureDescription.Flavor {
        if keys.contains(where: { $0.hasPrefix("backbone.") }) { return .torchvision }
        if keys.contains(where: { $0.hasPrefix("body.") }) { return .mib }
        let sample = keys.sorted().prefix(3).joined(separator: ", ")
        throw WeightFileError(
            file: file,
            "cannot tell the flavour: no backbone.* (torchvision) or body.* (MiB) keys; keys start with \(sample)")
    }
}
