import Foundation

/// Deterministic batches of pack images (augmented like the real ones; their labels are not
/// used: the old model's outputs are the targets of fake images).
public final class PackSampler {
    let images: [(pack: SyntheticPack, record: SynthesisRecord)]
    let batchSize: Int
    let augmentation: Augmentation
    let normalization: Normalization
    let seed: UInt64

    public init(packs: [SyntheticPack], batchSize: Int, augmentation: Augmentation, normalization: Normalization, seed: UInt64) {
        images = packs.flatMap { p in p.manifest.images.map { (p, $0) } }
        precondition(!images.isEmpty, "the packs hold no images")
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
        for slot in 0..<batchSize {
            let (pack, record) = images[order[(position * batchSize + slot) % order.count]]
            let image = try pack.image(record)
            var rng = SeededGenerator(seed: seed ^ 0xA5A5 ^ (UInt64(iteration) &* 0xBF58_476D_1CE4_E5B9) ^ UInt64(slot))
            let (augmented, _) = augmentation.apply(image, IndexMask(width: image.width, height: image.height,
                                                                    values: .init(repeating: 0, count: image.width * image.height)), rng: &rng)
            tensors.append(normalization.tensor(augmented))
        }
        return concatBatch(tensors)
    }
}

/// One incremental step: the old model, the step's real images, optional synthetic packs, and
/// the method's switches. Builds the new model and the per-iteration loss.
public final class DistillationStep {
    public let old: DeepLabV3
    public let oldCard: ModelCard
    public let model: DeepLabV3
    public let card: ModelCard
    public let proto: StepProtocol
    public let options: DistillationOptions
    public let config: TrainingConfig
    public let realLoader: BatchLoader
    public let fakeSampler: PackSampler?
    public let prototypes: Prototypes?
    public let realPerBatch: Int
    let stepOfClass: [Int]
    /// With `auditRelabelling`: the same real batches with their full masks, and the counts so far.
    let auditLoader: BatchLoader?
    public private(set) var relabelAudit: RelabelAudit?

    public init(old: DeepLabV3, oldCard: ModelCard, train: SegmentationDataset, task: IncrementalTask, step: Int,
                setting: IncrementalSetting, packs: [SyntheticPack], options: DistillationOptions, config: TrainingConfig,
                auditRelabelling: Bool = false) throws {
        precondition(step >= 1, "step 0 is trained with hrhf-train")
        let seenBefore = task.seen(through: step - 1)
        guard old.numClasses == seenBefore.count, seenBefore == Array(0..<seenBefore.count) else {
            throw WeightFileError(file: "old model", "has \(old.numClasses) outputs; step \(step) of \(task.name) needs a model of classes 0-\(seenBefore.count - 1)")
        }
        let newClasses = task.classes(at: step)
        guard newClasses == Array(old.numClasses..<(old.numClasses + newClasses.count)) else {
            throw WeightFileError(file: task.name, "step \(step) must add classes \(old.numClasses) onwards in order")
        }
        self.old = old
        self.oldCard = oldCard
        old.eval()
        old.setRequiresGrad(false)
        (model, card) = try extendModel(old, card: oldCard, newClassNames: newClasses.map { $0 < train.classNames.count ? train.classNames[$0] : "class \($0)" }, step: step)
        proto = StepProtocol(task: task, step: step, setting: setting)
        self.options = options
        self.config = config
        let usesPacks = options.fakeRatio > 0
        guard !usesPacks || !packs.isEmpty else { throw WeightFileError(file: "packs", "method \(options.method) needs --pack") }
        guard options.fakeRatio < 1 else { throw WeightFileError(file: "fake ratio", "\(options.fakeRatio) leaves no real images: use a ratio below 1") }
        // Every method sees the same real images per batch; the pack methods add fake ones so
        // that they are `fakeRatio` of the whole batch (as many as the real ones at 0.5).
        realPerBatch = config.batchSize
        let fake = usesPacks ? max(1, Int((Float(config.batchSize) * options.fakeRatio / (1 - options.fakeRatio)).rounded())) : 0
        if options.splitBatchNorm && usesPacks {
            for (_, m) in model.namedModules() { (m as? BatchNorm2d)?.batchSplit = realPerBatch }
        }
        // Joint training (the upper bound) sees every image of every step so far, all labels.
        let indices: [Int]
        let transform: @Sendable (IndexMask) -> IndexMask
        let stepProtocol = proto
        if options.joint {
            indices = try (0...step).flatMap { try StepProtocol(task: task, step: $0, setting: setting).trainingIndices(train) }
                .reduce(into: [Int]()) { if !$0.contains($1) { $0.append($1) } }.sorted()
            transform = { stepProtocol.jointLabels($0) }
        } else {
            indices = try proto.trainingIndices(train)
            transform = { stepProtocol.trainingLabels($0) }
        }
        guard !indices.isEmpty else { throw DatasetError(file: train.root.path, "no training image holds a class of step \(step)") }
        let augmentation = Augmentation(cropSize: config.cropSize)
        realLoader = BatchLoader(dataset: train, indices: indices, batchSize: realPerBatch, augmentation: augmentation,
                                 normalization: oldCard.normalization, seed: config.seed, labelTransform: transform)
        // The loader draws the same crops from (seed, iteration) whatever the labels' transform.
        let audits = auditRelabelling && options.background == .proto
        auditLoader = audits ? BatchLoader(dataset: train, indices: indices, batchSize: realPerBatch, augmentation: augmentation,
                                           normalization: oldCard.normalization, seed: config.seed, labelTransform: { $0 }) : nil
        relabelAudit = audits ? RelabelAudit(classes: old.numClasses) : nil
        fakeSampler = usesPacks ? PackSampler(packs: packs, batchSize: fake, augmentation: augmentation,
                                              normalization: oldCard.normalization, seed: config.seed) : nil
        var steps = [Int](repeating: step, count: card.classes.count)
        for h in card.history { for c in h.classes where c < steps.count { steps[c] = h.step } }
        stepOfClass = steps
        if options.background == .proto {
            // Prototypes from the packs (no old data); without a pack, from the step's own images.
            var images: [Tensor] = []
            if !packs.isEmpty {
                for p in packs { for r in p.manifest.images { images.append(oldCard.normalization.tensor(try p.image(r))) } }
            } else {
                for i in indices.prefix(64) { images.append(oldCard.normalization.tensor(try train.sample(i).image)) }
            }
            prototypes = Prototypes.compute(old: old, images: images, confidence: options.prototypeConfidence)
        } else {
            prototypes = nil
        }
    }

