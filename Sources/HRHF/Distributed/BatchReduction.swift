import Foundation

/// The batch-wide statistics of a loss (counts that normalise a mean, group sums, class means)
/// when a data-parallel job shares each batch between ranks: every rank holds a part of the
/// statistic, and the batch's is the sum of the parts. `local` (one process) makes no call and
/// leaves every value as it is, so one process computes exactly what it did before.
public struct BatchReduction {
    public let communicator: Communicator

    public init(_ communicator: Communicator) { self.communicator = communicator }

    /// One process: the batch is this process's.
    public static let local = BatchReduction(.single)

    public var isLocal: Bool { communicator.size == 1 }

    /// The sum of `value` over the ranks.
    public func total(_ value: Double) -> Double { isLocal ? value : communicator.sum(value) }

    /// The sums of `values` over the ranks (one call).
    public func total(_ values: [Double]) -> [Double] {
        guard !isLocal else { return values }
        var sums = values
        communicator.allreduceSum(&sums)
        return sums
    }

    /// Elementwise sum of `x` over the ranks, differentiable: its backward sums the ranks'
    /// gradients of the result, each rank keeping the sum for its own part (the adjoint of a sum
    /// over ranks), so a loss computed from the sum sends every rank the gradient of its part.
    public func sum(_ x: Tensor) -> Tensor {
        guard !isLocal else { return x }
        let out = x.detached().copy()
        communicator.allreduceSum(UnsafeMutableBufferPointer(start: out.pointer, count: out.count))
        let communicator = self.communicator
        record(out, "allreduce_sum", [x]) { g in
            let gx = g.copy()
            communicator.allreduceSum(UnsafeMutableBufferPointer(start: gx.pointer, count: gx.count))
            return [gx]
        }
        return out
    }

    /// `mean`, this rank's mean over `count` elements, as its part of the mean over every rank's
    /// elements: mean * count / (the count over the ranks), so that the parts add up to it.
    public func share(ofMean mean: Tensor, count: Double) -> Tensor {
        guard !isLocal else { return mean }
        let total = total(count)
        return mean * (total > 0 ? Float(count / total) : 0)
    }

    /// This rank's part of a value every rank computes alike from summed statistics: 1/size of
    /// it, so that the ranks' parts add up to it (and, through `sum`, their gradients to its).
    public func share(ofReplicated x: Tensor) -> Tensor { isLocal ? x : x * (1 / Float(communicator.size)) }
}
