import Foundation

/// torch.nn.Conv2d: parameters `weight` (Cout x Cin/groups x k x k) and optional `bias`,
/// initialised as PyTorch does (Kaiming-uniform with a = sqrt(5), bias U(-1/sqrt(fan_in), ..)).
public final class Conv2d: Module {
    public let weight: Tensor
    public let bias: Tensor?
    public let stride: (Int, Int), padding: (Int, Int), dilation: (Int, Int), groups: Int

    public init(
        _ inChannels: Int, _ outChannels: Int, kernelSize: Int, stride: Int = 1, padding: Int = 0,
        dilation: Int = 1, groups: Int = 1, bias: Bool = true, rng: inout SeededGenerator
    ) {
        precondition(inChannels % groups == 0 && outChannels % groups == 0, "Conv2d: channels not divisible by groups")
        self.stride = (stride, stride)
        self.padding = (padding, padding)
        self.dilation = (dilation, dilation)
        self.groups = groups
        let fanIn = inChannels / groups * kernelSize * kernelSize
        let bound = 1 / Float(fanIn).squareRoot()
        weight = Tensor.uniform(
            [outChannels, inChannels / groups, kernelSize, kernelSize],
            low: -bound, high: bound, rng: &rng)
        self.bias = bias ? Tensor.uniform([outChannels], low: -bound, high: bound, rng: &rng) : nil
        super.init()
        registerParameter("weight", weight)
        if let b = self.bias { registerParameter("bias", b) }
    }

    public var outChannels: Int { weight.shape[0] }

    public override func forward(_ x: Tensor) -> Tensor {
        Profiler.op(.convolution) {
            conv2d(x, weight: weight, bias: bias, stride: stride, padding: padding, dilation: dilation, groups: groups)
        }
    }
}

/// What follows the normalisation inside a batch-norm module. MiB's inplace-ABN layers are
/// batch norm fused with leaky ReLU 0.01, or with nothing (`bn3`, `proj_bn`).
public enum NormActivation: Sendable, Equatable {
    case identity
    case leakyRelu(Float)
}

/// torch.nn.BatchNorm2d: `weight`, `bias`, buffers `running_mean`, `running_var` and
/// `num_batches_tracked`. MiB's inplace-ABN is the same with an activation and without
/// `num_batches_tracked` (`tracksBatches: false`).
public final class BatchNorm2d: Module {
    public let weight: Tensor, bias: Tensor
    public let runningMean: Tensor, runningVar: Tensor
    public let numBatchesTracked: Tensor?
    public var momentum: Float, eps: Float
    /// Called with the layer's input on every forward while set (the statistics hook).
    public var inputObserver: ((Tensor) -> Void)?
    /// In training, the first `batchSplit` images of a batch and the rest are normalised with
    /// their own batch statistics, and only the first part moves the running ones (AdvProp's
    /// auxiliary batch norm with shared affine weights): a half-synthetic batch keeps the
    /// synthetic images' statistics out of those evaluation uses. nil: one batch.
    public var batchSplit: Int?

    public let activation: NormActivation

    public init(
        _ channels: Int, eps: Float = 1e-5, momentum: Float = 0.1, tracksBatches: Bool = true,
        activation: NormActivation = .identity
    ) {
        self.activation = activation
        weight = Tensor(shape: [channels], repeating: 1)
        bias = Tensor(zeros: [channels])
        runningMean = Tensor(zeros: [channels])
        runningVar = Tensor(shape: [channels], repeating: 1)
        numBatchesTracked = tracksBatches ? Tensor(zeros: []) : nil
        self.eps = eps
        self.momentum = momentum
        super.init()
        registerParameter("weight", weight)
        registerParameter("bias", bias)
        registerBuffer("running_mean", runningMean)
        registerBuffer("running_var", runningVar)
        if let n = numBatchesTracked { registerBuffer("num_batches_tracked", n) }
    }

    public override func forward(_ x: Tensor) -> Tensor { profiledNormalize(x, relu: false) }

