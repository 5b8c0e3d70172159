import Foundation

/// Deterministic batches of pack images (augmented like the real ones; their labels are not
/// used: the old model's outputs are the targets of fake images). Packs are verified when read;
/// each image is decoded through `SyntheticPack.image`, which checks it against the pack.
public final class PackSampler {
    let images: [(pack: SyntheticPack, record: SynthesisRecord)]
    let batchSize: Int
    let augmentation: Augmentation
    let normalization: Normalization
    let seed: UInt64
    /// The slots of every batch this process builds (a data-parallel rank's share); nil for all.
    /// A slot's image and augmentation are keyed on its place in the whole batch, so they do not
    /// depend on which rank builds it.
    public var share: Range<Int>?

    public init(
        packs: [SyntheticPack], batchSize: Int, augmentation: Augmentation, normalization: Normalization,
        seed: UInt64
    ) throws {
        images = packs.flatMap { p in p.manifest.images.map { (p, $0) } }
        guard !images.isEmpty else {
            throw PackError(file: packs.map(\.url.path).joined(separator: ", "), "the packs hold no images")
        }
        guard batchSize >= 1 else { throw PackError(file: packs[0].url.path, "a batch of \(batchSize) pack images") }
        self.batchSize = batchSize
        self.augmentation = augmentation
        self.normalization = normalization
        self.seed = seed
    }

    public var count: Int { images.count }

    /// Batch `iteration`: a function of the seed and the iteration only.
    public func batch(_ iteration: Int) throws -> Tensor {
        let perEpoch = max(1, images.count / batchSize)
        let epoch = iteration / perEpoch, position = iteration % perEpoch
        var orderRNG = SeededGenerator(seed: seed ^ 0x5A5A_5A5A ^ (UInt64(epoch) &* 0x9E37_79B9_7F4A_7C15))
        let order = Array(images.indices).shuffled(using: &orderRNG)
        var tensors: [Tensor] = []
        for slot in share ?? 0..<batchSize {
            let (pack, record) = images[order[(position * batchSize + slot) % order.count]]
            let image = try pack.image(record)
            var rng = SeededGenerator(seed: seed ^ 0xA5A5 ^ (UInt64(iteration) &* 0xBF58_476D_1CE4_E5B9) ^ UInt64(slot))
            let (augmented, _) = augmentation.apply(
                image,
                IndexMask(
                    width: image.width, height: image.height,
                    values: .init(repeating: 0, count: image.width * image.height)), rng: &rng)
            tensors.append(normalization.tensor(augmented))
        }
        return concatBatch(tensors)
    }
}
