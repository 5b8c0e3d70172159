import Foundation

/// Everything needed to rebuild a DeepLabV3 network: kept in every model card, so a weight
/// file is self-describing.
public struct ArchitectureDescription: Codable, Equatable, Sendable {
    /// Whose module names the network uses (and so whose checkpoints load as a renaming).
    public enum Flavor: String, Codable, Sendable, CaseIterable {
        /// torchvision's `deeplabv3_resnet50/101`: `backbone.layerN.i`, `classifier.0.convs...`.
        case torchvision
        /// MiB's and PLOP's: `body.modN.blockI.convs`, `head.map_convs`, `cls.K`, inplace-ABN.
        case mib
    }

    public enum Block: String, Codable, Sendable {
        case bottleneck, basic
    }

    public var name: String
    public var flavor: Flavor
    public var block: Block
    /// Residual blocks per stage: [3, 4, 23, 3] for ResNet-101.
    public var layers: [Int]
    /// Planes of the first stage (64 in the standard ResNets; each later stage doubles it).
    public var baseWidth: Int
    public var outputStride: Int
    public var asppRates: [Int]
    /// Channels of the ASPP branches and of the head's output (256 in both codebases).
    public var headChannels: Int
    /// torchvision's FCN auxiliary head on the third stage.
    public var auxHead: Bool
    /// Classifier outputs added at each incremental step, background included in the first.
    /// MiB keeps one classifier convolution per step (`cls.0`, `cls.1`, ...); torchvision one.
    public var classesPerStep: [Int]

    public init(
        name: String, flavor: Flavor, block: Block, layers: [Int], baseWidth: Int = 64, outputStride: Int,
        asppRates: [Int]? = nil, headChannels: Int = 256, auxHead: Bool = false, classesPerStep: [Int]
    ) {
        self.name = name
        self.flavor = flavor
        self.block = block
        self.layers = layers
        self.baseWidth = baseWidth
        self.outputStride = outputStride
        // torchvision uses (12, 24, 36) at output stride 8, MiB (12, 24, 32); both (6, 12, 18) at 16.
        self.asppRates =
            asppRates ?? (outputStride == 16 ? [6, 12, 18] : flavor == .mib ? [12, 24, 32] : [12, 24, 36])
        self.headChannels = headChannels
        self.auxHead = auxHead
        self.classesPerStep = classesPerStep
    }

    public var numClasses: Int { classesPerStep.reduce(0, +) }
    var expansion: Int { block == .bottleneck ? 4 : 1 }
    /// Channels of the last backbone stage (the head's input): 2048 for ResNet-50/101.
    public var backboneChannels: Int { baseWidth * 8 * expansion }
    var stage3Channels: Int { baseWidth * 4 * expansion }

    /// Bounds checked before any layer is built. They admit every preset and the real models
    /// of the field (ResNet-200's stages have at most 36 blocks, widths 64 and 256, rates at most
    /// 36, ADE20K's 150 classes in up to 51 steps for its 100-1 task) with room to spare.
    public static let maxBlocksPerStage = 64
    public static let maxBaseWidth = 128
    public static let maxHeadChannels = 1024
    public static let maxAtrousRate = 64
    public static let maxSteps = 256
    public static let maxClasses = 1024
    /// Convolution weights the description may ask for: 128 Mi (512 MiB as float32); a
    /// ResNet-152 DeepLabV3 with its auxiliary head has 77 M parameters.
    public static let maxConvolutionWeights = 1 << 27

    /// Checks the description can be built within the bounds above; the error names `file`
    /// (or the architecture) and the field.
    public func validate(file: String? = nil) throws {
        func fail(_ field: String, _ why: String) -> WeightFileError {
            WeightFileError(file: file ?? "architecture \(name)", key: "architecture.\(field)", why)
        }
        guard layers.count == 4, layers.allSatisfy({ (1...Self.maxBlocksPerStage).contains($0) }) else {
            throw fail("layers", "\(layers) must be four block counts in 1...\(Self.maxBlocksPerStage)")
        }
        guard outputStride == 8 || outputStride == 16 else {
            throw fail("outputStride", "\(outputStride) is not 8 or 16")
        }
        guard asppRates.count == 3, asppRates.allSatisfy({ (1...Self.maxAtrousRate).contains($0) }) else {
            throw fail("asppRates", "\(asppRates) must be three rates in 1...\(Self.maxAtrousRate)")
        }
        guard (1...Self.maxBaseWidth).contains(baseWidth) else {
            throw fail("baseWidth", "\(baseWidth) is not in 1...\(Self.maxBaseWidth)")
        }
        guard (1...Self.maxHeadChannels).contains(headChannels) else {
            throw fail("headChannels", "\(headChannels) is not in 1...\(Self.maxHeadChannels)")
        }
        guard (1...Self.maxSteps).contains(classesPerStep.count) else {
            throw fail("classesPerStep", "\(classesPerStep.count) steps, not 1...\(Self.maxSteps)")
        }
        var classes = 0
        for n in classesPerStep {
            let (sum, overflow) = classes.addingReportingOverflow(n)
            guard n >= 1, !overflow, sum <= Self.maxClasses else {
                throw fail("classesPerStep", "each step adds at least one class, \(Self.maxClasses) in all at most")
            }
            classes = sum
        }
        guard !(flavor == .mib && auxHead) else { throw fail("auxHead", "MiB models have no auxiliary head") }
        let weights = convolutionWeights
        guard weights <= Self.maxConvolutionWeights else {
            throw fail(
                "layers",
                "the network would have \(weights) convolution weights, more than "
                    + "\(Self.maxConvolutionWeights)")
        }
    }

