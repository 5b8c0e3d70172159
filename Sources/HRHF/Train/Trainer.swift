import Foundation

/// Hyper-parameters of a training run. A checkpoint resumes only under the same values.
public struct TrainingConfig: Codable, Equatable, Sendable {
    public var iterations: Int
    public var batchSize: Int
    public var cropSize: Int
    public var learningRate: Float
    public var momentum: Float = 0.9
    public var weightDecay: Float = 1e-4
    public var nesterov = true
    public var polyPower: Float = 0.9
    public var seed: UInt64
    public var checkpointEvery: Int

    public init(
        iterations: Int, batchSize: Int, cropSize: Int, learningRate: Float = 0.01, seed: UInt64 = 0,
        checkpointEvery: Int = 500
    ) {
        self.iterations = iterations
        self.batchSize = batchSize
        self.cropSize = cropSize
        self.learningRate = learningRate
        self.seed = seed
        self.checkpointEvery = checkpointEvery
    }
}

extension Dropout {
    /// Restarts the mask stream, so a resumed run draws the same masks.
    func reseed(_ seed: UInt64) { rng = SeededGenerator(seed: seed) }
}

/// Sets every dropout layer's generator from (seed, iteration, layer index).
public func reseedDropout(_ model: Module, seed: UInt64, iteration: Int) {
    for (i, (_, m)) in model.namedModules().enumerated() {
        (m as? Dropout)?.reseed(
            seed ^ (UInt64(iteration) &* 0x9E37_79B9_7F4A_7C15) ^ (UInt64(i) &* 0xBF58_476D_1CE4_E5B9))
    }
}

/// SGD (nesterov, momentum 0.9, weight decay 1e-4) with the poly schedule, checkpoints every
/// N iterations and resume. Every random choice is keyed on the iteration (batches, dropout),
/// so a resumed run reaches the same weights as an uninterrupted one.
public final class Trainer {
    public let model: Module
    public let config: TrainingConfig
    public let optimizer: SGD
    public let checkpoint: URL?
    public private(set) var iteration = 0
    /// Facts stored with checkpoints (the task, step, method) that must match on resume.
    public let identity: [String: String]
    /// Keep batch norm in evaluation mode while training (running statistics fixed, affine
    /// parameters still learned): for batches whose statistics differ from the test images'.
    public var frozenBatchNorm = false
    /// Set for data-parallel training: losses and gradients are summed over its ranks (the
    /// gradients overlapped with the backward pass), and rank 0 alone writes checkpoints.
    public var dataParallel: DataParallel?

    public init(
        model: Module, parameters: [Tensor]? = nil, config: TrainingConfig, checkpoint: URL?,
        identity: [String: String] = [:]
    ) {
        self.model = model
        self.config = config
        self.checkpoint = checkpoint
        self.identity = identity
        optimizer = SGD(
            parameters ?? model.parameters, learningRate: config.learningRate, momentum: config.momentum,
            weightDecay: config.weightDecay, nesterov: config.nesterov)
    }

    var metadata: [String: String] {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        var m = identity
        m["hrhf.config"] = String(decoding: try! encoder.encode(config), as: UTF8.self)
        return m
    }

    /// Loads the checkpoint when it exists; returns whether it did.
    @discardableResult
    public func resume() throws -> Bool {
        guard let checkpoint, FileManager.default.fileExists(atPath: checkpoint.path) else { return false }
        let file = try SafeTensorsFile.read(checkpoint)
        for (key, value) in metadata where file.metadata[key] != value {
            throw WeightFileError(
                file: checkpoint.path, key: key,
                "checkpoint was made with different settings (\(file.metadata[key] ?? "none")); delete it or use the same options"
            )
        }
        guard let it = file.metadata["hrhf.iteration"].flatMap(Int.init) else {
            throw WeightFileError(file: checkpoint.path, "checkpoint has no iteration count")
        }
        var modelState: [String: Tensor] = [:], optimizerState: [String: Tensor] = [:]
        for (name, t) in file.tensors {
            if name.hasPrefix("model.") { modelState[String(name.dropFirst(6))] = t }
            if name.hasPrefix("optimizer.") { optimizerState[String(name.dropFirst(10))] = t }
        }
        try model.loadStateDict(modelState, source: checkpoint.path)
        optimizer.loadState(optimizerState)
        iteration = it
        return true
    }

    public func saveCheckpoint() throws {
        guard let checkpoint, dataParallel?.communicator.isRoot ?? true else { return }
        var m = metadata
        m["hrhf.iteration"] = String(iteration)
        let tensors =
            model.stateDict().map { ("model.\($0.name)", $0.tensor) }
            + optimizer.stateTensors().map { ("optimizer.\($0.name)", $0.tensor) }
        try SafeTensorsFile(tensors: tensors, metadata: m).write(to: checkpoint)
    }

    /// Runs from the current iteration to `config.iterations` (or `stopAfter` more iterations,
    /// to simulate an interruption in tests). `loss` builds the batch's loss; `report` sees
    /// every finished iteration and its loss value.
    public func run(stopAfter: Int? = nil, loss: (Int) throws -> Tensor, report: (Int, Float) -> Void = { _, _ in })
        throws
    {
        let end = min(config.iterations, stopAfter.map { iteration + $0 } ?? config.iterations)
        model.train()
        if frozenBatchNorm {
            for (_, m) in model.namedModules() where m is BatchNorm2d { m.train(false) }
        }
        // Gradients are summed over the ranks while the backward pass runs (after a first pass
        // that learns the order they finish in).
        let gradientSum = dataParallel.map { OverlappedGradientSum($0, parameters: optimizer.parameters) }
        while iteration < end {
            optimizer.learningRate = LearningRateSchedule.poly(power: config.polyPower)
                .rate(base: config.learningRate, iteration: iteration, total: config.iterations)
            reseedDropout(model, seed: config.seed, iteration: iteration)
            let value = try loss(iteration)
            let item = dataParallel.map { Float($0.communicator.sum(Double(value.item))) } ?? value.item
            guard item.isFinite else {
                throw TrainingError(iteration: iteration, "the loss became \(item)")
            }
            optimizer.zeroGrad()
            gradientSum?.begin()
            value.backward(leafReady: gradientSum?.gradientFinished)
            gradientSum?.finish()
            Profiler.region(.optimizer) { optimizer.step() }
            iteration += 1
            report(iteration, item)
            if config.checkpointEvery > 0 && iteration % config.checkpointEvery == 0 && iteration < config.iterations {
                try saveCheckpoint()
            }
        }
    }
}

/// A training run that cannot go on: a diverged loss, at the iteration it happened.
public struct TrainingError: Error, CustomStringConvertible, Equatable {
    public var iteration: Int
    public var problem: String

    public init(iteration: Int, _ problem: String) {
        self.iteration = iteration
        self.problem = problem
    }

    public var description: String { "training, iteration \(iteration): \(problem)" }
}
