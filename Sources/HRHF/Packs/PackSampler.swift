import Foundation

/// Deterministic batches of pack images (augmented like the real ones; their labels are not
/// used: the old model's outputs are the targets of fake images). Packs are verified when read;
/// each image is decoded through `SyntheticPack.image`, which checks it against the pack.
public final class PackSampler: @unchecked Sendable {
    let images: [(pack: SyntheticPack, record: SynthesisRecord)]
    let batchSize: Int
    let augmentation: Augmentation
    let normalization: Normalization
    let seed: UInt64
    let firstSlot: Int
    /// The slots of every batch this process builds (a data-parallel rank's share); nil for all.
    /// A slot's image and augmentation are keyed on its place in the whole batch, so they do not
    /// depend on which rank builds it.
    public var share: Range<Int>? {
        didSet { prefetcher.drop() }
    }
    private let prefetcher = Prefetcher<Tensor>(label: "hrhf.pack-sampler")

    /// Images the packs hold, before `minimumAchievedShare` left some out.
    public let offered: Int

    /// `firstSlot`: the slots of a batch before the pack images' (the real images of a step's
    /// batch), so that their augmentation is keyed on their place in the whole batch.
    /// `minimumAchievedShare`: only images whose every target class the teacher gave at least
    /// this share of its asked area (`SynthesisRecord.reaches`); nil for all.
    public init(
        packs: [SyntheticPack], batchSize: Int, augmentation: Augmentation, normalization: Normalization,
        seed: UInt64, firstSlot: Int = 0, minimumAchievedShare: Float? = nil
    ) throws {
        let all = packs.flatMap { p in p.manifest.images.map { (pack: p, record: $0) } }
        offered = all.count
        images = all.filter { minimumAchievedShare.map($0.record.reaches) ?? true }
        guard !images.isEmpty else {
            let files = packs.map(\.url.path).joined(separator: ", ")
            if let share = minimumAchievedShare, !all.isEmpty {
                throw PackError(
                    file: files, "none of the \(all.count) images shows its classes on \(share) of the asked area")
            }
            throw PackError(file: files, "the packs hold no images")
        }
        guard batchSize >= 1 else { throw PackError(file: packs[0].url.path, "a batch of \(batchSize) pack images") }
        self.batchSize = batchSize
        self.augmentation = augmentation
        self.normalization = normalization
        self.seed = seed
        self.firstSlot = firstSlot
    }

    public var count: Int { images.count }

    /// Batch `iteration`: a function of the seed and the iteration only, drawn as the real
    /// images' loader draws its batches (`EpochSchedule`); the next one is prepared in the background.
    public func batch(_ iteration: Int) throws -> Tensor {
        try prefetcher.value(iteration) { [self] in try makeBatch($0) }
    }

    /// Builds batch `iteration` now, on the calling thread.
    func makeBatch(_ iteration: Int) throws -> Tensor {
        let schedule = EpochSchedule(count: images.count, batchSize: batchSize, seed: seed, firstSlot: firstSlot)
        var tensors: [Tensor] = []
        for (slot, item) in schedule.picks(iteration, slots: share) {
            let (pack, record) = images[item]
            let image = try pack.image(record)
            var rng = schedule.augmentationGenerator(iteration: iteration, slot: slot)
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
