import ArgumentParser
import Foundation
import HRHF
import HRHFCommandLine

struct DataCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "hrhf-data",
        abstract: "Datasets: generate the procedural Shapes set, list a dataset's per-step image lists.",
        subcommands: [Shapes.self, Lists.self])
}

struct Shapes: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Write the Shapes dataset (20 classes) in VOC layout, deterministic from the seed.")

    @Option(help: "Output directory.") var out: String
    @Option(help: "Training images.") var train: Int = 2000
    @Option(help: "Validation images.") var val: Int = 300
    @Option(help: "Image side in pixels.") var size: Int = 128
    @Option(help: "Random seed.") var seed: UInt64 = 0
    @OptionGroup var compute: ComputeOptions

    func run() throws {
        compute.apply()
        let generator = ShapesGenerator(size: size, seed: seed)
        let progress = ProgressLine("shapes", total: train + val, unit: "img")
        let lock = NSLock()
        try generator.write(to: URL(fileURLWithPath: out), train: train, val: val) { done, _ in
            lock.lock()
            progress.update(done)
            lock.unlock()
        }
        let seconds = progress.finish()
        print(
            formatTable(
                header: ["shapes", ""],
                rows: [
                    ["directory", out], ["train images", "\(train)"], ["val images", "\(val)"],
                    ["size", "\(size)x\(size)"],
                    ["seed", "\(seed)"], ["classes", "20 + background"], ["time", String(format: "%.1f s", seconds)],
                ], leftAligned: true))
    }
}

DataCommand.main()

struct Lists: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Compute (and cache as shareable files) the images each step of a task trains on.")

    @OptionGroup var data: DataOptions
    @Option(help: "Training split to filter.") var split: String = "train"
    @OptionGroup var compute: ComputeOptions

    func run() throws {
        compute.apply()
        let dataset = try data.open(split: split)
        let task = try data.task(dataset)
        var rows: [[String]] = []
        for step in 0..<task.steps.count {
            let proto = StepProtocol(task: task, step: step, setting: data.setting)
            let indices = try proto.trainingIndices(dataset)
            let classes = task.classes(at: step)
            rows.append([
                "\(step)",
                classes.count > 6
                    ? "\(classes.first!)-\(classes.last!)" : classes.map(String.init).joined(separator: ","),
                "\(indices.count)",
            ])
        }
        print(formatTable(header: ["step", "classes", "images"], rows: rows))
        print(
            "task \(task.name), \(data.setting.rawValue), \(dataset.count) \(split) images; lists cached in \(dataset.root.appendingPathComponent(".hrhf-lists").path)"
        )
    }
}
