import Foundation

/// Cross-entropy on a batch's labels (ignore 255), plus half of it on the auxiliary head's
/// logits when the network has one (torchvision's aux_loss weight).
/// Under data parallelism, this rank's share of the global batch's loss (see `DataParallel.weighted`).
public func supervisedLoss(_ model: DeepLabV3, _ batch: Batch, parallel: DataParallel? = nil) -> Tensor {
    let out = model.run(batch.images)
    var loss = crossEntropy(out.logits, batch.labels)
    if let aux = out.auxLogits { loss = loss + 0.5 * crossEntropy(aux, batch.labels) }
    return parallel.map { $0.weighted(loss, labels: batch.labels) } ?? loss
}

/// What a step-0 training run needs to know.
public struct StepZeroJob {
    public var architecture: ArchitectureDescription
    public var train: SegmentationDataset
    public var val: SegmentationDataset?
    public var task: IncrementalTask
    public var setting: IncrementalSetting
    public var config: TrainingConfig
    public var normalization: Normalization = .imagenet
    /// The ranks that share every batch (one process by default).
    public var communicator: Communicator = .single

    public init(
        architecture: ArchitectureDescription, train: SegmentationDataset, val: SegmentationDataset?,
        task: IncrementalTask, setting: IncrementalSetting, config: TrainingConfig
    ) {
        self.architecture = architecture
        self.train = train
        self.val = val
        self.task = task
        self.setting = setting
        self.config = config
    }

    /// The network with one output per step-0 class, ids 0...N.
    public func makeModel() throws -> DeepLabV3 {
        var arch = architecture
        let base = task.steps[0]
        guard base == Array(0..<base.count) else {
            throw DatasetError(file: task.name, "step 0 must hold classes 0...N in order for a new model")
        }
        arch.classesPerStep = [base.count]
        return try DeepLabV3(arch, seed: config.seed)
    }

    public func card(for model: DeepLabV3, notes: [String: String]) -> ModelCard {
        ModelCard(
            architecture: model.architecture, classNames: Array(train.classNames.prefix(model.numClasses)),
            normalization: normalization, notes: notes)
    }

    /// The trainer with its loader, ready to resume or start.
    public func makeTrainer(model: DeepLabV3, checkpoint: URL?) throws -> (Trainer, BatchLoader) {
        let proto = StepProtocol(task: task, step: 0, setting: setting)
        let indices = try proto.trainingIndices(train)
        guard !indices.isEmpty else {
            throw DatasetError(file: train.root.path, "no training image holds a class of step 0")
        }
        let loader = BatchLoader(
            dataset: train, indices: indices, batchSize: config.batchSize,
            augmentation: Augmentation(cropSize: config.cropSize), normalization: normalization,
            seed: config.seed, labelTransform: { proto.trainingLabels($0) })
        let trainer = Trainer(
            model: model, config: config, checkpoint: checkpoint,
            identity: ["hrhf.job": "step0 \(task.name) \(setting.rawValue) \(model.architecture.name)"])
        if communicator.size > 1 {
            guard config.batchSize >= communicator.size else {
                throw DatasetError(
                    file: train.root.path,
                    "a batch of \(config.batchSize) cannot be shared by \(communicator.size) ranks")
            }
            let parallel = DataParallel(communicator)
            loader.share = parallel.share(of: config.batchSize)
            parallel.shareDropout(model, batchSizes: [config.batchSize])
            trainer.dataParallel = parallel
        }
        return (trainer, loader)
    }
}
