import Foundation

/// Which classes the pack made after each step of a multi-step run holds.
public enum StepPackClasses: String, Codable, Sendable, CaseIterable {
    /// Only the classes the step just learned; the earlier packs stay in use (a pack made by a
    /// model is best on the classes that model learned last, and images of the earlier classes
    /// are already in the earlier packs).
    case new
    /// Every old foreground class; the new pack replaces the earlier ones.
    case all
    /// No pack between steps: every step uses the packs given at the start (the classes
    /// learned since are kept by distillation on the real images only).
    case none
}

/// A pack a multi-step run needs after a step: `classes` synthesised from the model the step
/// wrote (`teacher`), written to `out`; a pack left unfinished there is resumed.
public struct PackRequest: Sendable {
    public var afterStep: Int
    public var teacher: URL
    public var classes: [Int]
    public var seed: UInt64
    public var out: URL
}

/// Steps `firstStep...lastStep` of a task in one go, as a user would script them: each step
/// distils from the previous model; between steps `synthesize` makes a pack from the new model
/// when the method uses packs (see `StepPackClasses`). Finished steps (their model file exists)
/// are skipped, an interrupted step resumes from its checkpoint.
public struct IncrementalRun {
    public var old: URL
    public var train: SegmentationDataset
    public var val: SegmentationDataset?
    public var task: IncrementalTask
    public var firstStep: Int
    public var lastStep: Int
    public var setting: IncrementalSetting
    public var packs: [URL]
    public var options: DistillationOptions
    public var config: TrainingConfig
    public var stepPackClasses: StepPackClasses
    /// Synthesis is passed in, so that distillation does not depend on it.
    public var synthesize: (PackRequest) throws -> Void
    public var out: URL
    public var evalLimit: Int?
    /// Count how prototypical re-labelling fares against the training images' full masks.
    public var auditRelabelling = false
    /// The ranks that share every batch (one process by default). Rank 0 alone writes models;
    /// `synthesize` is called on every rank.
    public var communicator: Communicator = .single

    public init(
        old: URL, train: SegmentationDataset, val: SegmentationDataset?, task: IncrementalTask, firstStep: Int,
        lastStep: Int, setting: IncrementalSetting, packs: [URL], options: DistillationOptions,
        config: TrainingConfig, stepPackClasses: StepPackClasses = .new,
        synthesize: @escaping (PackRequest) throws -> Void, out: URL, evalLimit: Int? = nil
    ) {
        self.old = old
        self.train = train
        self.val = val
        self.task = task
        self.firstStep = firstStep
        self.lastStep = lastStep
        self.setting = setting
        self.packs = packs
        self.options = options
        self.config = config
        self.stepPackClasses = stepPackClasses
        self.synthesize = synthesize
        self.out = out
        self.evalLimit = evalLimit
    }

    /// Where step `s`'s model goes: `out` for the last step, `OUT-stepS.safetensors` before.
    public func modelURL(step s: Int) -> URL {
        s == lastStep ? out : URL(fileURLWithPath: out.deletingPathExtension().path + "-step\(s).safetensors")
    }

    public func packURL(afterStep s: Int) -> URL {
        URL(fileURLWithPath: out.deletingPathExtension().path + "-step\(s)-pack.tar")
    }

    /// Events for the caller's display.
    public enum Event {
        /// A step whose model an earlier run wrote: kept, not trained again.
        case stepAlreadyDone(step: Int, model: URL)
        /// `checkpoint` is the file the step resumes from (nil for a fresh start) at `resumedAt`.
        case stepStarted(step: Int, images: Int, packs: Int, iterations: Int, checkpoint: URL?, resumedAt: Int)
        case iteration(step: Int, done: Int, total: Int, loss: Float, parts: [String: Float])
        case stepFinished(step: Int, report: IoUReport?, seconds: Double, model: URL)
        /// The re-labelling audit of a step's iterations (those run in this process).
        case relabelAudit(step: Int, audit: RelabelAudit)
        /// The fake half of a step draws from `kept` of the packs' `offered` images: those that
        /// reached `share` of their asked areas (`DistillationOptions.fakeMinimumAchievedShare`).
        case fakeImagesKept(step: Int, kept: Int, offered: Int, share: Float)
    }