    public var oldClasses: Int { old.numClasses }

    /// The loss of iteration `it` and its parts (for the progress line).
    public func loss(_ it: Int) throws -> (total: Tensor, parts: [String: Float]) {
        let real = try Profiler.region(.data) { try realLoader.batch(it) }
        let fakeImages = try Profiler.region(.data) { try fakeSampler?.batch(it) }
        let x = fakeImages.map { concatBatch([real.images, $0]) } ?? real.images
        let size = (x.shape[2], x.shape[3])
        let oldOut = withNoGrad { old.run(x, upsample: false) }
        let oldLogits = withNoGrad { resizeBilinear(oldOut.logits, size: size) }
        let newOut = model.run(x)
        let nR = realPerBatch, n = x.shape[0]
        let newReal = fakeImages == nil ? newOut.logits : sliceBatch(newOut.logits, 0..<nR)
        let oldReal = fakeImages == nil ? oldLogits : withNoGrad { sliceBatch(oldLogits, 0..<nR) }
        var parts: [String: Float] = [:]

        var labels = real.labels
        switch options.background {
        case .plain, .unbiased: break
        case .pseudo: labels = withNoGrad { pseudoLabel(labels, oldLogits: oldReal, threshold: options.pseudoEntropy) }
        case .proto:
            labels = withNoGrad {
                prototypes!.relabel(labels, oldLogits: oldReal,
                                    oldFeatures: fakeImages == nil ? oldOut.features : sliceBatch(oldOut.features, 0..<nR), options: options)
            }
            if let auditLoader { relabelAudit?.add(before: real.labels, after: labels, truth: try auditLoader.batch(it).labels) }
        }
        let z = Float(oldClasses) / Float(model.numClasses - oldClasses)
        // Old objects in new images are labelled background: the unbiased CE lets background stand
        // for "background or old" (MiB), also beside prototypical re-labelling (GSC).
        let unbiased = options.background == .unbiased || options.background == .proto
        func weights(_ logits: Tensor, _ l: Labels, backgroundIncludes: Range<Int>?) -> Tensor? {
            options.gradientCompensation
                ? gradientCompensationWeights(logits, l, stepOfClass: stepOfClass, currentStep: proto.step, z: z,
                                              wMin: options.compensationMin, wMax: options.compensationMax,
                                              backgroundIncludes: backgroundIncludes) : nil
        }
        let ceReal = unbiased
            ? unbiasedCrossEntropy(newReal, labels, oldClasses: oldClasses, pixelWeights: weights(newReal, labels, backgroundIncludes: 1..<oldClasses))
            : crossEntropy(newReal, labels, pixelWeights: weights(newReal, labels, backgroundIncludes: nil))
        var total = ceReal
        parts["ce"] = ceReal.item
        if options.realKDWeight > 0 {
            let kd = unbiasedDistillation(newReal, oldReal, temperature: options.kdTemperature)
            total = total + options.realKDWeight * kd
            parts["kd"] = kd.item
        }
        if options.plainKDWeight > 0 {
            let kd = plainDistillation(newReal, oldReal, temperature: options.kdTemperature)
            total = total + options.plainKDWeight * kd
            parts["kd"] = kd.item
        }
        if fakeImages != nil {
            let newFake = sliceBatch(newOut.logits, nR..<n)
            let oldFake = withNoGrad { sliceBatch(oldLogits, nR..<n) }
            let fakeLabels = withNoGrad { confidentLabels(oldFake, threshold: options.fakeConfidence) }
            let ce = options.fakeFoldsNewClasses
                ? foldedCrossEntropy(newFake, fakeLabels, oldClasses: oldClasses,
                                     pixelWeights: weights(newFake, fakeLabels, backgroundIncludes: oldClasses..<model.numClasses))
                : crossEntropy(newFake, fakeLabels, pixelWeights: weights(newFake, fakeLabels, backgroundIncludes: nil))
            let kd = unbiasedDistillation(newFake, oldFake, temperature: options.kdTemperature)
            total = total + options.fakeCEWeight * ce + options.fakeKDWeight * kd
            parts["fake_ce"] = ce.item
            parts["fake_kd"] = kd.item
            if options.featureWeight > 0 {
                let f = mean(square(sliceBatch(newOut.features, nR..<n) - withNoGrad { sliceBatch(oldOut.features, nR..<n) }))
                total = total + options.featureWeight * f
                parts["feat"] = f.item
            }
        }
        if options.softWeight > 0 {
            let s = softDistillation(newOut.logits, oldLogits, temperature: options.softTemperature)
            total = total + options.softWeight * s
            parts["soft"] = s.item
        }
        if options.sharpWeight > 0 {
            let s = sharpEntropy(newOut.logits, oldLogits, confidence: options.sharpConfidence)
            total = total + options.sharpWeight * s
            parts["sharp"] = s.item
        }
        if options.relationWeight > 0 {
            let r = relationDistillation(newOut.logits, oldLogits)
            total = total + options.relationWeight * r
            parts["rel"] = r.item
        }
        return (total, parts)
    }

