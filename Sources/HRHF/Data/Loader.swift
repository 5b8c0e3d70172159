import Foundation

/// A training or evaluation batch: normalised images and their labels.
public struct Batch {
    public var images: Tensor
    public var labels: Labels
    public var names: [String]
}

/// Random scale (0.5 to 2.0 of the image side), random crop to `cropSize` (padded with the
/// mean colour and the ignore label where the scaled image is smaller), horizontal flip:
/// DeepLab's and MiB's training augmentation.
public struct Augmentation: Sendable {
    public var cropSize: Int
    public var scaleRange: ClosedRange<Float>
    public var flip: Bool

    public init(cropSize: Int, scaleRange: ClosedRange<Float> = 0.5...2.0, flip: Bool = true) {
        self.cropSize = cropSize
        self.scaleRange = scaleRange
        self.flip = flip
    }
}

/// The window of a resize to `width` x `height`: all of it where not given; a window outside it
/// is a caller's mistake (the augmentation computes it from the resized size).
private func resizeWindow(
    _ columns: Range<Int>?, _ rows: Range<Int>?, width: Int, height: Int, _ op: String
) -> (columns: Range<Int>, rows: Range<Int>) {
    let columns = columns ?? 0..<width, rows = rows ?? 0..<height
    precondition(
        columns.lowerBound >= 0 && columns.upperBound <= width && rows.lowerBound >= 0 && rows.upperBound <= height,
        "\(op): window \(columns) x \(rows) outside \(width) x \(height)")
    return (columns, rows)
}

/// Bilinear resize of 8-bit RGB (align_corners false), as the float op does: the window
/// `columns` x `rows` of the image resized to `width` x `height` (all of it by default), as an
/// image of the window's size. A crop computes only the pixels it keeps.
public func resizeImage(
    _ image: RGBImage, width: Int, height: Int, columns: Range<Int>? = nil, rows: Range<Int>? = nil
) -> RGBImage {
    if width == image.width && height == image.height && columns == nil && rows == nil { return image }
    let (columns, rows) = resizeWindow(columns, rows, width: width, height: height, "resizeImage")
    let outW = columns.count
    var out = [UInt8](repeating: 0, count: outW * rows.count * 3)
    let ty = LinearTaps(inSize: image.height, outSize: height), tx = LinearTaps(inSize: image.width, outSize: width)
    image.pixels.withUnsafeBufferPointer { src in
        out.withUnsafeMutableBufferPointer { dst in
            for (j, y) in rows.enumerated() {
                let row0 = ty.i0[y] * image.width, row1 = ty.i1[y] * image.width
                let (wy0, wy1) = (ty.w0[y], ty.w1[y])
                for (i, x) in columns.enumerated() {
                    let (a, b, wx0, wx1) = (3 * (row0 + tx.i0[x]), 3 * (row0 + tx.i1[x]), tx.w0[x], tx.w1[x])
                    let (c, d) = (3 * (row1 + tx.i0[x]), 3 * (row1 + tx.i1[x]))
                    let o = 3 * (j * outW + i)
                    for ch in 0..<3 {
                        let v =
                            wy0 * (wx0 * Float(src[a + ch]) + wx1 * Float(src[b + ch]))
                            + wy1 * (wx0 * Float(src[c + ch]) + wx1 * Float(src[d + ch]))
                        dst[o + ch] = UInt8(max(0, min(255, v.rounded())))
                    }
                }
            }
        }
    }
    return RGBImage(width: outW, height: rows.count, pixels: out)
}

/// Nearest-neighbour resize of a mask (PyTorch's "nearest": source = floor(dst * in / out)):
/// the window `columns` x `rows` of the mask resized to `width` x `height` (all of it by default).
public func resizeMask(
    _ mask: IndexMask, width: Int, height: Int, columns: Range<Int>? = nil, rows: Range<Int>? = nil
) -> IndexMask {
    if width == mask.width && height == mask.height && columns == nil && rows == nil { return mask }
    let (columns, rows) = resizeWindow(columns, rows, width: width, height: height, "resizeMask")
    var out = [UInt16](repeating: 0, count: columns.count * rows.count)
    var o = 0
    for y in rows {
        let sy = min(mask.height - 1, y * mask.height / height)
        for x in columns {
            out[o] = mask.values[sy * mask.width + min(mask.width - 1, x * mask.width / width)]
            o += 1
        }
    }
    return IndexMask(width: columns.count, height: rows.count, values: out)
}

