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

    /// Makes the dropout layers of `model` draw the masks of this rank's share of a global batch
    /// of `batchSize` images, or of each part of a batch of several parts (real images, then fake
    /// ones): the rank's shares of the parts, in order.
    public func shareDropout(_ model: Module, batchSizes: [Int]) {
        var before = 0
        let slots = batchSizes.map { size -> Range<Int> in
            defer { before += size }
            return share(of: size).lowerBound + before..<share(of: size).upperBound + before
        }
        for (_, m) in model.namedModules() { (m as? Dropout)?.globalSlots = slots }
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

/// Sums the parameters' gradients over the ranks while the backward pass runs (as PyTorch DDP's
/// buckets): parameters are grouped, in the order their gradients become final, into buckets,
/// and a bucket's sum starts (MPI_Iallreduce) as soon as every gradient in it is final, so the
/// transfer of the later layers' gradients overlaps the backward pass of the earlier ones.
/// Buckets start strictly in their order on every rank, which keeps the ranks' calls matched
/// whatever order a rank finishes its gradients in. The first pass learns the order (rank 0's,
/// given to every rank) and sums as `DataParallel.sumGradients` does; later passes overlap.
/// Each bucket carries one flag per parameter, so a parameter no rank reached keeps no gradient.
public final class OverlappedGradientSum {
    let parallel: DataParallel
    let parameters: [Tensor]
    private let position: [ObjectIdentifier: Int]
    /// Parameter indices per bucket; nil until the first pass has given the order.
    private(set) var layout: [[Int]]?
    private var bucketOf: [Int] = [], offsetOf: [Int] = [], flagOf: [Int] = []
    private var buffers: [UnsafeMutableBufferPointer<Float>] = []
    private var unfinished: [Int] = []
    private var pending: [Communicator.PendingSum] = []
    /// Parameter indices in the order this pass finished their gradients.
    private var finishedOrder: [Int] = []

    /// Elements of the first bucket and of the others (a parameter larger than that has a bucket
    /// of its own).
    let firstBucketElements: Int, bucketElements: Int

    /// The first bucket is small so that its sum starts early, later ones larger so that few calls
    /// carry a large model (as PyTorch DDP's 1 MB and 25 MB): 2^18 and 2^22 floats (1 and 16 MiB;
    /// ResNet-101's 58.6 M parameters take 15 buckets).
    public init(
        _ parallel: DataParallel, parameters: [Tensor], firstBucketElements: Int = 1 << 18,
        bucketElements: Int = 1 << 22
    ) {
        self.parallel = parallel
        self.parameters = parameters
        self.firstBucketElements = firstBucketElements
        self.bucketElements = bucketElements
        position = Dictionary(parameters.enumerated().map { (ObjectIdentifier($0.element), $0.offset) }) { a, _ in a }
    }

    deinit { for b in buffers { b.deallocate() } }

    /// Call before the backward pass.
    public func begin() {
        finishedOrder.removeAll(keepingCapacity: true)
        guard let layout else { return }
        for b in buffers { b.update(repeating: 0) }
        unfinished = layout.map(\.count)
        pending = []
    }

    /// The backward pass's `leafReady`: stores a finished gradient in its bucket and starts every
    /// bucket, in order, whose gradients are all final; lets MPI advance the sums under way.
    public func gradientFinished(_ leaf: Tensor) {
        guard let i = position[ObjectIdentifier(leaf)], let g = leaf.grad else { return }
        finishedOrder.append(i)
        guard layout != nil else { return }
        let buffer = buffers[bucketOf[i]]
        buffer[flagOf[i]] = 1
        (buffer.baseAddress! + offsetOf[i]).update(from: g.pointer, count: g.count)
        unfinished[bucketOf[i]] -= 1
        while pending.count < buffers.count && unfinished[pending.count] == 0 { start(pending.count) }
        for k in pending.indices where !parallel.communicator.poll(&pending[k]) { break }
    }

    private func start(_ bucket: Int) {
        pending.append(parallel.communicator.startAllreduceSum(buffers[bucket]))
    }

    /// Call after the backward pass: starts the buckets left (gradients this rank never reached),
    /// waits for every sum and hands the summed gradients to the parameters.
    public func finish() {
        guard let layout else {
            parallel.sumGradients(parameters)
            makeLayout()
            return
        }
        while pending.count < buffers.count { start(pending.count) }
        for k in pending.indices { parallel.communicator.wait(&pending[k]) }
        for (b, members) in layout.enumerated() {
            for i in members where buffers[b][flagOf[i]] > 0 {
                let g = Tensor(uninitialized: parameters[i].shape)
                g.pointer.update(from: buffers[b].baseAddress! + offsetOf[i], count: g.count)
                parameters[i].grad = g
            }
        }
    }

    /// Buckets in the order rank 0 finished the gradients of this pass, then the parameters it
    /// never reached (last registered first).
    private func makeLayout() {
        let own = finishedOrder.map { Int64($0) }.withUnsafeBufferPointer { Data(buffer: $0) }
        let shared = parallel.communicator.broadcast(own)
        var order = [Int64](repeating: 0, count: shared.count / MemoryLayout<Int64>.stride)
        order.withUnsafeMutableBytes { _ = shared.copyBytes(to: $0) }
        var seen = Set<Int>()
        let sequence = (order.map { Int($0) } + parameters.indices.reversed()).filter {
            $0 >= 0 && $0 < parameters.count && seen.insert($0).inserted
        }
        var buckets: [[Int]] = [[]]
        var filled = 0
        for i in sequence {
            let cap = buckets.count == 1 ? firstBucketElements : bucketElements
            if filled > 0 && filled + parameters[i].count > cap {
                buckets.append([])
                filled = 0
            }
            buckets[buckets.count - 1].append(i)
            filled += parameters[i].count
        }
        bucketOf = .init(repeating: 0, count: parameters.count)
        offsetOf = bucketOf
        flagOf = bucketOf
        for (b, members) in buckets.enumerated() {
            var offset = members.count
            for (k, i) in members.enumerated() {
                (bucketOf[i], flagOf[i], offsetOf[i]) = (b, k, offset)
                offset += parameters[i].count
            }
            buffers.append(.allocate(capacity: offset))
        }
        layout = buckets
    }
}
