import Foundation

/// torchvision's ResNet without `avgpool` and `fc`, as DeepLabV3's `backbone`: keys `conv1`,
/// `bn1`, `layer1`...`layer4`. Output stride 8 dilates layers 3 and 4
/// (`replace_stride_with_dilation=[False, True, True]`), 16 dilates layer 4 only; the first
/// block of a dilated layer keeps the previous dilation, as torchvision's `_make_layer`.
public final class TorchvisionResNet: Module {
    public let conv1: Conv2d, bn1: BatchNorm2d
    public let stages: [Sequential]

    public init(_ arch: ArchitectureDescription, rng: inout SeededGenerator) {
        conv1 = Conv2d(3, arch.baseWidth, kernelSize: 7, stride: 2, padding: 3, bias: false, rng: &rng)
        bn1 = BatchNorm2d(arch.baseWidth)
        let dilate = arch.outputStride == 8 ? [false, true, true] : [false, false, true]
        var inplanes = arch.baseWidth, dilation = 1
        var stages: [Sequential] = []
        for stage in 0..<4 {
            let planes = arch.baseWidth << stage
            var stride = stage == 0 ? 1 : 2
            let previousDilation = dilation
            if stage > 0 && dilate[stage - 1] {
                dilation *= stride
                stride = 1
            }
            let outPlanes = planes * arch.expansion
            var downsample: Sequential?
            if stride != 1 || inplanes != outPlanes {
                downsample = Sequential([
                    Conv2d(inplanes, outPlanes, kernelSize: 1, stride: stride, bias: false, rng: &rng),
                    BatchNorm2d(outPlanes),
                ])
            }
            var blocks: [Module] = []
            for b in 0..<arch.layers[stage] {
                let (s, d, ds) = b == 0 ? (stride, previousDilation, downsample) : (1, dilation, nil)
                switch arch.block {
                case .bottleneck:
                    blocks.append(
                        Bottleneck(
                            inplanes: inplanes, planes: planes, stride: s, dilation: d, downsample: ds, rng: &rng))
                case .basic:
                    blocks.append(
                        BasicBlock(
                            inplanes: inplanes, planes: planes, stride: s, dilation: d, downsample: ds, rng: &rng))
                }
                inplanes = outPlanes
            }
            stages.append(Sequential(blocks))
        }
        self.stages = stages
        super.init()
        registerModule("conv1", conv1)
        registerModule("bn1", bn1)
        for (i, s) in stages.enumerated() { registerModule("layer\(i + 1)", s) }
    }

    /// The outputs of layer 3 (for the auxiliary head) and layer 4.
    public func features(_ x: Tensor) -> (stage3: Tensor, stage4: Tensor) {
        var h = maxPool2d(convNorm(x, conv1, bn1, relu: true), kernel: 3, stride: 2, padding: 1)
        h = stages[0](h)
        h = stages[1](h)
        let c3 = stages[2](h)
        return (c3, stages[3](c3))
    }

    /// As `features`, with each stage's last residual sum before its ReLU.
    func featuresKeepingSums(_ x: Tensor) -> (stage3: Tensor, stage4: Tensor, sums: [Tensor]) {
        var h = maxPool2d(convNorm(x, conv1, bn1, relu: true), kernel: 3, stride: 2, padding: 1)
        var sums: [Tensor] = []
        var c3 = h
        for (i, stage) in stages.enumerated() {
            let (output, sum) = runStageKeepingSum(stage, h)
            sums.append(sum)
            h = output
            if i == 2 { c3 = h }
        }
        return (c3, h, sums)
    }

    public override func forward(_ x: Tensor) -> Tensor { features(x).stage4 }
}

/// The leaky ReLU slope of MiB's inplace-ABN layers.
let mibSlope: Float = 0.01

/// MiB's (inplace_abn's) residual block: `convs.{conv1,bn1,conv2,bn2,conv3,bn3}` with
/// inplace-ABN (leaky ReLU after bn1 and bn2, identity after bn3), the shortcut
/// `proj_conv`/`proj_bn` (identity) when shape changes, leaky ReLU after the sum.
public final class MiBResidualBlock: Module {
    public let convs: Sequential
    public let projConv: Conv2d?, projBN: BatchNorm2d?