extension Augmentation {
    /// The augmented image and labels, `cropSize` square.
    public func apply(_ image: RGBImage, _ labels: IndexMask, rng: inout SeededGenerator) -> (RGBImage, IndexMask) {
        let s = scaleRange.lowerBound + (scaleRange.upperBound - scaleRange.lowerBound) * rng.nextUnitFloat()
        let w = max(1, Int((Float(image.width) * s).rounded())), h = max(1, Int((Float(image.height) * s).rounded()))
        let c = cropSize
        let x0 = w > c ? Int(rng.next() % UInt64(w - c + 1)) : 0
        let y0 = h > c ? Int(rng.next() % UInt64(h - c + 1)) : 0
        let mirror = flip && rng.nextUnitFloat() < 0.5
        // Only the crop's window of the scaled image and labels.
        let (columns, rows) = (x0..<(x0 + min(c, w)), y0..<(y0 + min(c, h)))
        let scaled = resizeImage(image, width: w, height: h, columns: columns, rows: rows)
        let scaledLabels = resizeMask(labels, width: w, height: h, columns: columns, rows: rows)
        // Padding: ImageNet's mean colour (zero after normalisation) and the ignore label.
        var pixels = [UInt8](repeating: 0, count: c * c * 3)
        for i in 0..<(c * c) {
            pixels[3 * i] = 124
            pixels[3 * i + 1] = 116
            pixels[3 * i + 2] = 104
        }
        var values = [UInt16](repeating: 255, count: c * c)
        for y in 0..<min(c, h) {
            for x in 0..<min(c, w) {
                let dx = mirror ? min(c, w) - 1 - x : x, src = y * scaled.width + x
                for ch in 0..<3 { pixels[(y * c + dx) * 3 + ch] = scaled.pixels[src * 3 + ch] }
                values[y * c + dx] = scaledLabels.values[src]
            }
        }
        return (RGBImage(width: c, height: c, pixels: pixels), IndexMask(width: c, height: c, values: values))
    }
}

/// Which item fills each slot of batch `iteration`, and the generator that augments it: an
/// epoch's batches take a shuffle of the items keyed on (seed, epoch) in turn, the last partial
/// batch dropped (drop_last); slot s augments with a generator keyed on (seed, iteration, s). A
/// step's real and synthetic images follow one schedule each, the synthetic slots numbered after
/// the real ones (`firstSlot`), so no two images of a batch share a generator.
struct EpochSchedule {
    let count: Int
    let batchSize: Int
    let seed: UInt64
    var firstSlot = 0

    var batchesPerEpoch: Int { max(1, count / batchSize) }

    /// A permutation of 0..<count.
    func order(epoch: Int) -> [Int] {
        var rng = SeededGenerator(seed: seed &+ UInt64(epoch) &* 0x9E37_79B9_7F4A_7C15)
        return Array(0..<count).shuffled(using: &rng)
    }

    /// Batch `iteration`'s slots `slots` (all when nil) and the item each takes.
    func picks(_ iteration: Int, slots: Range<Int>?) -> [(slot: Int, item: Int)] {
        let epoch = iteration / batchesPerEpoch, position = iteration % batchesPerEpoch
        let order = self.order(epoch: epoch)
        return (slots ?? 0..<batchSize).map { ($0, order[(position * batchSize + $0) % order.count]) }
    }

    func augmentationGenerator(iteration: Int, slot: Int) -> SeededGenerator {
        SeededGenerator(
            seed: seed ^ (UInt64(iteration) &* 0xBF58_476D_1CE4_E5B9) ^ UInt64(firstSlot + slot)
                &* 0x94D0_49BB_1331_11EB)
    }
}

/// Prepares batch `iteration + 1` on a background thread while the caller computes with batch
/// `iteration`: the real images' loader and the pack sampler both read through one.
final class Prefetcher<Value>: @unchecked Sendable {
    private let queue: DispatchQueue

    /// A batch being prepared in the background.
    private final class Job: @unchecked Sendable {
        let iteration: Int
        var result: Result<Value, Error>?
        let done = DispatchSemaphore(value: 0)
        init(_ iteration: Int) { self.iteration = iteration }
    }

