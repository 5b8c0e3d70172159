import Foundation

/// A step's data: batches of its real images (and the same batches with their full masks, for
/// the re-labelling audit) and, for a method with fake-half terms, of the packs' images.
public struct StepData {
    public let realLoader: BatchLoader
    public let fakeSampler: PackSampler?
    public let realPerBatch: Int
    /// The training images, as dataset indices.
    public var indices: [Int] { realLoader.indices }
    let auditLoader: BatchLoader?

    init(
        train: SegmentationDataset, proto: StepProtocol, packs: [SyntheticPack], options: DistillationOptions,
        config: TrainingConfig, normalization: Normalization, auditRelabelling: Bool
    ) throws {
        let usesPacks = options.usesFakeHalf
        guard !usesPacks || !packs.isEmpty else {
            throw OptionError(option: "pack", "method \(options.method.name) reads synthetic images: give --pack")
        }
        // Every method sees the same real images per batch; the pack methods add fake ones so
        // that they are `fakeRatio` of the whole batch (as many as the real ones at 0.5).
        let perBatch = config.batchSize
        realPerBatch = perBatch
        let fakeShare = options.fakeRatio / (1 - options.fakeRatio)
        let fake = usesPacks ? max(1, Int((Float(config.batchSize) * fakeShare).rounded())) : 0
        let indices: [Int]
        let transform: @Sendable (IndexMask) -> IndexMask
        switch options.method.trainingSet {
        case .allSteps:
            indices = try (0...proto.step).flatMap {
                try StepProtocol(task: proto.task, step: $0, setting: proto.setting).trainingIndices(train)
            }.reduce(into: [Int]()) { if !$0.contains($1) { $0.append($1) } }.sorted()
            transform = { proto.jointLabels($0) }
        case .step:
            indices = try proto.trainingIndices(train)
            transform = { proto.trainingLabels($0) }
        }
        guard !indices.isEmpty else {
            throw DatasetError(file: train.root.path, "no training image holds a class of step \(proto.step)")
        }
        let augmentation = Augmentation(cropSize: config.cropSize)
        func loader(_ labels: @escaping @Sendable (IndexMask) -> IndexMask) -> BatchLoader {
            BatchLoader(
                dataset: train, indices: indices, batchSize: perBatch, augmentation: augmentation,
                normalization: normalization, seed: config.seed, labelTransform: labels)
        }
        realLoader = loader(transform)
        // The loader draws the same crops from (seed, iteration) whatever the labels' transform.
        auditLoader = auditRelabelling && options.method.background == .proto ? loader { $0 } : nil
        fakeSampler =
            usesPacks
            ? try PackSampler(
                packs: packs, batchSize: fake, augmentation: augmentation,
                normalization: normalization, seed: config.seed, firstSlot: perBatch,
                minimumAchievedShare: options.fakeMinimumAchievedShare) : nil
    }
}

/// A step's models: the old one (frozen, in evaluation mode), the new one grown from it as the
/// method says, the old model's class prototypes for prototypical re-labelling and its
/// pseudo-labelling thresholds for PLOP's.
public struct StepModels {
    public let old: DeepLabV3
    public let oldCard: ModelCard
    public let model: DeepLabV3
    public let card: ModelCard
    public let prototypes: Prototypes?
    public let pseudoThresholds: PseudoLabelThresholds?
    /// The step that added each class of the new model.
    let stepOfClass: [Int]

    /// The old model must hold the classes of the steps before, the step add the next ones.
    static func check(old: DeepLabV3, proto: StepProtocol) throws {
        let (task, step) = (proto.task, proto.step)
        let seenBefore = task.seen(through: step - 1)
        guard old.numClasses == seenBefore.count, seenBefore == Array(0..<seenBefore.count) else {
            throw OptionError(
                option: "old",
                "the model has \(old.numClasses) outputs; step \(step) of \(task.name) "
                    + "needs a model of classes 0-\(seenBefore.count - 1)")
        }
        let newClasses = task.classes(at: step)
        guard newClasses == Array(old.numClasses..<(old.numClasses + newClasses.count)) else {
            throw OptionError(
                option: "task",
                "step \(step) of \(task.name) must add classes \(old.numClasses) onwards in order")
        }
    }