    /// `normalize` as a batch-norm op of a profile.
    func profiledNormalize(_ x: Tensor, relu applyReLU: Bool) -> Tensor {
        Profiler.op(.batchNorm) { normalize(x, relu: applyReLU) }
    }

    /// The layer's forward, then a ReLU when `relu` (a torchvision block's): the layer's own
    /// activation or the ReLU runs inside the normalisation's op (see `batchNorm2d`).
    func normalize(_ x: Tensor, relu applyReLU: Bool) -> Tensor {
        inputObserver?(x)
        if training, let n = numBatchesTracked { n.pointer[0] += 1 }
        var slope: Float?
        switch activation {
        case .identity: slope = applyReLU ? 0 : nil
        case .leakyRelu(let s): slope = s
        }
        let y: Tensor
        if training, let s = batchSplit, s > 0, s < x.shape[0] {
            let first = batchNorm2d(
                sliceBatch(x, 0..<s), weight: weight, bias: bias, runningMean: runningMean,
                runningVar: runningVar, training: true, momentum: momentum, eps: eps, negativeSlope: slope)
            let rest = batchNorm2d(
                sliceBatch(x, s..<x.shape[0]), weight: weight, bias: bias, runningMean: nil,
                runningVar: nil, training: true, momentum: momentum, eps: eps, negativeSlope: slope)
            y = concatBatch([first, rest])
        } else {
            y = batchNorm2d(
                x, weight: weight, bias: bias, runningMean: runningMean, runningVar: runningVar,
                training: training, momentum: momentum, eps: eps, negativeSlope: slope)
        }
        // inplace-ABN's leaky ReLU, then the block's ReLU: the second one stays a separate op.
        if case .leakyRelu = activation, applyReLU { return relu(y) }
        return y
    }
}

/// torch.optim.swa_utils.update_bn: every batch-norm layer's running statistics become the
/// plain average of the batch statistics of the `batches` forward passes `forward(b)` runs
/// (PyTorch's momentum None: the mean of the batch means and of the unbiased batch variances),
/// in training mode and without gradient. The layers' momentum and the model's mode are
/// restored afterwards.
public func updateBatchNorm(_ model: Module, batches: Int, forward: (Int) throws -> Void) rethrows {
    let layers = model.namedModules().compactMap { $0.module as? BatchNorm2d }
    guard !layers.isEmpty, batches > 0 else { return }
    let wasTraining = model.training, momenta = layers.map(\.momentum)
    defer {
        for (bn, m) in zip(layers, momenta) { bn.momentum = m }
        model.train(wasTraining)
    }
    for bn in layers {
        for ch in 0..<bn.runningMean.count {
            bn.runningMean.pointer[ch] = 0
            bn.runningVar.pointer[ch] = 1
        }
        bn.numBatchesTracked?.pointer[0] = 0
    }
    model.train(true)
    for b in 0..<batches {
        // Momentum 1/(b+1) keeps the running value the mean of the b+1 batches seen.
        for bn in layers { bn.momentum = 1 / Float(b + 1) }
        try withNoGrad { try forward(b) }
    }
}

extension BatchNorm2d {
    /// Whether `conv` followed by this layer can run as one `conv2dAffine`: evaluation mode (fixed
    /// statistics), no statistics observer, and no weight of either that could get a gradient.
    func canFold(after conv: Conv2d) -> Bool {
        guard !training, inputObserver == nil else { return false }
        let weights = [conv.weight, weight, bias] + (conv.bias.map { [$0] } ?? [])
        return !GradMode.isEnabled || !weights.contains { $0.requiresGrad }
    }

