import Foundation

/// Data-parallel training over the ranks of a communicator: every rank computes a contiguous share
/// of each global batch, the ranks' losses are weighted so that their sum is the global batch's
/// loss, and parameter gradients are summed over ranks in large buckets before the optimizer step.
public struct DataParallel {
    public let communicator: Communicator

    public init(_ communicator: Communicator) { self.communicator = communicator }

    /// The slots of a global batch of `batchSize` that `rank` of `size` computes: contiguous,
    /// the first `batchSize % size` ranks one more.
    public static func share(of batchSize: Int, rank: Int, size: Int) -> Range<Int> {
        let base = batchSize / size, extra = batchSize % size
        let start = rank * base + min(rank, extra)
        return start..<(start + base + (rank < extra ? 1 : 0))
    }

    public func share(of batchSize: Int) -> Range<Int> {
        DataParallel.share(of: batchSize, rank: communicator.rank, size: communicator.size)
    }

    /// Makes the dropout layers of `model` draw the masks of this rank's share of the global batch.
    public func shareDropout(_ model: Module, batchSize: Int) {
        for (_, m) in model.namedModules() { (m as? Dropout)?.imagesBefore = share(of: batchSize).lowerBound }
    }

    /// The factor of this rank's mean loss over `localCount` terms (labelled pixels) that makes
    /// the ranks' sum the mean over the global batch: localCount / (sum of localCount). One
    /// process gets exactly 1.
    public func lossWeight(localCount: Int) -> Float {
        guard communicator.size > 1 else { return 1 }
        let total = communicator.sum(Double(localCount))
        return total > 0 ? Float(Double(localCount) / total) : 0
    }

    /// `loss`, a mean over the labelled pixels of `labels` (255 ignored), scaled by this rank's
    /// `lossWeight`: the ranks' sum is then the mean over the global batch, as one process computes.
    public func weighted(_ loss: Tensor, labels: Labels) -> Tensor {
        guard communicator.size > 1 else { return loss }
        return loss * lossWeight(localCount: labels.values.reduce(0) { $0 + ($1 == 255 ? 0 : 1) })
    }

    /// Sums the parameters' gradients over all ranks, in place. Gradients are packed into one
    /// contiguous buffer (one flag per parameter saying whether the rank has its gradient: a
    /// parameter no rank reached keeps no gradient, so the optimizer skips it as in one process)
    /// and reduced in buckets of `Communicator.bucketElements`.
    public func sumGradients(_ parameters: [Tensor]) {
        guard communicator.size > 1 else { return }
        let total = parameters.reduce(parameters.count) { $0 + $1.count }
        var buffer = [Float](repeating: 0, count: total)
        buffer.withUnsafeMutableBufferPointer { flat in
            var offset = parameters.count
            for (i, p) in parameters.enumerated() {
                if let g = p.grad {
                    flat[i] = 1
                    (flat.baseAddress! + offset).update(from: g.pointer, count: p.count)
                }
                offset += p.count
            }
            communicator.allreduceSum(flat)
            offset = parameters.count
            for (i, p) in parameters.enumerated() {
                if flat[i] > 0 {
                    let g = Tensor(uninitialized: p.shape)
                    g.pointer.update(from: flat.baseAddress! + offset, count: p.count)
                    p.grad = g
                }
                offset += p.count
            }
        }
    }
}
