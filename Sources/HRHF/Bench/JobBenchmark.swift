import Foundation

/// The zoo model's three everyday jobs, one iteration each, through the code the tools run
/// (issue 23): `hrhf-bench --job` times them and tools/bench_small_torch.py repeats them in PyTorch.
public enum BenchJob: String, CaseIterable, Sendable {
    /// One SegInversion iteration, batch 8 at 128 px: every term, roll and flip, Adam, clip.
    case synth
    /// One MiB iteration on 16 real images: unbiased CE + unbiased KD, SGD.
    case mib
    /// One hrhf+gsc iteration on 8 real + 8 fake images.
    case hrhfGSC = "hrhf+gsc"
}

/// One job set up on a model (and, for distillation, the Shapes data and a pack), ready to run
/// iterations. The distillation step is step 1 of 15-5 (overlap), as the demo's.
public final class JobBenchmark {
    public let job: BenchJob
    /// Images per iteration.
    public let batch: Int
    private let iterate: () throws -> Void
    private let dumpInputs: (URL) throws -> Void

    /// `data` is a Shapes root (`hrhf-data shapes`), needed by mib and hrhf+gsc; `pack` a
    /// synthetic pack, needed by hrhf+gsc.
    public init(job: BenchJob, model: URL, data: URL?, pack: URL?) throws {
        self.job = job
        let (teacher, card) = try ModelFile.load(model)
        switch job {
        case .synth:
            let setup = try SynthesisIterations(teacher: teacher, card: card)
            batch = setup.options.batchSize
            iterate = { setup.iterate() }
            dumpInputs = { try setup.dump(to: $0) }
        case .mib, .hrhfGSC:
            guard let data else {
                throw OptionError(option: "--data", "job \(job.rawValue) needs a Shapes root")
            }
            guard job == .mib || pack != nil else {
                throw OptionError(option: "--pack", "job hrhf+gsc needs a pack")
            }
            let setup = try DistillationIterations(
                job: job, old: teacher, card: card, data: data,
                pack: job == .mib ? nil : pack)
            batch = setup.images
            iterate = { try setup.iterate() }
            dumpInputs = { try setup.dump(to: $0) }
        }
    }

    /// Runs one iteration.
    public func run() throws { try iterate() }

    /// Writes the first iteration's inputs and loss to `directory` (for the PyTorch reference's
    /// parity check), then leaves the job as it was set up. Call before any `run`.
    public func dump(to directory: URL) throws {
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        try dumpInputs(directory)
    }
}

/// The description of a dump, `job.json`: what the reference needs beside the tensors.
private func writeJobDescription(_ fields: [String: Any], options: some Encodable, to directory: URL) throws {
    var all = fields
    all["options"] = try JSONSerialization.jsonObject(with: JSONEncoder().encode(options))
    try writeAtomically(
        JSONSerialization.data(withJSONObject: all, options: [.sortedKeys]),
        to: directory.appendingPathComponent("job.json"))
}

/// SegInversion iterations on a batch of the model's old foreground classes, from run seed 0.
private final class SynthesisIterations {
    let inversion: SegInversion
    let options: InversionOptions
    let targets: [(classes: [Int], areas: [Float])]
    let x: Tensor, best: Tensor
    var bestLoss: [Float]
    let adam: Adam
    var rng: SeededGenerator
    var iteration = 0

    init(teacher: DeepLabV3, card: ModelCard) throws {
        options = InversionOptions()
        inversion = try SegInversion(
            teacher: teacher, normalization: card.normalization,
            classes: Array(1..<teacher.numClasses), options: options)
        rng = SeededGenerator(seed: SegInversion.batchSeed(0, 0))
        targets = inversion.drawTargets(firstIndex: 0, count: options.batchSize, seed: 0, rng: &rng)
        x = Tensor.randn([options.batchSize, 3, options.resolution, options.resolution], rng: &rng)
        best = x.copy()
        bestLoss = [Float](repeating: .infinity, count: options.batchSize)
        x.requiresGrad = true
        adam = Adam([x], learningRate: options.learningRate, betas: (0.5, 0.9))
    }

    var learningRate: Float {
        LearningRateSchedule.cosine.rate(
            base: options.learningRate, iteration: iteration % options.iterations,
            total: options.iterations, warmup: options.warmup)
    }

    /// One iteration as `SegInversion.synthesize` runs it.
    func iterate() {
        adam.learningRate = learningRate
        let view = inversion.drawView(jitter: options.jitter, rng: &rng)
        let (per, loss) = inversion.iterationLoss(x, view: view, targets: targets)
        SegInversion.keepBest(x, per: per, best: best, bestLoss: &bestLoss)
        inversion.update(x, loss: loss, adam: adam)
        iteration += 1
    }

