import ArgumentParser
import Foundation
import HRHF
import HRHFCommandLine

struct Eval: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "hrhf-eval",
        abstract: "Evaluate a model on a dataset's validation images for a task and step: per-class IoU, old/new/all.")

    @Option(help: "Native model.") var model: String
    @OptionGroup var data: DataOptions
    @Option(help: "The step whose seen classes are evaluated (default: the model's last).") var step: Int?
    @Option(help: "Split to evaluate.") var split: String = "val"
    @Option(help: "Evaluate only the first N images.") var limit: Int?
    @Option(help: "Write the report as JSON.") var json: String?
    @Option(help: "Append the PLOP-format CSV line.") var csv: String?
    @Option(name: .customLong("save-predictions"), help: "Write palette PNG predictions into DIR.") var savePredictions:
        String?
    @OptionGroup var compute: ComputeOptions

    func run() throws {
        compute.apply()
        let (net, card) = try ModelFile.load(URL(fileURLWithPath: model))
        let dataset = try data.open(split: split)
        let task = try data.task(dataset)
        let step = self.step ?? (card.history.count - 1)
        guard step >= 0 && step < task.steps.count else {
            throw ValidationError("step \(step) is outside task \(task.name)")
        }
        guard net.numClasses >= task.seen(through: step).count else {
            throw ValidationError(
                "the model has \(net.numClasses) outputs, step \(step) of \(task.name) needs \(task.seen(through: step).count)"
            )
        }
        let proto = StepProtocol(task: task, step: step, setting: data.setting)
        let outDir = savePredictions.map { URL(fileURLWithPath: $0) }
        if let limit, limit < 1 { throw ValidationError("--limit must be at least 1, got \(limit)") }
        let count = min(limit ?? dataset.count, dataset.count)
        if let outDir {
            // Every prediction's name is checked before anything is written.
            for i in 0..<count { _ = try outputURL(in: outDir, name: dataset.name(i), suffix: ".png") }
            try FileManager.default.createDirectory(at: outDir, withIntermediateDirectories: true)
        }
        let progress = ProgressLine("eval", total: count, unit: "img")
        let communicator = Communicator.current
        let report = try evaluate(
            model: net, normalization: card.normalization, dataset: dataset, proto: proto,
            limit: limit, communicator: communicator
        ) { i, _, sample, prediction in
            if let outDir {
                let url = try outputURL(in: outDir, name: sample.name, suffix: ".png")
                try ImageIO.writePalettePNG(prediction, to: url)
            }
            progress.update(i + 1)
        }
        progress.finish()
        print(report.table())
        if communicator.isRoot { try writeReport(report, json: json, csv: csv, classCount: net.numClasses) }
    }
}

Eval.mainAsRank()
