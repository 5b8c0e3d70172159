import COpenBLAS
import Foundation

/// Wall-clock seconds of `body`, the median of `repeats` runs after one warm-up run.
public func medianSeconds(repeats: Int, _ body: () -> Void) -> Double {
    body()
    var times: [Double] = []
    for _ in 0..<max(repeats, 1) {
        let start = DispatchTime.now().uptimeNanoseconds
        body()
        times.append(Double(DispatchTime.now().uptimeNanoseconds - start) / 1e9)
    }
    times.sort()
    return times[times.count / 2]
}

/// Sets the threads of the toolkit's kernels (OpenBLAS itself stays on one: the convolutions
/// split their products between these threads).
public func setComputeThreads(_ n: Int) {
    ParallelConfig.threads = n
}

/// The sgemm rate of this machine: GFLOP/s of a square n x n x n product.
public func measureSgemmGFLOPS(size n: Int = 2048, repeats: Int = 3) -> Double {
    var rng = SeededGenerator(seed: 1)
    let a = Tensor.randn([n, n], rng: &rng), b = Tensor.randn([n, n], rng: &rng)
    let c = Tensor(zeros: [n, n])
    // OpenBLAS's own threading on one large square product: the best rate this machine gives.
    let seconds = withBLASThreads(ParallelConfig.threads) {
        medianSeconds(repeats: repeats) {
            sgemm(m: n, n: n, k: n, a: a.pointer, lda: n, b: b.pointer, ldb: n, c: c.pointer, ldc: n)
        }
    }
    return 2 * Double(n) * Double(n) * Double(n) / seconds / 1e9
}

/// One convolution shape to measure.
public struct ConvBenchCase: Sendable {
    public var name: String
    public var batch, inChannels, outChannels, kernel, dilation, size: Int

    public init(
        _ name: String, batch: Int = 1, inChannels: Int, outChannels: Int, kernel: Int,
        dilation: Int = 1, size: Int
    ) {
        self.name = name
        self.batch = batch
        self.inChannels = inChannels
        self.outChannels = outChannels
        self.kernel = kernel
        self.dilation = dilation
        self.size = size
    }

    /// The convolutions that dominate DeepLabV3-ResNet at 256 x 256 (output stride 8).
    public static let deepLab256: [ConvBenchCase] = [
        .init("3x3 64->64 @64x64", inChannels: 64, outChannels: 64, kernel: 3, size: 64),
        .init("3x3 d2 256->256 @32x32", inChannels: 256, outChannels: 256, kernel: 3, dilation: 2, size: 32),
        .init("1x1 1024->256 @32x32", inChannels: 1024, outChannels: 256, kernel: 1, size: 32),
        .init("1x1 256->1024 @32x32", inChannels: 256, outChannels: 1024, kernel: 1, size: 32),
        .init("ASPP 3x3 d12 2048->256 @32x32", inChannels: 2048, outChannels: 256, kernel: 3, dilation: 12, size: 32),
        .init("ASPP 3x3 d24 2048->256 @32x32", inChannels: 2048, outChannels: 256, kernel: 3, dilation: 24, size: 32),
        .init("ASPP 3x3 d36 2048->256 @32x32", inChannels: 2048, outChannels: 256, kernel: 3, dilation: 36, size: 32),
    ]
}

public struct ConvBenchResult: Sendable {
    public var benchCase: ConvBenchCase
    public var forwardSeconds, backwardSeconds: Double
    public var forwardGFLOPS, backwardGFLOPS: Double
}

/// Times forward and backward (input and weight gradients: twice the forward's FLOPs) of one
/// convolution through the same kernels the autograd ops use.
public func benchmarkConvolution(_ bc: ConvBenchCase, repeats: Int) -> ConvBenchResult {
    var rng = SeededGenerator(seed: 2)
    let pad = bc.dilation * (bc.kernel - 1) / 2
    let geo = Conv2dGeometry(
        inChannels: bc.inChannels, outChannels: bc.outChannels, kernelH: bc.kernel,
        kernelW: bc.kernel, strideH: 1, strideW: 1, padH: pad, padW: pad,
        dilationH: bc.dilation, dilationW: bc.dilation, groups: 1, inH: bc.size, inW: bc.size)
    let x = Tensor.randn([bc.batch, bc.inChannels, bc.size, bc.size], rng: &rng)
    let w = Tensor.randn([bc.outChannels, bc.inChannels, bc.kernel, bc.kernel], std: 0.05, rng: &rng)
    let y = Tensor(zeros: [bc.batch, bc.outChannels, geo.outH, geo.outW])
    let gy = Tensor.randn(y.shape, rng: &rng)
    let gx = Tensor(zeros: x.shape), gw = Tensor(zeros: w.shape)
    let forward = medianSeconds(repeats: repeats) {
        conv2dForward(x.pointer, w.pointer, nil, geo, batch: bc.batch, out: y.pointer)
    }
    let backward = medianSeconds(repeats: repeats) {
        conv2dBackwardInput(gy.pointer, w.pointer, geo, batch: bc.batch, gradInput: gx.pointer)
        conv2dBackwardWeight(gy.pointer, x.pointer, geo, batch: bc.batch, gradWeight: gw.pointer)
    }
    let flops = geo.flopsPerImage * Double(bc.batch)
    return ConvBenchResult(
        benchCase: bc, forwardSeconds: forward, backwardSeconds: backward,
        forwardGFLOPS: flops / forward / 1e9, backwardGFLOPS: 2 * flops / backward / 1e9)
}

/// Training-mode batch norm with its ReLU fused, on one activation shape: forward and backward
/// (input, weight and bias gradients) through the autograd op, each against the time of copying
/// the same tensor once, measured in the same run (the memory-bound floor of a pass).
public struct NormBenchResult: Sendable {
    public var shape: [Int]
    public var forwardSeconds, backwardSeconds, copySeconds: Double
}

public func benchmarkBatchNormReLU(shape: [Int], repeats: Int) -> NormBenchResult {
    var rng = SeededGenerator(seed: 3)
    let x = Tensor.randn(shape, rng: &rng)
    let weight = Tensor.randn([shape[1]], rng: &rng), bias = Tensor.randn([shape[1]], rng: &rng)
    let gy = Tensor.randn(shape, rng: &rng)
    x.requiresGrad = true
    weight.requiresGrad = true
    bias.requiresGrad = true
    let forward = medianSeconds(repeats: repeats) {
        _ = batchNorm2d(
            x, weight: weight, bias: bias, runningMean: nil, runningVar: nil, training: true, negativeSlope: 0)
    }
    // Each backward needs its own forward: timed as the pair, less the forward's median.
    let both = medianSeconds(repeats: repeats) {
        let y = batchNorm2d(
            x, weight: weight, bias: bias, runningMean: nil, runningVar: nil, training: true, negativeSlope: 0)
        y.backward(gradient: gy)
        for t in [x, weight, bias] { t.grad = nil }
    }
    let copy = Tensor(zeros: shape)
    let copySeconds = medianSeconds(repeats: repeats) {
        let src = x.pointer, dst = copy.pointer
        parallelBlocks(x.count, minBlock: parallelGrain) { r in
            (dst + r.lowerBound).update(from: src + r.lowerBound, count: r.count)
        }
    }
    return NormBenchResult(
        shape: shape, forwardSeconds: forward, backwardSeconds: max(both - forward, 0), copySeconds: copySeconds)
}
