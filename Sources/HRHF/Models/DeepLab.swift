import Foundation

/// Global average pooling as a module (ASPP's pooling branch starts with it).
public final class GlobalAveragePool: Module {
    public override func forward(_ x: Tensor) -> Tensor { adaptiveAvgPool1x1(x) }
}

/// torchvision's ASPP: `convs.0` (1x1), `convs.1-3` (3x3 dilated), `convs.4` (pooling branch:
/// pool, 1x1, BN, ReLU, upsampled back), each conv-BN-ReLU; `project` (1x1, BN, ReLU, dropout 0.5).
public final class ASPP: Module {
    public let convs: ModuleList, project: Sequential

    public init(inChannels: Int, rates: [Int], outChannels: Int, seed: UInt64, rng: inout SeededGenerator) {
        func branch(_ k: Int, _ rate: Int, _ rng: inout SeededGenerator) -> Sequential {
            Sequential([
                Conv2d(
                    inChannels, outChannels, kernelSize: k, padding: k == 1 ? 0 : rate, dilation: rate,
                    bias: false, rng: &rng), BatchNorm2d(outChannels), ReLU(),
            ])
        }
        var branches: [Module] = [branch(1, 1, &rng)]
        for r in rates { branches.append(branch(3, r, &rng)) }
        branches.append(
            Sequential([
                GlobalAveragePool(), Conv2d(inChannels, outChannels, kernelSize: 1, bias: false, rng: &rng),
                BatchNorm2d(outChannels), ReLU(),
            ]))
        convs = ModuleList(branches)
        project = Sequential([
            Conv2d(outChannels * branches.count, outChannels, kernelSize: 1, bias: false, rng: &rng),
            BatchNorm2d(outChannels), ReLU(), Dropout(p: 0.5, seed: seed),
        ])
        super.init()
        registerModule("convs", convs)
        registerModule("project", project)
    }

    public override func forward(_ x: Tensor) -> Tensor {
        let size = (x.shape[2], x.shape[3])
        var outs: [Tensor] = []
        for i in 0..<convs.count {
            let y = convs[i](x)
            outs.append(i == convs.count - 1 ? resizeBilinear(y, size: size) : y)
        }
        return project(concatChannels(outs))
    }
}

/// MiB's DeepLabV3 head: `map_convs` (1x1 and three dilated 3x3), `map_bn`, `red_conv`, and the
/// pooling branch `global_pooling_conv`, `global_pooling_bn`, `pool_red_conv`, added before
/// `red_bn`. Every bn is inplace-ABN with leaky ReLU.
/// MiB evaluates the pooling branch with a `pooling_size` window (32 by default) that equals
/// global pooling whenever the feature map is no larger than the window, which is what is
/// implemented; larger maps are refused in evaluation rather than computed differently.
public final class MiBDeepLabHead: Module {
    public let mapConvs: ModuleList, mapBN: BatchNorm2d, redConv: Conv2d
    public let globalPoolingConv: Conv2d, globalPoolingBN: BatchNorm2d, poolRedConv: Conv2d, redBN: BatchNorm2d
    public static let evalPoolingSize = 32

    public init(inChannels: Int, hidden: Int, outChannels: Int, rates: [Int], rng: inout SeededGenerator) {
        func abn(_ c: Int) -> BatchNorm2d { BatchNorm2d(c, tracksBatches: false, activation: .leakyRelu(mibSlope)) }
        var maps: [Module] = [Conv2d(inChannels, hidden, kernelSize: 1, bias: false, rng: &rng)]
        for r in rates {
            maps.append(Conv2d(inChannels, hidden, kernelSize: 3, padding: r, dilation: r, bias: false, rng: &rng))
        }
        mapConvs = ModuleList(maps)
        mapBN = abn(hidden * maps.count)
        globalPoolingConv = Conv2d(inChannels, hidden, kernelSize: 1, bias: false, rng: &rng)
        globalPoolingBN = abn(hidden)
        redConv = Conv2d(hidden * maps.count, outChannels, kernelSize: 1, bias: false, rng: &rng)
        poolRedConv = Conv2d(hidden, outChannels, kernelSize: 1, bias: false, rng: &rng)
        redBN = abn(outChannels)
        super.init()
        registerModule("map_convs", mapConvs)
        registerModule("map_bn", mapBN)
        registerModule("global_pooling_conv", globalPoolingConv)
        registerModule("global_pooling_bn", globalPoolingBN)
        registerModule("red_conv", redConv)
        registerModule("pool_red_conv", poolRedConv)
        registerModule("red_bn", redBN)
    }

    public override func forward(_ x: Tensor) -> Tensor {
        precondition(
            training || (x.shape[2] <= Self.evalPoolingSize && x.shape[3] <= Self.evalPoolingSize),
            "MiB head: feature map \(x.shape[2])x\(x.shape[3]) exceeds the pooling window \(Self.evalPoolingSize); "
                + "inputs up to \(Self.evalPoolingSize) times the output stride are supported")
        var out = concatChannels((0..<mapConvs.count).map { mapConvs[$0](x) })
        out = redConv(mapBN(out))
        let pool = poolRedConv(globalPoolingBN(globalPoolingConv(adaptiveAvgPool1x1(x))))
        return redBN(out + pool)
    }
}

/// What one forward pass gives: logits at the input's size (or at the feature size when not
/// upsampled), the penultimate features (the head's output the classifier reads, used for
/// prototypes and feature distillation), and the auxiliary logits when there is an aux head.
public struct SegmentationOutput {
    public var logits: Tensor
    public var features: Tensor
    public var auxLogits: Tensor?
    /// With `run(_:stageSums: true)`: each backbone stage's last residual sum before its
    /// activation (what PLOP's Local POD distils); empty otherwise.
    public var stageSums: [Tensor] = []
}