    public func run(_ event: @escaping (Event) -> Void) throws -> [IoUReport] {
        var reports: [IoUReport] = []
        var previous = old
        var currentPacks = packs
        for step in firstStep...lastStep {
            let target = modelURL(step: step)
            let (oldModel, oldCard) = try ModelFile.load(previous)
            if FileManager.default.fileExists(atPath: target.path) {
                event(.stepAlreadyDone(step: step, model: target))
                previous = target
            } else {
                let loaded = try currentPacks.map { try SyntheticPack(url: $0) }
                var stepConfig = config
                stepConfig.seed = config.seed &+ UInt64(step)
                let runner = try DistillationStep(
                    old: oldModel, oldCard: oldCard, train: train, task: task, step: step,
                    setting: setting, packs: loaded, options: options,
                    config: stepConfig, auditRelabelling: auditRelabelling)
                let checkpoint = URL(fileURLWithPath: target.path + ".ckpt")
                let trainer = try runner.makeTrainer(checkpoint: checkpoint)
                try runner.share(with: DataParallel(communicator), trainer: trainer)
                let resumed = try trainer.resume()
                event(
                    .stepStarted(
                        step: step, images: runner.data.indices.count, packs: loaded.count,
                        iterations: stepConfig.iterations, checkpoint: resumed ? checkpoint : nil,
                        resumedAt: trainer.iteration))
                if let share = options.fakeMinimumAchievedShare, let sampler = runner.data.fakeSampler {
                    event(.fakeImagesKept(step: step, kept: sampler.count, offered: sampler.offered, share: share))
                }
                let start = Date()
                var parts: [String: Float] = [:]
                try trainer.run(loss: { it in
                    let (total, p) = try runner.loss(it)
                    parts = p
                    return total
                }) { done, loss in
                    event(.iteration(step: step, done: done, total: stepConfig.iterations, loss: loss, parts: parts))
                }
                if var audit = runner.relabelAudit {
                    for counts in RelabelAudit.counts { communicator.allreduceSum(&audit[keyPath: counts]) }
                    event(.relabelAudit(step: step, audit: audit))
                }
                try runner.recalibrateBatchNorm(batches: options.batchNormRecalibration)
                var report: IoUReport?
                var card = runner.models.card
                if let val {
                    report = try evaluate(
                        model: runner.model, normalization: card.normalization, dataset: val,
                        proto: runner.proto, limit: evalLimit, communicator: communicator)
                    card.notes["step\(step)_val_miou_all"] = String(format: "%.4f", report!.all ?? 0)
                }
                card.notes["step\(step)_method"] = options.method.name
                if communicator.isRoot {
                    try ModelFile.save(runner.model, card: card, to: target)
                    if FileManager.default.fileExists(atPath: checkpoint.path) {
                        try FileManager.default.removeItem(at: checkpoint)
                    }
                }
                // The next step reads the model rank 0 has just written.
                communicator.barrier()
                let seconds = Date().timeIntervalSince(start)
                event(.stepFinished(step: step, report: report, seconds: seconds, model: target))
                if let report { reports.append(report) }
                previous = target
            }
            // The next step's pack, from this step's model.
            let usesPacks = options.usesFakeHalf || options.method.background == .proto && !packs.isEmpty
            if step < lastStep && usesPacks && stepPackClasses != .none {
                let packURL = packURL(afterStep: step)
                if !FileManager.default.fileExists(atPath: packURL.path) {
                    // The step's model holds the classes seen so far, 0..<n (DistillationStep checks).
                    let classes =
                        stepPackClasses == .new
                        ? task.classes(at: step)
                        : Array(1..<task.seen(through: step).count)
                    try synthesize(
                        PackRequest(
                            afterStep: step, teacher: previous, classes: classes,
                            seed: config.seed &+ UInt64(100 + step), out: packURL))
                    communicator.barrier()
                }
                currentPacks = stepPackClasses == .new ? currentPacks + [packURL] : [packURL]
            }
        }
        return reports
    }
}

extension RelabelAudit {
    /// The per-class counts, to be summed over ranks.
    static let counts: [WritableKeyPath<RelabelAudit, [Int]>] = [\.right, \.wrongBackground, \.wrongOther, \.missed]
}

extension DistillationStep {
    /// Shares every batch of the step among the ranks of `parallel` (nothing to do for one
    /// process): each rank builds its contiguous shares of the real and of the fake images, draws
    /// their dropout masks, normalises its real and fake shares apart under split batch norm, and
    /// sums the loss terms' statistics and the gradients over the ranks. Each rank needs at least
    /// one real and (for a method with fake images) one fake image of every batch.
    func share(with parallel: DataParallel, trainer: Trainer) throws {
        let ranks = parallel.communicator.size
        guard ranks > 1 else { return }
        let real = data.realPerBatch, fake = data.fakeSampler?.batchSize ?? 0
        guard real >= ranks, fake == 0 || fake >= ranks else {
            throw OptionError(
                option: "--batch",
                "a batch of \(real) real and \(fake) fake images cannot be shared by \(ranks) ranks: "
                    + "each rank needs at least one real\(fake > 0 ? " and one fake" : "") image")
        }
        data.realLoader.share = parallel.share(of: real)
        data.auditLoader?.share = parallel.share(of: real)
        data.fakeSampler?.share = parallel.share(of: fake)
        parallel.shareDropout(model, batchSizes: fake > 0 ? [real, fake] : [real])
        for (_, m) in model.namedModules() {
            guard let bn = m as? BatchNorm2d, bn.batchSplit != nil else { continue }
            bn.batchSplit = parallel.share(of: real).count
        }
        reduction = BatchReduction(parallel.communicator)
        trainer.dataParallel = parallel
    }
}