    /// The starting images, the SAA counts, the first iteration's augmentation and loss.
    func dump(to directory: URL) throws {
        try NPY.write(x.detached(), to: directory.appendingPathComponent("x.npy"))
        var probe = rng
        let view = inversion.drawView(jitter: options.jitter, rng: &probe)
        let (_, loss) = inversion.iterationLoss(x, view: view, targets: targets)
        let hw = options.resolution * options.resolution
        let k = inversion.saaCounts(targets, classes: inversion.teacher.numClasses, pixels: hw)
        func rows<T>(_ v: [T]) -> [[T]] {
            let c = inversion.teacher.numClasses
            return stride(from: 0, to: v.count, by: c).map { Array(v[$0..<($0 + c)]) }
        }
        try writeJobDescription(
            [
                "job": BenchJob.synth.rawValue, "loss": loss.item, "kIn": rows(k.kIn),
                "kOut": rows(k.kOut), "kAbs": rows(k.kAbs), "absentWeights": rows(k.absMask),
                "dy": view.roll?.dy ?? 0,
                "dx": view.roll?.dx ?? 0, "flip": view.flip, "learningRate": learningRate,
            ],
            options: options, to: directory)
    }
}

/// Distillation iterations of step 1 of 15-5 through `DistillationStep` and its `Trainer`.
private final class DistillationIterations {
    let job: BenchJob
    let step: DistillationStep
    let trainer: Trainer
    let images: Int

    init(job: BenchJob, old: DeepLabV3, card: ModelCard, data: URL, pack: URL?) throws {
        self.job = job
        let train = try openDataset("shapes", root: data, split: "train")
        let foreground = train.classNames.count - (train.classNames.first == "background" ? 1 : 0)
        let task = try IncrementalTask.named("15-5", foreground: foreground)
        let options = try DistillationOptions.preset(job.rawValue)
        // MiB sees 16 real images; hrhf+gsc 8 real and as many fake ones.
        let config = TrainingConfig(
            iterations: 1 << 20, batchSize: pack == nil ? 16 : 8, cropSize: 128,
            learningRate: 0.01, seed: 0, checkpointEvery: 0)
        let packs = try pack.map { [try SyntheticPack(url: $0)] } ?? []
        step = try DistillationStep(
            old: old, oldCard: card, train: train, task: task, step: 1, setting: .overlap,
            packs: packs, options: options, config: config)
        trainer = try step.makeTrainer(checkpoint: nil)
        images = step.data.realPerBatch + (step.data.fakeSampler?.batchSize ?? 0)
    }

    /// One iteration as `hrhf-distill` runs it: the loss (data, both models, the terms), backward, SGD.
    func iterate() throws {
        try trainer.run(stopAfter: 1, loss: { it in try Profiler.region(.loss) { try step.loss(it).total } })
    }

    /// The first batch (real images, their labels before re-labelling, fake images), the
    /// prototypes (NaN rows for classes without one) and the first loss with dropout off.
    func dump(to directory: URL) throws {
        let real = try step.data.realLoader.batch(0)
        try NPY.write(real.images, to: directory.appendingPathComponent("real.npy"))
        try NPY.write(
            Tensor(shape: real.labels.shape, values: real.labels.values.map(Float.init)),
            to: directory.appendingPathComponent("labels.npy"))
        if let fake = try step.data.fakeSampler?.batch(0) {
            try NPY.write(fake, to: directory.appendingPathComponent("fake.npy"))
        }
        if let prototypes = step.models.prototypes {
            let rows = prototypes.vectors.flatMap { $0 ?? [Float](repeating: .nan, count: prototypes.channels) }
            try NPY.write(
                Tensor(shape: [prototypes.vectors.count, prototypes.channels], values: rows),
                to: directory.appendingPathComponent("prototypes.npy"))
        }
        let model = step.model
        let state = model.stateDict().map { ($0.name, $0.tensor.copy()) }
        model.train()
        for (_, m) in model.namedModules() where m is Dropout { m.train(false) }
        let (loss, parts) = try step.loss(0)
        model.train()
        // The batch-norm running statistics that forward moved are put back.
        for ((_, t), (_, saved)) in zip(model.stateDict(), state) { t.assign(saved) }
        try writeJobDescription(
            [
                "job": job.rawValue, "loss": loss.item, "parts": parts,
                "newClasses": model.numClasses - step.models.old.numClasses, "fake": step.data.fakeSampler != nil,
                "learningRate": step.config.learningRate,
            ],
            options: step.options, to: directory)
    }
}
