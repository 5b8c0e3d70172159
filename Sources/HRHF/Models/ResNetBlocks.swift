import Foundation

/// torchvision's Bottleneck (ResNet-50/101): 1x1 reduce, 3x3 (carrying stride and dilation,
/// "ResNet V1.5"), 1x1 expand by 4, each followed by batch norm; ReLU after the sum with the
/// shortcut. Keys: conv1, bn1, conv2, bn2, conv3, bn3, downsample.0, downsample.1.
public final class Bottleneck: Module {
    public static let expansion = 4
    public let conv1: Conv2d, bn1: BatchNorm2d, conv2: Conv2d, bn2: BatchNorm2d, conv3: Conv2d, bn3: BatchNorm2d
    public let downsample: Sequential?

    public init(
        inplanes: Int, planes: Int, stride: Int = 1, dilation: Int = 1, downsample: Sequential? = nil,
        rng: inout SeededGenerator
    ) {
        conv1 = Conv2d(inplanes, planes, kernelSize: 1, bias: false, rng: &rng)
        bn1 = BatchNorm2d(planes)
        conv2 = Conv2d(
            planes, planes, kernelSize: 3, stride: stride, padding: dilation, dilation: dilation,
            bias: false, rng: &rng)
        bn2 = BatchNorm2d(planes)
        conv3 = Conv2d(planes, planes * Self.expansion, kernelSize: 1, bias: false, rng: &rng)
        bn3 = BatchNorm2d(planes * Self.expansion)
        self.downsample = downsample
        super.init()
        registerModule("conv1", conv1)
        registerModule("bn1", bn1)
        registerModule("conv2", conv2)
        registerModule("bn2", bn2)
        registerModule("conv3", conv3)
        registerModule("bn3", bn3)
        if let downsample { registerModule("downsample", downsample) }
    }

    public override func forward(_ x: Tensor) -> Tensor {
        var out = convNorm(x, conv1, bn1, relu: true)
        out = convNorm(out, conv2, bn2, relu: true)
        out = convNorm(out, conv3, bn3)
        return addRelu(out, downsample?(x) ?? x)
    }

    func forwardKeepingSum(_ x: Tensor) -> (output: Tensor, sum: Tensor) {
        var out = convNorm(x, conv1, bn1, relu: true)
        out = convNorm(out, conv2, bn2, relu: true)
        let sum = convNorm(out, conv3, bn3) + (downsample?(x) ?? x)
        return (relu(sum), sum)
    }
}

/// A residual block whose sum before its last activation can be read: PLOP's Local POD distils
/// that of each stage's last block (its ResNet returns them as "attentions").
protocol ResidualBlock: Module {
    func forwardKeepingSum(_ x: Tensor) -> (output: Tensor, sum: Tensor)
}

extension Bottleneck: ResidualBlock {}
extension BasicBlock: ResidualBlock {}

/// A ResNet stage's output and its last block's sum before the activation.
func runStageKeepingSum(_ stage: Sequential, _ x: Tensor) -> (output: Tensor, sum: Tensor) {
    let blocks = stage.children.map(\.module)
    let h = runLayers(Array(blocks.dropLast()), x)
    guard let last = blocks.last as? ResidualBlock else {
        preconditionFailure("a ResNet stage ends in a residual block")
    }
    return last.forwardKeepingSum(h)
}

/// torchvision's BasicBlock (ResNet-18/34): two 3x3 convolutions with batch norm. The first
/// carries stride and dilation (torchvision refuses dilation > 1 here; this toolkit allows it
/// so small backbones can keep output stride 8 or 16).
public final class BasicBlock: Module {
    public static let expansion = 1
    public let conv1: Conv2d, bn1: BatchNorm2d, conv2: Conv2d, bn2: BatchNorm2d
    public let downsample: Sequential?

    public init(
        inplanes: Int, planes: Int, stride: Int = 1, dilation: Int = 1, downsample: Sequential? = nil,
        rng: inout SeededGenerator
    ) {
        conv1 = Conv2d(
            inplanes, planes, kernelSize: 3, stride: stride, padding: dilation, dilation: dilation,
            bias: false, rng: &rng)
        bn1 = BatchNorm2d(planes)
        conv2 = Conv2d(planes, planes, kernelSize: 3, padding: dilation, dilation: dilation, bias: false, rng: &rng)
        bn2 = BatchNorm2d(planes)
        self.downsample = downsample
        super.init()
        registerModule("conv1", conv1)
        registerModule("bn1", bn1)
        registerModule("conv2", conv2)
        registerModule("bn2", bn2)
        if let downsample { registerModule("downsample", downsample) }
    }

    public override func forward(_ x: Tensor) -> Tensor {
        let out = convNorm(x, conv1, bn1, relu: true)
        return addRelu(convNorm(out, conv2, bn2), downsample?(x) ?? x)
    }

    func forwardKeepingSum(_ x: Tensor) -> (output: Tensor, sum: Tensor) {
        let sum = convNorm(convNorm(x, conv1, bn1, relu: true), conv2, bn2) + (downsample?(x) ?? x)
        return (relu(sum), sum)
    }
}
