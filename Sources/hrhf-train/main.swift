import ArgumentParser
import Foundation
import HRHF
import HRHFCommandLine

struct Train: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "hrhf-train",
        abstract: "Step-0 training of a DeepLabV3 on the base classes of a task (later steps: hrhf-distill).")

    @OptionGroup var data: DataOptions
    @Option(help: "Architecture preset or description JSON.") var arch: String = "deeplabv3-small"
    @Option(help: "Training iterations (batches).") var iterations: Int?
    @Option(help: "Passes over the step's images (alternative to --iterations).") var epochs: Int?
    @Option(help: "Images per batch.") var batch: Int = 8
    @Option(help: "Square training crop in pixels.") var crop: Int = 128
    @Option(help: "Base learning rate (SGD, nesterov, momentum 0.9, weight decay 1e-4, poly 0.9).") var lr: Float = 0.01
    @Option(name: .customLong("checkpoint-every"), help: "Iterations between checkpoints.") var checkpointEvery: Int =
        200
    @Option(help: "Checkpoint file (default: OUT.ckpt).") var checkpoint: String?
    @Flag(help: "Continue from the checkpoint if there is one.") var resume = false
    @Option(help: "Random seed.") var seed: UInt64 = 0
    @Option(name: .customLong("eval-limit"), help: "Validation images to evaluate at the end (default all).")
    var evalLimit: Int?
    @Option(help: "Write the final evaluation as JSON.") var json: String?
    @Option(help: "Append the PLOP-format CSV line of the final evaluation.") var csv: String?
    @Option(help: "Native model to write.") var out: String
    @Flag(name: .customLong("sync-bn"), help: "Under mpirun: batch norm statistics over every rank's images (SyncBN).")
    var syncBN = false
    @OptionGroup var compute: ComputeOptions

    func run() throws {
        compute.apply()
        let train = try data.open(split: "train")
        let val = try? data.open(split: "val")
        let task = try data.task(train)
        let proto = StepProtocol(task: task, step: 0, setting: data.setting)
        let count = try proto.trainingIndices(train).count
        guard let total = iterations ?? epochs.map({ max(1, $0 * max(1, count / batch)) }) else {
            throw ValidationError("give --iterations or --epochs")
        }
        var config = TrainingConfig(
            iterations: total, batchSize: batch, cropSize: crop, learningRate: lr, seed: seed,
            checkpointEvery: checkpointEvery)
        config.seed = seed
        var job = StepZeroJob(
            architecture: try ArchitectureDescription.resolve(arch), train: train, val: val,
            task: task, setting: data.setting, config: config)
        let communicator = Communicator.current
        job.communicator = communicator
        if syncBN { BatchNormSync.communicator = communicator }
        let model = try job.makeModel()
        let checkpointURL = URL(fileURLWithPath: checkpoint ?? out + ".ckpt")
        let (trainer, loader) = try job.makeTrainer(model: model, checkpoint: checkpointURL)
        if resume, try trainer.resume() {
            print(resumeLine(checkpoint: checkpointURL, iterationsDone: trainer.iteration, of: total))
        } else if !resume, FileManager.default.fileExists(atPath: checkpointURL.path) {
            throw ValidationError("\(checkpointURL.path) exists: pass --resume to continue it, or delete it")
        }
        print(
            "step 0 of \(task.name) (\(data.setting.rawValue)): classes 0-\(task.steps[0].last!), \(count) images, "
                + "\(total) iterations of \(batch) at \(crop)px, \(model.parameterCount) parameters")
        let progress = ProgressLine("train", total: total, unit: "it", alreadyDone: trainer.iteration)
        var smoothed: Float?
        let parallel = trainer.dataParallel
        try trainer.run(loss: { it in supervisedLoss(model, try loader.batch(it), parallel: parallel) }) { it, loss in
            smoothed = smoothed.map { 0.98 * $0 + 0.02 * loss } ?? loss
            progress.update(it, detail: String(format: "loss %.4f", smoothed!))
        }
        let seconds = progress.finish()
        var notes = [
            "command": invocation, "dataset": data.data, "task": task.name, "step": "0",
            "setting": data.setting.rawValue, "iterations": "\(total)",
            "train_seconds": String(format: "%.0f", seconds),
        ]
        var summary: [[String]] = [
            ["iterations", "\(total)"], ["time", formatDuration(seconds)],
            ["final loss (smoothed)", String(format: "%.4f", smoothed ?? .nan)],
        ]
        if communicator.size > 1 {
            summary.append(["ranks x threads", "\(communicator.size) x \(compute.threads)"])
            summary.append(["allreduce per iteration (rank 0)", allreduceSummary(communicator, iterations: total)])
        }
        if let val {
            let report = try evaluate(
                model: model, normalization: job.normalization, dataset: val, proto: proto,
                limit: evalLimit, communicator: communicator)
            print(report.table())
            notes["val_miou_all"] = String(format: "%.4f", report.all ?? 0)
            notes["val_images"] = "\(report.images)"
            summary.append(["val mIoU all (classes 0-\(task.steps[0].last!))", IoUReport.percent(report.all) + "%"])
            if communicator.isRoot { try writeReport(report, json: json, csv: csv, classCount: model.numClasses) }
        }
        guard communicator.isRoot else { return }
        try ModelFile.save(model, card: job.card(for: model, notes: notes), to: URL(fileURLWithPath: out))
        try? FileManager.default.removeItem(at: checkpointURL)
        summary.append(["model", out])
        print(formatTable(header: ["training", ""], rows: summary, leftAligned: true))
    }
}

Train.mainAsRank()
