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

    public init(name: String, flavor: Flavor, block: Block, layers: [Int], baseWidth: Int = 64, outputStride: Int,
                asppRates: [Int]? = nil, headChannels: Int = 256, auxHead: Bool = false, classesPerStep: [Int]) {
        self.name = name
        self.flavor = flavor
        self.block = block
        self.layers = layers
        self.baseWidth = baseWidth
        self.outputStride = outputStride
        // torchvision uses (12, 24, 36) at output stride 8, MiB (12, 24, 32); both (6, 12, 18) at 16.
        self.asppRates = asppRates ?? (outputStride == 16 ? [6, 12, 18] : flavor == .mib ? [12, 24, 32] : [12, 24, 36])
        self.headChannels = headChannels
        self.auxHead = auxHead
        self.classesPerStep = classesPerStep
    }

    public var numClasses: Int { classesPerStep.reduce(0, +) }
    var expansion: Int { block == .bottleneck ? 4 : 1 }
    /// Channels of the last backbone stage (the head's input): 2048 for ResNet-50/101.
    public var backboneChannels: Int { baseWidth * 8 * expansion }
    var stage3Channels: Int { baseWidth * 4 * expansion }

    /// Checks the description can be built; the message says what is wrong.
    public func validate() throws {
        func fail(_ why: String) -> WeightFileError { WeightFileError(file: "architecture \(name)", why) }
        guard layers.count == 4, layers.allSatisfy({ $0 >= 1 }) else { throw fail("layers must be four positive counts") }
        guard outputStride == 8 || outputStride == 16 else { throw fail("output stride must be 8 or 16") }
        guard asppRates.count == 3 else { throw fail("ASPP needs three rates") }
        guard baseWidth >= 1, headChannels >= 1 else { throw fail("widths must be positive") }
        guard !classesPerStep.isEmpty, classesPerStep.allSatisfy({ $0 >= 1 }) else {
            throw fail("classes per step must be positive")
        }
        guard !(flavor == .mib && auxHead) else { throw fail("MiB models have no auxiliary head") }
    }

    /// The presets `hrhf-convert --arch` knows. `classesPerStep` is replaced by `--classes`.
    public static let presets: [ArchitectureDescription] = [
        .init(name: "deeplabv3-resnet50", flavor: .torchvision, block: .bottleneck, layers: [3, 4, 6, 3],
              outputStride: 8, classesPerStep: [21]),
        .init(name: "deeplabv3-resnet101", flavor: .torchvision, block: .bottleneck, layers: [3, 4, 23, 3],
              outputStride: 8, classesPerStep: [21]),
        .init(name: "deeplabv3-resnet50-os16", flavor: .torchvision, block: .bottleneck, layers: [3, 4, 6, 3],
              outputStride: 16, classesPerStep: [21]),
        .init(name: "deeplabv3-resnet101-os16", flavor: .torchvision, block: .bottleneck, layers: [3, 4, 23, 3],
              outputStride: 16, classesPerStep: [21]),
        .init(name: "deeplabv3-resnet101-mib", flavor: .mib, block: .bottleneck, layers: [3, 4, 23, 3],
              outputStride: 16, classesPerStep: [16]),
        .init(name: "deeplabv3-resnet101-mib-os8", flavor: .mib, block: .bottleneck, layers: [3, 4, 23, 3],
              outputStride: 8, classesPerStep: [16]),
        // The small CPU variant: basic blocks, a quarter of the width, the same head.
        .init(name: "deeplabv3-small", flavor: .torchvision, block: .basic, layers: [1, 1, 1, 1], baseWidth: 16,
              outputStride: 8, headChannels: 64, classesPerStep: [16]),
        .init(name: "deeplabv3-resnet18-small", flavor: .torchvision, block: .basic, layers: [2, 2, 2, 2],
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
        do {
            let arch = try JSONDecoder().decode(ArchitectureDescription.self, from: Data(contentsOf: url))
            try arch.validate()
            return arch
        } catch let e as WeightFileError {
            throw e
        } catch {
            throw WeightFileError(file: nameOrPath, "not a valid architecture description: \(error)")
        }
    }
}