    private var pending: Job?

    init(label: String) { queue = DispatchQueue(label: label) }

    /// Batch `iteration`, taken from the background thread when it was prepared there; starts
    /// preparing `iteration + 1`.
    func value(_ iteration: Int, make: @escaping @Sendable (Int) throws -> Value) throws -> Value {
        var result: Result<Value, Error>
        if let job = pending {
            job.done.wait()
            result = job.iteration == iteration ? job.result! : Result { try make(iteration) }
        } else {
            result = Result { try make(iteration) }
        }
        let job = Job(iteration + 1)
        pending = job
        queue.async {
            job.result = Result { try make(job.iteration) }
            job.done.signal()
        }
        return try result.get()
    }

    /// Drops a batch prepared for settings that changed (a data-parallel rank's new share).
    func drop() {
        pending?.done.wait()
        pending = nil
    }
}

/// Deterministic batches of a dataset: batch `k` depends only on the seed and `k` (the epoch's
/// shuffled order and each sample's augmentation come from generators keyed on them), so a
/// resumed run sees the same batches. The next batch is prepared on a background thread while
/// the caller computes.
public final class BatchLoader: @unchecked Sendable {
    public let dataset: SegmentationDataset
    public let indices: [Int]
    public let batchSize: Int
    public let augmentation: Augmentation?
    public let normalization: Normalization
    public let labelTransform: @Sendable (IndexMask) -> IndexMask
    public let seed: UInt64
    /// The slots of every batch this process builds (a data-parallel rank's share); nil for all.
    /// Augmentation is keyed on the slot in the whole batch, so a slot's sample does not depend on
    /// which rank builds it.
    public var share: Range<Int>? {
        // A batch prepared in the background for the former share is dropped.
        didSet { prefetcher.drop() }
    }

    private let prefetcher = Prefetcher<Batch>(label: "hrhf.batch-loader")

    public init(
        dataset: SegmentationDataset, indices: [Int], batchSize: Int, augmentation: Augmentation?,
        normalization: Normalization, seed: UInt64, labelTransform: @escaping @Sendable (IndexMask) -> IndexMask
    ) {
        precondition(!indices.isEmpty, "no images to load")
        self.dataset = dataset
        self.indices = indices
        self.batchSize = batchSize
        self.augmentation = augmentation
        self.normalization = normalization
        self.labelTransform = labelTransform
        self.seed = seed
    }

    var schedule: EpochSchedule { EpochSchedule(count: indices.count, batchSize: batchSize, seed: seed) }

    /// Batches per pass over the images (the last partial batch is dropped, as drop_last).
    public var batchesPerEpoch: Int { schedule.batchesPerEpoch }

    /// Builds batch `iteration` now, on the calling thread.
    public func makeBatch(_ iteration: Int) throws -> Batch {
        let schedule = self.schedule
        let picks = schedule.picks(iteration, slots: share).map { ($0.slot, indices[$0.item]) }
        var images: [Tensor] = [], labelValues: [Int32] = [], names: [String] = []
        var shape: (Int, Int)?
        for (slot, index) in picks {
            let sample = try dataset.sample(index)
            var image = sample.image, labels = labelTransform(sample.labels)
            if let augmentation {
                var rng = schedule.augmentationGenerator(iteration: iteration, slot: slot)
                (image, labels) = augmentation.apply(image, labels, rng: &rng)
            }
            if let shape, shape != (image.height, image.width) {
                throw DatasetError(
                    file: dataset.imageURL(index).path,
                    "images of one batch differ in size: use a crop size or batch size 1")
            }
            shape = (image.height, image.width)
            images.append(normalization.tensor(image))
            labelValues += labels.values.map { Int32($0) }
            names.append(sample.name)
        }
        let (h, w) = shape!
        return Batch(
            images: concatBatch(images), labels: Labels(shape: [picks.count, h, w], values: labelValues), names: names)
    }

    /// Batch `iteration`, taken from the background thread when it was prepared there; starts
    /// preparing `iteration + 1`. (Batches hold no tensors that need gradients, so building
    /// them records nothing on the tape and needs no change of the process-wide grad mode.)
    public func batch(_ iteration: Int) throws -> Batch {
        try prefetcher.value(iteration) { [self] in try makeBatch($0) }
    }
}