    /// This layer in evaluation as y = x * scale + shift per channel, with the bias of the
    /// convolution before it folded into the shift.
    func foldedScaleShift(convBias: Tensor?) -> (scale: Tensor, shift: Tensor) {
        let c = weight.count
        let scale = Tensor(zeros: [c]), shift = Tensor(zeros: [c])
        for ch in 0..<c {
            let a = weight.pointer[ch] / (runningVar.pointer[ch] + eps).squareRoot()
            scale.pointer[ch] = a
            shift.pointer[ch] = bias.pointer[ch] - runningMean.pointer[ch] * a + (convBias?.pointer[ch] ?? 0) * a
        }
        return (scale, shift)
    }
}

/// conv, batch norm (with the layer's own activation, inplace-ABN's leaky ReLU), then a ReLU when
/// `relu`. One fused op where the batch norm can fold (evaluation, frozen weights: inference, the
/// old model of a step, inversion without the statistics hook); otherwise the layers in turn.
public func convNorm(_ x: Tensor, _ conv: Conv2d, _ bn: BatchNorm2d, relu applyReLU: Bool = false) -> Tensor {
    let slope: Float?
    switch (bn.activation, applyReLU) {
    case (.identity, false): slope = nil
    case (.identity, true): slope = 0
    case (.leakyRelu(let s), false): slope = s
    case (.leakyRelu, true): return bn.profiledNormalize(conv(x), relu: true)
    }
    guard bn.canFold(after: conv) else { return bn.profiledNormalize(conv(x), relu: applyReLU) }
    let (scale, shift) = bn.foldedScaleShift(convBias: conv.bias)
    return Profiler.op(.convolution) {
        conv2dAffine(
            x, weight: conv.weight, scale: scale, shift: shift, negativeSlope: slope, stride: conv.stride,
            padding: conv.padding, dilation: conv.dilation, groups: conv.groups)
    }
}

/// Runs `layers` in order, each Conv2d, BatchNorm2d (, ReLU) run through `convNorm`.
func runLayers(_ layers: [Module], _ x: Tensor) -> Tensor {
    var y = x, i = 0
    while i < layers.count {
        if let conv = layers[i] as? Conv2d, i + 1 < layers.count, let bn = layers[i + 1] as? BatchNorm2d {
            let withReLU = i + 2 < layers.count && layers[i + 2] is ReLU
            y = convNorm(y, conv, bn, relu: withReLU)
            i += withReLU ? 3 : 2
        } else {
            y = layers[i](y)
            i += 1
        }
    }
    return y
}

public final class ReLU: Module {
    public override func forward(_ x: Tensor) -> Tensor { relu(x) }
}

public final class Identity: Module {
    public override func forward(_ x: Tensor) -> Tensor { x }
}

/// torch.nn.Dropout with its own seeded generator.
public final class Dropout: Module {
    public let p: Float
    var rng: SeededGenerator
    /// The images of the global batch this process computes, in its order (a data-parallel
    /// rank's shares: of the real images, then of the fake ones); empty for all of them. The
    /// masks of the other images are drawn and skipped, so every image gets its one-process mask.
    public var globalSlots: [Range<Int>] = []

    public init(p: Float, seed: UInt64 = 0) {
        self.p = p
        rng = SeededGenerator(seed: seed)
        super.init()
    }

    public override func forward(_ x: Tensor) -> Tensor {
        guard !globalSlots.isEmpty, training, p > 0, let n = x.shape.first, n > 0 else {
            return dropout(x, p: p, training: training, rng: &rng)
        }
        precondition(globalSlots.reduce(0) { $0 + $1.count } == n, "dropout: slots \(globalSlots) for \(n) images")
        let perImage = x.count / n
        var parts: [Tensor] = []
        var drawn = 0, local = 0
        for slots in globalSlots {
            for _ in 0..<((slots.lowerBound - drawn) * perImage) { _ = rng.nextUnitFloat() }
            let images = globalSlots.count == 1 ? x : sliceBatch(x, local..<(local + slots.count))
            parts.append(dropout(images, p: p, training: true, rng: &rng))
            (drawn, local) = (slots.upperBound, local + slots.count)
        }
        return parts.count == 1 ? parts[0] : concatBatch(parts)
    }
}