    public init(inChannels: Int, channels: [Int], stride: Int, dilation: Int, rng: inout SeededGenerator) {
        func abn(_ c: Int, _ act: NormActivation = .leakyRelu(mibSlope)) -> BatchNorm2d {
            BatchNorm2d(c, tracksBatches: false, activation: act)
        }
        convs = Sequential(named: [
            ("conv1", Conv2d(inChannels, channels[0], kernelSize: 1, bias: false, rng: &rng)),
            ("bn1", abn(channels[0])),
            (
                "conv2",
                Conv2d(
                    channels[0], channels[1], kernelSize: 3, stride: stride, padding: dilation,
                    dilation: dilation, bias: false, rng: &rng)
            ),
            ("bn2", abn(channels[1])),
            ("conv3", Conv2d(channels[1], channels[2], kernelSize: 1, bias: false, rng: &rng)),
            ("bn3", abn(channels[2], .identity)),
        ])
        if stride != 1 || inChannels != channels[2] {
            projConv = Conv2d(inChannels, channels[2], kernelSize: 1, stride: stride, bias: false, rng: &rng)
            projBN = abn(channels[2], .identity)
        } else {
            projConv = nil
            projBN = nil
        }
        super.init()
        registerModule("convs", convs)
        if let projConv, let projBN {
            registerModule("proj_conv", projConv)
            registerModule("proj_bn", projBN)
        }
    }

    public override func forward(_ x: Tensor) -> Tensor {
        let residual = projConv.map { convNorm(x, $0, projBN!) } ?? x
        return leakyRelu(convs(x) + residual, slope: mibSlope)
    }
}

extension MiBResidualBlock: ResidualBlock {
    func forwardKeepingSum(_ x: Tensor) -> (output: Tensor, sum: Tensor) {
        let sum = convs(x) + (projConv.map { convNorm(x, $0, projBN!) } ?? x)
        return (leakyRelu(sum, slope: mibSlope), sum)
    }
}

/// MiB's stem `mod1`: `conv1` 7x7 stride 2 and `bn1` (inplace-ABN), then 3x3 max pooling.
public final class MiBStem: Module {
    public let conv1: Conv2d, bn1: BatchNorm2d

    public init(width: Int, rng: inout SeededGenerator) {
        conv1 = Conv2d(3, width, kernelSize: 7, stride: 2, padding: 3, bias: false, rng: &rng)
        bn1 = BatchNorm2d(width, tracksBatches: false, activation: .leakyRelu(mibSlope))
        super.init()
        registerModule("conv1", conv1)
        registerModule("bn1", bn1)
    }

    public override func forward(_ x: Tensor) -> Tensor {
        maxPool2d(convNorm(x, conv1, bn1), kernel: 3, stride: 2, padding: 1)
    }
}

/// MiB's ResNet `body`: `mod1` (stem), `mod2`...`mod5` of `block1`...`blockN`. Output stride 16
/// uses dilations [1, 1, 1, 2], 8 uses [1, 1, 2, 4]; a stage is strided on its first block's
/// 3x3 convolution only where its dilation is 1.
public final class MiBResNet: Module {
    public let mod1: MiBStem
    public let stages: [Sequential]

    public init(_ arch: ArchitectureDescription, rng: inout SeededGenerator) {
        precondition(arch.block == .bottleneck, "MiB bodies use bottleneck blocks")
        mod1 = MiBStem(width: arch.baseWidth, rng: &rng)
        let dilations = arch.outputStride == 16 ? [1, 1, 1, 2] : [1, 1, 2, 4]
        var channels = [arch.baseWidth, arch.baseWidth, arch.baseWidth * 4]
        var inChannels = arch.baseWidth
        var stages: [Sequential] = []
        for (stage, count) in arch.layers.enumerated() {
            var blocks: [(String, Module)] = []
            for b in 0..<count {
                let d = dilations[stage]
                let s = (d == 1 && b == 0 && stage > 0) ? 2 : 1
                blocks.append(
                    (
                        "block\(b + 1)",
                        MiBResidualBlock(
                            inChannels: inChannels, channels: channels, stride: s,
                            dilation: d, rng: &rng)
                    ))
                inChannels = channels[2]
            }
            stages.append(Sequential(named: blocks))
            channels = channels.map { $0 * 2 }
        }
        self.stages = stages
        super.init()
        registerModule("mod1", mod1)
        for (i, s) in stages.enumerated() { registerModule("mod\(i + 2)", s) }
    }

    public override func forward(_ x: Tensor) -> Tensor {
        stages.reduce(mod1(x)) { $1($0) }
    }

    /// The output and each stage's last residual sum before its activation.
    func forwardKeepingSums(_ x: Tensor) -> (output: Tensor, sums: [Tensor]) {
        var h = mod1(x)
        var sums: [Tensor] = []
        for stage in stages {
            let (output, sum) = runStageKeepingSum(stage, h)
            sums.append(sum)
            h = output
        }
        return (h, sums)
    }
}

/// Re-initialises the convolutions of a freshly built backbone as torchvision does
/// (Kaiming normal, fan out, ReLU gain); batch norm starts at weight 1, bias 0.
func kaimingNormalFanOut(_ module: Module, rng: inout SeededGenerator) {
    for (_, m) in module.namedModules() {
        guard let conv = m as? Conv2d else { continue }
        let w = conv.weight
        let fanOut = w.shape[0] * w.shape[2] * w.shape[3]
        let std = (2 / Float(fanOut)).squareRoot()
        for i in 0..<w.count { w.pointer[i] = rng.nextNormal() * std }
    }
}
