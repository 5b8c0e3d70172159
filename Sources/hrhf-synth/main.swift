import ArgumentParser
import Foundation
import HRHF
import HRHFCommandLine

struct Synth: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "hrhf-synth",
        abstract:
            "Invert a model into synthetic images of its old classes (SegInversion + Scale-Aware Aggregation) and archive them as a pack."
    )

    @Option(help: "The teacher: a native model.") var model: String
    @Option(help: "Old classes to synthesise, e.g. 1-15.") var classes: String
    @Option(help: "Images in the pack.") var count: Int = 64
    @Option(help: "The pack to write (a tar).") var out: String
    @Option(help: "Random seed: the same seed and options give a byte-identical pack.") var seed: UInt64 = 0
    @Option(
        help: ArgumentHelp(
            "Make the K-th of N disjoint parts (K/N), for array jobs; join with hrhf-pack merge. "
                + "'auto': K and N from Slurm's SLURM_ARRAY_TASK_ID/COUNT or Kubernetes' "
                + "JOB_COMPLETION_INDEX."))
    var shard: String?
    @Option(
        name: .customLong("shard-count"),
        help: "N for --shard auto (required with Kubernetes: its Job's completions).")
    var shardCount: Int?
    @Flag(help: "Continue an interrupted run from its last complete batch.") var resume = false
    @OptionGroup var synthesis: SynthesisOptionGroup
    @OptionGroup var compute: ComputeOptions

    func run() throws {
        compute.apply()
        let modelURL = URL(fileURLWithPath: model)
        let (net, card) = try ModelFile.load(modelURL)
        var shardValue: (Int, Int)?
        if shard == "auto" {
            shardValue = try shardFromEnvironment(ProcessInfo.processInfo.environment, count: shardCount)
        } else if let shard {
            let parts = shard.split(separator: "/").compactMap { Int($0) }
            guard parts.count == 2, parts[0] >= 1, parts[0] <= parts[1] else {
                throw ValidationError("--shard takes K/N with 1 <= K <= N")
            }
            shardValue = (parts[0], parts[1])
        }
        let job = SynthesisJob(
            teacherURL: modelURL, model: net, card: card, classes: try parseClassList(classes), count: count,
            options: synthesis.options, seed: seed, shard: shardValue, out: URL(fileURLWithPath: out))
        let iterations = job.batches.count * synthesis.iterations
        var progress: ProgressLine?
        let communicator = Communicator.current
        let outcome = try job.run(
            resume: resume, communicator: communicator,
            started: { resumed in
                if let resumed { print(resumeLine(resumed, batchesInRun: job.batches.count)) }
                print(
                    "inverting \(modelURL.lastPathComponent) into \(count) images of classes \(classes) "
                        + "(\(job.batches.count) batches of \(synthesis.synthBatch), \(synthesis.iterations) iterations, "
                        + "\(synthesis.resolution)px)")
                progress = ProgressLine(
                    "synth", total: iterations, unit: "it",
                    alreadyDone: (resumed?.batches.count ?? 0) * synthesis.iterations)
            }
        ) { done, _, loss in
            progress?.update(done, detail: String(format: "loss %.3f", loss))
        }
        progress?.finish()
        guard communicator.isRoot else { return }
        let rate = outcome.imagesMade > 0 ? outcome.imagesPerMinute : nil
        // Throughput varies run to run, so it lives beside the pack, not in it.
        let runLog: [String: Any] = [
            "pack": out, "images_made": outcome.imagesMade, "images_resumed": outcome.resumedImages,
            "seconds": outcome.seconds, "images_per_minute": rate ?? 0,
            "threads": compute.threads,
        ]
        try writeAtomically(
            try JSONSerialization.data(withJSONObject: runLog, options: [.sortedKeys, .prettyPrinted]),
            to: URL(fileURLWithPath: out + ".run.json"))
        print(qualitySummary(outcome.manifest, out: out, imagesPerMinute: rate, seconds: outcome.seconds))
    }
}

Synth.mainAsRank()
