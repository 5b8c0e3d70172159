import Foundation

/// Input statistics of one batch-norm layer, recorded during a forward pass with gradient:
/// the per-channel mean and biased variance over (N, H, W), beside the layer's running ones.
public struct BatchNormInputStatistics {
    public var layer: String
    public var mean: Tensor
    public var variance: Tensor
    public var runningMean: Tensor
    public var runningVar: Tensor
}

/// Records the input statistics of every batch-norm layer of a model during forward passes
/// (DeepInversion's feature-statistics prior). The statistics are differentiable with
/// respect to the input image. Detach when done.
public final class BatchNormStatisticsRecorder {
    private var layers: [(String, BatchNorm2d)] = []
    public private(set) var records: [BatchNormInputStatistics] = []

    public init(attachingTo model: Module) {
        layers = model.namedModules().compactMap { name, m in (m as? BatchNorm2d).map { (name, $0) } }
        for (name, bn) in layers {
            // The statistics are the inputs of a loss term (the inversion's feature statistics).
            bn.inputObserver = { [unowned self] x in
                Profiler.region(.loss) {
                    let statistics = channelMeanVariance(x)
                    let c = x.shape[1]
                    let mu = reshape(sliceBatch(statistics, 0..<1), [c])
                    let variance = reshape(sliceBatch(statistics, 1..<2), [c])
                    self.records.append(
                        BatchNormInputStatistics(
                            layer: name, mean: mu, variance: variance,
                            runningMean: bn.runningMean, runningVar: bn.runningVar))
                }
            }
        }
    }

    public var layerCount: Int { layers.count }

    /// Forgets the records of the previous forward pass.
    public func reset() { records.removeAll() }

    public func detach() {
        for (_, bn) in layers { bn.inputObserver = nil }
        layers.removeAll()
        records.removeAll()
    }

    deinit { for (_, bn) in layers { bn.inputObserver = nil } }
}

/// Per channel of an N x C x H x W tensor, the mean and the biased variance over (N, H, W), as
/// a 2 x C tensor (row 0 the means, row 1 the variances): `mean(x, axes: [0, 2, 3])` and
/// `mean(square(x - mean), axes: [0, 2, 3])` as one op. Two passes per channel forward and one
/// backward, where the composition made five full-size temporaries per batch-norm layer.
func channelMeanVariance(_ x: Tensor) -> Tensor {
    let (n, c, h, w) = nchw(x, "channel mean and variance")
    let plane = h * w, count = Float(max(n * plane, 1))
    let out = Tensor(zeros: [2, c])
    let px = x.pointer, po = out.pointer
    parallelBlocks(c) { channels in
        for ch in channels {
            var total: Double = 0
            for b in 0..<n { total += laneSum(px + (b * c + ch) * plane, count: plane, centre: 0, squared: false) }
            let mu = Float(total) / count
            var squares: Double = 0
            for b in 0..<n { squares += laneSum(px + (b * c + ch) * plane, count: plane, centre: mu, squared: true) }
            po[ch] = mu
            po[c + ch] = Float(squares) / count
        }
    }
    let xd = x.detached(), statistics = out.detached()
    record(out, "channel_mean_variance", [x]) { g in
        let gx = Tensor(uninitialized: xd.shape)
        let pg = g.pointer, pgx = gx.pointer, pxd = xd.pointer, ps = statistics.pointer
        parallelBlocks(n * c) { planes in
            for p in planes {
                let ch = p % c
                // d mean / dx = 1/count; d variance / dx = 2 (x - mean) / count.
                let constant = pg[ch] / count, slope = 2 * pg[c + ch] / count, mu = ps[ch]
                let src = pxd + p * plane, dst = pgx + p * plane
                for i in 0..<plane { dst[i] = constant + slope * (src[i] - mu) }
            }
        }
        return [gx]
    }
    return out
}

/// The sum of `p[i] - centre` (or of its square) over `count` floats, in eight float lanes.
private func laneSum(_ p: UnsafePointer<Float>, count: Int, centre: Float, squared: Bool) -> Double {
    var lanes = SIMD8<Float>(repeating: 0)
    let m = SIMD8<Float>(repeating: centre)
    var i = 0
    while i + 8 <= count {
        let d = UnsafeRawPointer(p + i).loadUnaligned(as: SIMD8<Float>.self) - m
        lanes += squared ? d * d : d
        i += 8
    }
    var total: Double = 0
    for l in 0..<8 { total += Double(lanes[l]) }
    while i < count {
        let d = p[i] - centre
        total += Double(squared ? d * d : d)
        i += 1
    }
    return total
}