/// DeepLabV3 in either flavour, built from its description. Channel k of the logits is class k.
public final class DeepLabV3: Module {
    public let architecture: ArchitectureDescription
    let torchvisionBackbone: TorchvisionResNet?
    let mibBody: MiBResNet?
    /// torchvision: `classifier.{0: ASPP, 1: conv3x3, 2: BN, 3: ReLU}`; MiB: `head`.
    let headLayers: [Module]
    /// torchvision: `classifier.4`; MiB: `cls.0`, `cls.1`, ... (one per step).
    public let classifiers: [Conv2d]
    let auxClassifier: Sequential?

    public init(_ arch: ArchitectureDescription, seed: UInt64 = 0) throws {
        try arch.validate()
        architecture = arch
        var rng = SeededGenerator(seed: seed)
        switch arch.flavor {
        case .torchvision:
            let backbone = TorchvisionResNet(arch, rng: &rng)
            kaimingNormalFanOut(backbone, rng: &rng)
            torchvisionBackbone = backbone
            mibBody = nil
            let aspp = ASPP(
                inChannels: arch.backboneChannels, rates: arch.asppRates, outChannels: arch.headChannels,
                seed: rng.next(), rng: &rng)
            headLayers = [
                aspp, Conv2d(arch.headChannels, arch.headChannels, kernelSize: 3, padding: 1, bias: false, rng: &rng),
                BatchNorm2d(arch.headChannels), ReLU(),
            ]
            precondition(arch.classesPerStep.count >= 1)
            classifiers = [Conv2d(arch.headChannels, arch.numClasses, kernelSize: 1, rng: &rng)]
            if arch.auxHead {
                let c = arch.stage3Channels, mid = c / 4
                auxClassifier = Sequential([
                    Conv2d(c, mid, kernelSize: 3, padding: 1, bias: false, rng: &rng),
                    BatchNorm2d(mid), ReLU(), Dropout(p: 0.1, seed: rng.next()),
                    Conv2d(mid, arch.numClasses, kernelSize: 1, rng: &rng),
                ])
            } else {
                auxClassifier = nil
            }
        case .mib:
            let body = MiBResNet(arch, rng: &rng)
            kaimingNormalFanOut(body, rng: &rng)
            mibBody = body
            torchvisionBackbone = nil
            headLayers = [
                MiBDeepLabHead(
                    inChannels: arch.backboneChannels, hidden: arch.headChannels,
                    outChannels: arch.headChannels, rates: arch.asppRates, rng: &rng)
            ]
            classifiers = arch.classesPerStep.map { Conv2d(arch.headChannels, $0, kernelSize: 1, rng: &rng) }
            auxClassifier = nil
        }
        super.init()
        switch arch.flavor {
        case .torchvision:
            registerModule("backbone", torchvisionBackbone!)
            let classifier = Sequential(headLayers + [classifiers[0]])
            registerModule("classifier", classifier)
            if let auxClassifier { registerModule("aux_classifier", auxClassifier) }
        case .mib:
            registerModule("body", mibBody!)
            registerModule("head", headLayers[0])
            registerModule("cls", ModuleList(classifiers))
        }
    }

    public var numClasses: Int { architecture.numClasses }

    /// Refuses, with a clear message, inputs this network cannot evaluate: MiB's pooling
    /// branch is implemented for feature maps up to its 32-cell window (inputs up to 32 times
    /// the output stride a side, 512 pixels at stride 16).
    public func checkInput(height: Int, width: Int, name: String) throws {
        guard architecture.flavor == .mib else { return }
        let limit = MiBDeepLabHead.evalPoolingSize * architecture.outputStride
        guard height <= limit && width <= limit else {
            throw WeightFileError(
                file: name,
                "\(width)x\(height) is larger than the \(limit)x\(limit) this MiB-flavour model evaluates "
                    + "(its pooling window covers 32 feature cells); resize it with --size")
        }
    }

    /// Logits (upsampled bilinearly to the input size when `upsample`), features, aux logits,
    /// and with `stageSums` the backbone stages' residual sums.
    public func run(_ x: Tensor, upsample: Bool = true, stageSums: Bool = false) -> SegmentationOutput {
        Profiler.network { layersForward(x, upsample: upsample, stageSums: stageSums) }
    }

    private func layersForward(_ x: Tensor, upsample: Bool, stageSums keepSums: Bool) -> SegmentationOutput {
        _ = nchw(x, "DeepLabV3")
        precondition(x.shape[1] == 3, "DeepLabV3 expects 3-channel images, got \(x.shape)")
        let size = (x.shape[2], x.shape[3])
        var aux: Tensor?
        var features: Tensor
        var sums: [Tensor] = []
        if let backbone = torchvisionBackbone {
            let (c3, c4): (Tensor, Tensor)
            if keepSums {
                (c3, c4, sums) = backbone.featuresKeepingSums(x)
            } else {
                (c3, c4) = backbone.features(x)
            }
            features = runLayers(headLayers, c4)
            if let auxClassifier {
                aux = auxClassifier(c3)
                if upsample { aux = resizeBilinear(aux!, size: size) }
            }
        } else if keepSums {
            let body: Tensor
            (body, sums) = mibBody!.forwardKeepingSums(x)
            features = headLayers[0](body)
        } else {
            features = headLayers[0](mibBody!(x))
        }
        let parts = classifiers.map { $0(features) }
        var logits = parts.count == 1 ? parts[0] : concatChannels(parts)
        if upsample { logits = resizeBilinear(logits, size: size) }
        return SegmentationOutput(logits: logits, features: features, auxLogits: aux, stageSums: sums)
    }

    public override func forward(_ x: Tensor) -> Tensor { run(x).logits }
}
