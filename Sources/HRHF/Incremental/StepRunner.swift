import Foundation

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
            throw OptionError(option: "old", "the model has \(old.numClasses) outputs; step \(step) of \(task.name) "
                                  + "needs a model of classes 0-\(seenBefore.count - 1)")
        }
        let newClasses = task.classes(at: step)
        guard newClasses == Array(old.numClasses..<(old.numClasses + newClasses.count)) else {
            throw OptionError(option: "task",
                              "step \(step) of \(task.name) must add classes \(old.numClasses) onwards in order")
        }
        self.old = old
        self.oldCard = oldCard
        old.eval()
        old.setRequiresGrad(false)
        let newClassNames = newClasses.map { $0 < train.classNames.count ? train.classNames[$0] : "class \($0)" }
        switch options.method.classifier {
        case .background: (model, card) = try extendModel(old, card: oldCard, newClassNames: newClassNames, step: step)
        }
        proto = StepProtocol(task: task, step: step, setting: setting)
        self.options = options
        self.config = config
        try options.validate()
        let usesPacks = options.usesFakeHalf
        guard !usesPacks || !packs.isEmpty else {
            throw OptionError(option: "pack", "method \(options.method.name) reads synthetic images: give --pack")
        }
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
        switch options.method.data {
        case .allSteps:
            indices = try (0...step).flatMap { try StepProtocol(task: task, step: $0, setting: setting).trainingIndices(train) }
                .reduce(into: [Int]()) { if !$0.contains($1) { $0.append($1) } }.sorted()
            transform = { stepProtocol.jointLabels($0) }
        case .step:
            indices = try proto.trainingIndices(train)
            transform = { stepProtocol.trainingLabels($0) }
        }
        guard !indices.isEmpty else { throw DatasetError(file: train.root.path, "no training image holds a class of step \(step)") }
        let augmentation = Augmentation(cropSize: config.cropSize)
        realLoader = BatchLoader(dataset: train, indices: indices, batchSize: realPerBatch, augmentation: augmentation,
                                 normalization: oldCard.normalization, seed: config.seed, labelTransform: transform)
        // The loader draws the same crops from (seed, iteration) whatever the labels' transform.
        let audits = auditRelabelling && options.method.background == .proto
        auditLoader = audits ? BatchLoader(dataset: train, indices: indices, batchSize: realPerBatch, augmentation: augmentation,
                                           normalization: oldCard.normalization, seed: config.seed, labelTransform: { $0 }) : nil
        relabelAudit = audits ? RelabelAudit(classes: old.numClasses) : nil
        fakeSampler = usesPacks ? try PackSampler(packs: packs, batchSize: fake, augmentation: augmentation,
                                              normalization: oldCard.normalization, seed: config.seed) : nil
        var steps = [Int](repeating: step, count: card.classes.count)
        for h in card.history { for c in h.classes where c < steps.count { steps[c] = h.step } }
        stepOfClass = steps
        if options.method.background == .proto {
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
        let real = try realLoader.batch(it)
        let fakeImages = try fakeSampler?.batch(it)
        let x = fakeImages.map { concatBatch([real.images, $0]) } ?? real.images
        let size = (x.shape[2], x.shape[3])
        let oldOut = withNoGrad { old.run(x, upsample: false) }
        let oldLogits = withNoGrad { resizeBilinear(oldOut.logits, size: size) }
        let newOut = model.run(x)
        var batch = StepBatch(options: options, new: (newOut.logits, newOut.features),
                              old: (oldLogits, oldOut.features), realCount: realPerBatch, labels: real.labels,
                              oldClasses: oldClasses, stepOfClass: stepOfClass, step: proto.step)
        switch options.method.background {
        case .plain, .unbiased: break
        case .pseudo:
            batch.labels = withNoGrad {
                pseudoLabel(real.labels, oldLogits: batch.oldReal, threshold: options.pseudoEntropy)
            }
        case .proto:
            let oldFeatures = batch.features(.real).old
            batch.labels = withNoGrad {
                prototypes!.relabel(real.labels, oldLogits: batch.oldReal, oldFeatures: oldFeatures, options: options)
            }
            if let auditLoader {
                relabelAudit?.add(before: real.labels, after: batch.labels, truth: try auditLoader.batch(it).labels)
            }
        }
        return try batch.loss()
    }

    /// Re-estimates the new model's batch-norm statistics on `batches` real batches, drawn after
    /// the training iterations' (so with their own augmentation).
    public func recalibrateBatchNorm(batches: Int) throws {
        try updateBatchNorm(model, batches: batches) { b in
            _ = model.run(try realLoader.batch(config.iterations + b).images, upsample: false)
        }
    }

    /// A trainer for the new model; its checkpoint names the step's settings.
    public func makeTrainer(checkpoint: URL?) throws -> Trainer {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        let opts = String(decoding: try encoder.encode(options), as: UTF8.self)
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