    /// Re-estimates the new model's batch-norm statistics on `batches` real batches, drawn after
    /// the training iterations' (so with their own augmentation).
    public func recalibrateBatchNorm(batches: Int) throws {
        try updateBatchNorm(model, batches: batches) { b in
            _ = model.run(try realLoader.batch(config.iterations + b).images, upsample: false)
        }
    }

    /// A trainer for the new model; its checkpoint names the step's settings.
    public func makeTrainer(checkpoint: URL?) -> Trainer {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        let opts = String(decoding: (try? encoder.encode(options)) ?? Data(), as: UTF8.self)
        let trainer = Trainer(model: model, config: config, checkpoint: checkpoint,
                              identity: ["hrhf.job": "distill \(proto.task.name) step \(proto.step) \(proto.setting.rawValue)", "hrhf.options": opts])
        trainer.frozenBatchNorm = options.freezeBatchNorm
        return trainer
    }
}

/// The old model's argmax where its probability is at least `threshold`, else 255.
public func confidentLabels(_ logits: Tensor, threshold: Float) -> Labels {
    let (n, _, h, w) = nchw(logits, "confident labels")
    let (indices, best) = channelArgmax(softmax(logits))
    return Labels(shape: [n, h, w], values: zip(indices, best).map { $1 >= threshold ? $0 : 255 })
}
