import ArgumentParser
import Foundation
import HRHF
import HRHFCommandLine

struct Distill: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "hrhf-distill",
        abstract: "Learn a step's new classes from real images plus synthetic packs: half-real half-fake "
            + "distillation with Gradient-Semantic Compensation, and the baselines.")

    @Option(help: "The model of the previous step (native).") var old: String
    @Option(help: "Synthetic packs of the old classes (repeatable).") var pack: [String] = []
    @OptionGroup var data: DataOptions
    @Option(help: "The step to learn.") var step: Int = 1
    @Option(name: .customLong("last-step"), help: "Run steps --step through this one, synthesising a pack after each.")
    var lastStep: Int?
    @Option(help: "A method of --list-methods: ft, lwf, mib, plop, gsc, hrhf, hrhf+gsc, joint or an ablation.")
    var method: String = "hrhf+gsc"
    /// Read before parsing (main() below): listing needs none of the options a step requires.
    @Flag(name: .customLong("list-methods"), help: "Print the methods' loss terms and settings, and exit.")
    var listMethods = false
    @Option(help: "Override the method's background handling: plain, unbiased, pseudo or proto.")
    var background: String?
    @Option(
        name: .customLong("fake-ratio"),
        help: "Override the share of each batch from the packs (0.5: as many fake images as real ones).")
    var fakeRatio: Float?
    @Option(
        name: .customLong("fake-min-achieved"),
        help: .init(
            "Fake half: only pack images whose every target class the teacher gave at least this share of "
                + "the area asked of it (e.g. 0.5; default: every image)."))
    var fakeMinAchieved: Float?
    @Option(name: .customLong("kd"), help: "Override the unbiased KD weight on real images (0 drops the term).")
    var kd: Float?
    @Option(name: .customLong("fake-kd"), help: "Override the KD weight on fake images.") var fakeKD: Float?
    @Option(name: .customLong("fake-ce"), help: "Override the cross-entropy weight on fake images.") var fakeCE: Float?
    @Option(
        name: .customLong("fake-background"),
        help: "Fake half's background: plain, or folded (background or new, as its KD; the default).")
    var fakeBackground: String?
    @Option(
        name: .customLong("compensation-range"),
        help: "Clamp of GSC's compensation weights, MIN,MAX (default 0.8,1.25).")
    var compensationRange: String?
    @Option(name: .customLong("feature-weight"), help: "Feature distillation on the fake half.")
    var featureWeight: Float?
    @Option(name: .customLong("gradient-compensation"), help: "Override GSC's gradient compensation (true/false).")
    var gradientCompensation: Bool?
    @Option(name: .customLong("soft"), help: "Override GSC's soft distillation weight.") var soft: Float?
    @Option(name: .customLong("sharp"), help: "Override GSC's sharpness weight.") var sharp: Float?
    @Option(name: .customLong("relation"), help: "Override GSC's relation weight.") var relation: Float?
    @Option(
        name: .customLong("proto-tau"),
        help: .init(
            "Override the prototype agreement (softmax over prototype distances) a re-labelled pixel needs "
                + "(default 0.7)."))
    var protoTau: Float?
    @Option(
        name: .customLong("proto-old-confidence"),
        help: "Override the old model's confidence a re-labelled pixel needs (default 0.9).")
    var protoOldConfidence: Float?
    @Flag(
        name: .customLong("audit-relabelling"),
        help: .init(
            "Report how prototypical re-labelling fares against the training images' full masks "
                + "(a diagnostic; the method never reads them)."))
    var auditRelabelling = false
    @Option(
        name: .customLong("freeze-bn"),
        help: "Override whether batch norm keeps the old running statistics (true/false).")
    var freezeBN: Bool?
    @Option(
        name: .customLong("bn-recalibration"),
        help: .init(
            "Override the real batches over which batch norm's statistics are re-estimated after "
                + "each step (0: keep training's)."))
    var bnRecalibration: Int?
    @Option(
        name: .customLong("split-bn"),
        help: .init(
            "Override whether batch norm normalises real and fake images with their own statistics, "
                + "its running ones from the real only (true/false)."))
    var splitBN: Bool?
    @Option(help: "Training iterations per step.") var iterations: Int = 1000
    @Option(help: "Real images per batch; the pack methods add fake ones (--fake-ratio of the whole batch).")
    var batch: Int = 8
    @Option(help: "Square training crop.") var crop: Int = 128
    @Option(help: "Learning rate (SGD nesterov, poly).") var lr: Float = 0.01
    @Option(name: .customLong("checkpoint-every"), help: "Iterations between checkpoints.")
    var checkpointEvery: Int = 200
    @Option(help: "Random seed.") var seed: UInt64 = 0
    @Option(name: .customLong("synth-count"), help: "Images of the pack made after each step of a multi-step run.")
    var synthCount: Int = 64
    @Option(
        name: .customLong("step-pack"),
        help: .init(
            "Classes of the pack made after each step: new (the step's new classes, earlier packs "
                + "kept), all (every old class, replacing them) or none (the starting packs only)."))
    var stepPack: String = "new"
    @OptionGroup var synthesis: SynthesisOptionGroup
    @Option(
        name: .customLong("eval-limit"),
        help: "Validation images per evaluation (default all; 0: no evaluation, for data without a val split).")
    var evalLimit: Int?
    @Option(help: "Write the evaluations as JSON.") var json: String?
    @Option(help: "Append PLOP-format CSV lines.") var csv: String?
    @Option(help: "The final model.") var out: String
    @Flag(name: .customLong("sync-bn"), help: "Under mpirun: batch norm statistics over every rank's images (SyncBN).")
    var syncBN = false
    @OptionGroup var compute: ComputeOptions

    func run() throws {
        compute.apply()
        let communicator = Communicator.current
        if syncBN { BatchNormSync.communicator = communicator }
        var options = try DistillationOptions.preset(method)
        if let background {
            guard let b = BackgroundHandling(rawValue: background) else {
                throw OptionError(option: "--background", "\(background): plain, unbiased, pseudo or proto")
            }
            options.method.background = b
        }
        if let fakeRatio { options.fakeRatio = fakeRatio }
        options.fakeMinimumAchievedShare = fakeMinAchieved
        if let kd { options.method.setWeight(.kd, on: .real, kd) }
        if let fakeKD { options.method.setWeight(.kd, on: .fake, fakeKD) }
        if let featureWeight { options.method.setWeight(.feat, on: .fake, featureWeight) }
        if let fakeCE { options.method.setWeight(.ce, on: .fake, fakeCE) }
        if let fakeBackground {
            guard ["plain", "folded"].contains(fakeBackground) else {
                throw OptionError(option: "--fake-background", "\(fakeBackground): plain or folded")
            }
            options.fakeFoldsNewClasses = fakeBackground == "folded"
        }
        if let compensationRange {
            let parts = compensationRange.split(separator: ",").compactMap { Float(String($0)) }
            guard parts.count == 2 else {
                throw OptionError(option: "--compensation-range", "\(compensationRange): MIN,MAX with 0 < MIN <= MAX")
            }
            (options.compensationMin, options.compensationMax) = (parts[0], parts[1])
        }
        if let gradientCompensation { options.method.gradientCompensation = gradientCompensation }
        if let soft { options.method.setWeight(.soft, on: .both, soft) }
        if let sharp { options.method.setWeight(.sharp, on: .both, sharp) }
        if let relation { options.method.setWeight(.rel, on: .both, relation) }
        if let freezeBN { options.freezeBatchNorm = freezeBN }
        if let splitBN { options.splitBatchNorm = splitBN }
        if let bnRecalibration { options.batchNormRecalibration = bnRecalibration }
        if let protoTau { options.prototypeTau = protoTau }
        if let protoOldConfidence { options.prototypeOldConfidence = protoOldConfidence }
        try options.validate()
        let train = try data.open(split: "train")
        if let evalLimit, evalLimit < 0 { throw OptionError(option: "--eval-limit", "\(evalLimit): a count from 0") }
        let val = evalLimit == 0 ? nil : try data.open(split: "val")
        let task = try data.task(train)
        let last = lastStep ?? step
        guard step >= 1, last >= step, last < task.steps.count else {
            throw OptionError(
                option: "--step",
                "steps \(step)-\(last) are outside task \(task.name) "
                    + "(steps 1-\(task.steps.count - 1))")
        }
        guard let stepPackClasses = StepPackClasses(rawValue: stepPack) else {
            throw OptionError(option: "--step-pack", "\(stepPack): new, all or none")
        }
        let config = TrainingConfig(
            iterations: iterations, batchSize: batch, cropSize: crop, learningRate: lr,
            seed: seed, checkpointEvery: checkpointEvery)
        var progress: ProgressLine?
        let (synthCount, synthesisOptions) = (synthCount, synthesis.options)
        func synthesize(_ request: PackRequest) throws {
            let job = try SynthesisJob(request: request, count: synthCount, options: synthesisOptions)
            let perBatch = synthesisOptions.iterations
            let outcome = try job.run(
                resume: true, communicator: communicator,
                started: { resumed in
                    if let resumed { print(resumeLine(resumed, batchesInRun: job.batches.count)) }
                    progress = ProgressLine(
                        "pack after step \(request.afterStep)", total: job.batches.count * perBatch,
                        unit: "it", alreadyDone: (resumed?.batches.count ?? 0) * perBatch)
                }
            ) { done, _, _ in progress?.update(done) }
            progress?.finish()
            print(qualitySummary(outcome.manifest, out: request.out.path, imagesPerMinute: nil, seconds: nil))
        }
        var run = IncrementalRun(
            old: URL(fileURLWithPath: old), train: train, val: val, task: task, firstStep: step,
            lastStep: last, setting: data.setting, packs: pack.map { URL(fileURLWithPath: $0) },
            options: options, config: config, stepPackClasses: stepPackClasses,
            synthesize: synthesize, out: URL(fileURLWithPath: out), evalLimit: evalLimit)
        run.auditRelabelling = auditRelabelling
        run.communicator = communicator
        var lastIteration = ""
        var iterationsRun = 0
        var summary: [[String]] = []
        var allReports: [IoUReport] = []
        _ = try run.run { event in
            switch event {
            case .stepAlreadyDone(let s, let model):
                print("step \(s) already done: \(model.path) (kept; delete it to run the step again)")
            case .stepStarted(let s, let images, let packs, let total, let checkpoint, let resumedAt):
                if let checkpoint { print(resumeLine(checkpoint: checkpoint, iterationsDone: resumedAt, of: total)) }
                let classes = task.classes(at: s).map(String.init).joined(separator: ",")
                print(
                    "step \(s) of \(task.name) (\(data.setting.rawValue)), method \(method): classes \(classes), "
                        + "\(images) real images, \(packs == 0 ? "no pack" : packs == 1 ? "1 pack" : "\(packs) packs"), "
                        + "\(total) iterations")
                progress = ProgressLine("step \(s)", total: total, unit: "it", alreadyDone: resumedAt)
            case .iteration(_, let done, _, let loss, let parts):
                let detail = parts.keys.sorted().map { String(format: "%@ %.3f", $0, parts[$0]!) }
                    .joined(separator: " ")
                progress?.update(done, detail: String(format: "loss %.3f  ", loss) + detail)
                lastIteration =
                    String(format: "loss %.6f", loss)
                    + parts.keys.sorted().map { String(format: ", %@ %.6f", $0, parts[$0]!) }.joined()
                iterationsRun += 1
            case .stepFinished(let s, let report, let seconds, let model):
                progress?.finish()
                if !lastIteration.isEmpty { print("step \(s) last iteration: \(lastIteration)") }
                lastIteration = ""
                if let report {
                    print(report.table())
                    allReports.append(report)
                }
                summary.append([
                    "\(s)", IoUReport.percent(report?.old), IoUReport.percent(report?.new),
                    IoUReport.percent(report?.all), formatDuration(seconds), model.path,
                ])
            case .relabelAudit(let s, let audit):
                progress?.finish()
                progress = nil
                print("step \(s) re-labelling audit against the full training masks: \(audit.summary())")
            case .fakeImagesKept(let s, let kept, let offered, let share):
                print(
                    "step \(s) fake half: \(kept) of the packs' \(offered) images show their classes on at least "
                        + "\(share) of the asked area")
            }
        }
        if communicator.size > 1 {
            print(
                "ranks x threads \(communicator.size) x \(compute.threads); allreduce per iteration (rank 0): "
                    + allreduceSummary(communicator, iterations: iterationsRun))
        }
        guard communicator.isRoot else { return }
        for report in allReports { try writeReport(report, json: nil, csv: csv, classCount: report.perClass.count) }
        if let json {
            let encoder = JSONEncoder()
            encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
            try writeAtomically(try encoder.encode(allReports), to: URL(fileURLWithPath: json))
        }
        print(formatTable(header: ["step", "old mIoU %", "new mIoU %", "all mIoU %", "time", "model"], rows: summary))
        print(IoUReport.convention)
    }
}

if CommandLine.arguments.dropFirst().contains("--list-methods") {
    print(Method.listing())
} else {
    Distill.mainAsRank()
}
