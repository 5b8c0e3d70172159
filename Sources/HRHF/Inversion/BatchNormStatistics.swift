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
                    let mu = mean(x, axes: [0, 2, 3])
                    let centered = x - reshape(mu, [1, -1, 1, 1])
                    let variance = mean(square(centered), axes: [0, 2, 3])
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