    init(
        old: DeepLabV3, oldCard: ModelCard, train: SegmentationDataset, proto: StepProtocol, data: StepData,
        packs: [SyntheticPack], options: DistillationOptions, seed: UInt64
    ) throws {
        try Self.check(old: old, proto: proto)
        let (task, step) = (proto.task, proto.step)
        self.old = old
        self.oldCard = oldCard
        old.eval()
        old.setRequiresGrad(false)
        let newClassNames = task.classes(at: step).map {
            $0 < train.classNames.count ? train.classNames[$0] : "class \($0)"
        }
        (model, card) = try extendModel(
            old, card: oldCard, newClassNames: newClassNames, step: step,
            initialisation: options.method.classifier, seed: seed)
        if options.splitBatchNorm && options.usesFakeHalf {
            for (_, m) in model.namedModules() { (m as? BatchNorm2d)?.batchSplit = data.realPerBatch }
        }
        var steps = [Int](repeating: step, count: card.classes.count)
        for h in card.history { for c in h.classes where c < steps.count { steps[c] = h.step } }
        stepOfClass = steps
        if options.method.background == .pseudo {
            // One pass over the step's training batches, as PLOP's find_median does before training.
            let loader = data.realLoader
            pseudoThresholds = try PseudoLabelThresholds.measure(
                batches: loader.batchesPerEpoch, classesAfterStep: card.classes.count, base: options.pseudoBaseThreshold
            ) { i in
                let batch = try loader.batch(i)
                return (withNoGrad { old.run(batch.images).logits }, batch.labels)
            }
        } else {
            pseudoThresholds = nil
        }
        guard options.method.background == .proto else {
            prototypes = nil
            return
        }
        // Prototypes from the packs (no old data); without a pack, from the step's own images.
        var images: [Tensor] = []
        if !packs.isEmpty {
            for p in packs {
                for r in p.manifest.images { images.append(oldCard.normalization.tensor(try p.image(r))) }
            }
        } else {
            for i in data.indices.prefix(64) { images.append(oldCard.normalization.tensor(try train.sample(i).image)) }
        }
        prototypes = Prototypes.compute(old: old, images: images, confidence: options.prototypeConfidence)
    }
}

/// One incremental step: its data, its models, and its method's loss on each batch.
public final class DistillationStep {
    public let proto: StepProtocol
    public let options: DistillationOptions
    public let config: TrainingConfig
    public let data: StepData
    public let models: StepModels
    /// With `auditRelabelling`: how re-labelling fared on the batches so far (this rank's).
    public private(set) var relabelAudit: RelabelAudit?
    /// Sums the loss terms' batch-wide statistics over the ranks sharing each batch (IncrementalRun's
    /// `share(with:)`); one process by default.
    var reduction = BatchReduction.local

    public init(
        old: DeepLabV3, oldCard: ModelCard, train: SegmentationDataset, task: IncrementalTask, step: Int,
        setting: IncrementalSetting, packs: [SyntheticPack], options: DistillationOptions,
        config: TrainingConfig, auditRelabelling: Bool = false
    ) throws {
        precondition(step >= 1, "step 0 is trained with hrhf-train")
        try options.validate()
        proto = StepProtocol(task: task, step: step, setting: setting)
        try StepModels.check(old: old, proto: proto)
        self.options = options
        self.config = config
        data = try StepData(
            train: train, proto: proto, packs: packs, options: options, config: config,
            normalization: oldCard.normalization, auditRelabelling: auditRelabelling)
        models = try StepModels(
            old: old, oldCard: oldCard, train: train, proto: proto, data: data, packs: packs,
            options: options, seed: config.seed)
        relabelAudit = data.auditLoader == nil ? nil : RelabelAudit(classes: old.numClasses)
    }