    /// Weights of the network's convolutions (biases and norms add under 1%). The bounds
    /// checked first keep every term far from overflow (at most 2^44 in all).
    var convolutionWeights: Int {
        var total = 3 * baseWidth * 49
        var inChannels = baseWidth
        for (stage, blocks) in layers.enumerated() {
            let planes = baseWidth << stage, out = planes * expansion
            let first =
                block == .bottleneck
                ? inChannels * planes + planes * planes * 9 + planes * out
                : inChannels * planes * 9 + planes * planes * 9
            let later = block == .bottleneck ? out * planes + planes * planes * 9 + planes * out : out * out * 18
            total += first + inChannels * out + (blocks - 1) * later
            inChannels = out
        }
        let head =
            backboneChannels * headChannels * (2 + 3 * 9) + 5 * headChannels * headChannels
            + headChannels * headChannels * 9 + headChannels * numClasses
        let aux = auxHead ? stage3Channels * (stage3Channels / 4) * 9 + (stage3Channels / 4) * numClasses : 0
        return total + head + aux
    }

    /// The presets `hrhf-convert --arch` knows. `classesPerStep` is replaced by `--classes`.
    public static let presets: [ArchitectureDescription] = [
        .init(
            name: "deeplabv3-resnet50", flavor: .torchvision, block: .bottleneck, layers: [3, 4, 6, 3],
            outputStride: 8, classesPerStep: [21]),
        .init(
            name: "deeplabv3-resnet101", flavor: .torchvision, block: .bottleneck, layers: [3, 4, 23, 3],
            outputStride: 8, classesPerStep: [21]),
        .init(
            name: "deeplabv3-resnet50-os16", flavor: .torchvision, block: .bottleneck, layers: [3, 4, 6, 3],
            outputStride: 16, classesPerStep: [21]),
        .init(
            name: "deeplabv3-resnet101-os16", flavor: .torchvision, block: .bottleneck, layers: [3, 4, 23, 3],
            outputStride: 16, classesPerStep: [21]),
        .init(
            name: "deeplabv3-resnet101-mib", flavor: .mib, block: .bottleneck, layers: [3, 4, 23, 3],
            outputStride: 16, classesPerStep: [16]),
        .init(
            name: "deeplabv3-resnet101-mib-os8", flavor: .mib, block: .bottleneck, layers: [3, 4, 23, 3],
            outputStride: 8, classesPerStep: [16]),
        // The small CPU variant: basic blocks, a quarter of the width, the same head.
        .init(
            name: "deeplabv3-small", flavor: .torchvision, block: .basic, layers: [1, 1, 1, 1], baseWidth: 16,
            outputStride: 8, headChannels: 64, classesPerStep: [16]),
        .init(
            name: "deeplabv3-resnet18-small", flavor: .torchvision, block: .basic, layers: [2, 2, 2, 2],
            baseWidth: 32, outputStride: 8, headChannels: 128, classesPerStep: [16]),
    ]

    public static func preset(_ name: String) -> ArchitectureDescription? {
        presets.first { $0.name == name }
    }

    /// A preset by name, or a description read from a JSON file.
    public static func resolve(_ nameOrPath: String) throws -> ArchitectureDescription {
        if let p = preset(nameOrPath) { return p }
        guard nameOrPath.hasSuffix(".json") else {
            throw WeightFileError(file: nameOrPath, "unknown architecture; --list-archs shows the known ones")
        }
        let url = URL(fileURLWithPath: nameOrPath)
        var json = Data()
        do {
            json = try Data(contentsOf: url)
            let arch = try JSONDecoder().decode(ArchitectureDescription.self, from: json)
            try arch.validate(file: nameOrPath)
            return arch
        } catch let e as WeightFileError {
            throw e
        } catch {
            throw decodingFailure(error, json: json, file: nameOrPath, what: "architecture description")
        }
    }
}