    /// The new model.
    public var model: DeepLabV3 { models.model }

    /// The loss of iteration `it` and its parts (for the progress line).
    public func loss(_ it: Int) throws -> (total: Tensor, parts: [String: Float]) {
        let real = try Profiler.region(.data) { try data.realLoader.batch(it) }
        let fakeImages = try Profiler.region(.data) { try data.fakeSampler?.batch(it) }
        let x = fakeImages.map { concatBatch([real.images, $0]) } ?? real.images
        let size = (x.shape[2], x.shape[3])
        let localPOD = options.method.terms.contains { $0.term == .pod }
        let oldOut = withNoGrad { models.old.run(x, upsample: false, stageSums: localPOD) }
        let oldLogits = withNoGrad { resizeBilinear(oldOut.logits, size: size) }
        var newOut: SegmentationOutput
        var newSmallLogits: Tensor?
        if localPOD {
            newOut = models.model.run(x, upsample: false, stageSums: true)
            newSmallLogits = newOut.logits
            newOut.logits = resizeBilinear(newOut.logits, size: size)
        } else {
            newOut = models.model.run(x)
        }
        var batch = StepBatch(
            options: options, new: (newOut.logits, newOut.features),
            old: (oldLogits, oldOut.features), realCount: real.images.shape[0], labels: real.labels,
            oldClasses: models.old.numClasses, stepOfClass: models.stepOfClass, step: proto.step,
            reduction: reduction)
        if let newSmallLogits {
            batch.pod = (
                newOut.stageSums + [newOut.features, newSmallLogits],
                oldOut.stageSums + [oldOut.features, oldOut.logits]
            )
        }
        switch options.method.background {
        case .plain, .unbiased: break
        case .pseudo:
            (batch.labels, batch.realPixelWeights) = withNoGrad {
                plopPseudoLabels(
                    real.labels, oldLogits: batch.oldReal, oldClasses: models.old.numClasses,
                    thresholds: models.pseudoThresholds!, reduction: reduction)
            }
        case .proto:
            let oldFeatures = batch.features(.real).old
            batch.labels = withNoGrad {
                models.prototypes!.relabel(
                    real.labels, oldLogits: batch.oldReal, oldFeatures: oldFeatures,
                    options: options, oldPrediction: batch.oldPrediction(.real))
            }
            if let auditLoader = data.auditLoader {
                relabelAudit?.add(before: real.labels, after: batch.labels, truth: try auditLoader.batch(it).labels)
            }
        }
        return try batch.loss()
    }

    /// Re-estimates the new model's batch-norm statistics on `batches` real batches, drawn after
    /// the training iterations' (so with their own augmentation).
    public func recalibrateBatchNorm(batches: Int) throws {
        try updateBatchNorm(model, batches: batches) { b in
            _ = model.run(try data.realLoader.batch(config.iterations + b).images, upsample: false)
        }
    }

    /// A trainer for the new model; its checkpoint names the step's settings.
    public func makeTrainer(checkpoint: URL?) throws -> Trainer {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        let opts = String(decoding: try encoder.encode(options), as: UTF8.self)
        let job = "distill \(proto.task.name) step \(proto.step) \(proto.setting.rawValue)"
        let trainer = Trainer(
            model: model, config: config, checkpoint: checkpoint,
            identity: ["hrhf.job": job, "hrhf.options": opts])
        trainer.frozenBatchNorm = options.freezeBatchNorm
        return trainer
    }
}

/// The old model's argmax where its probability is at least `threshold`, else 255.
public func confidentLabels(_ logits: Tensor, threshold: Float) -> Labels {
    OldPrediction(logits).confidentLabels(threshold: threshold)
}
