import ArgumentParser
import Foundation
import HRHF

/// Every SegInversion option as a command-line flag (shared by hrhf-synth and hrhf-distill,
/// which synthesises a new pack after each step).
public struct SynthesisOptionGroup: ParsableArguments {
    public init() {}
    static let d = InversionOptions()

    @Option(name: .customLong("synth-iterations"), help: "Optimisation steps per synthesis batch.") public
        var iterations: Int = d.iterations
    @Option(help: "Adam learning rate on the images (betas 0.5, 0.9; cosine schedule).") public var synthLr: Float = d
        .learningRate
    @Option(help: "Warm-up iterations of the learning rate.") public var warmup: Int = d.warmup
    @Option(name: .customLong("synth-batch"), help: "Images optimised together.") public var synthBatch: Int = d
        .batchSize
    @Option(help: "Image side in pixels.") public var resolution: Int = d.resolution
    @Option(help: "Random roll of up to this many pixels per iteration.") public var jitter: Int = d.jitter
    @Option(help: "Random horizontal flips (true/false).") public var flip: Bool = d.flip
    @Option(name: .customLong("classes-per-image"), help: "Target classes per image: 1 to this.") public
        var classesPerImage: Int = d.maxClasses
    @Option(name: .customLong("area-min"), help: "Smallest target area (share of the image).") public var areaMin:
        Float = d.areaMin
    @Option(name: .customLong("area-max"), help: "Largest target area.") public var areaMax: Float = d.areaMax
    @Option(name: .customLong("area-total"), help: "Largest total target area of an image.") public var areaTotal:
        Float = d.areaTotalMax
    @Option(help: "SAA (out) margin.") public var margin: Float = d.margin
    @Option(name: .customLong("absent-fraction"), help: "Top share of pixels pushed down for absent classes.") public
        var absentFraction: Float = d.absentFraction
    @Option(name: .customLong("l-out"), help: "Weight of SAA (out).") public var lOut: Float = d.lambdaOut
    @Option(name: .customLong("l-abs"), help: "Weight of the absent-class term.") public var lAbs: Float = d
        .lambdaAbsent
    @Option(name: .customLong("w-bn"), help: "Weight of the feature-statistics term.") public var wBN: Float = d
        .weightBN
    @Option(name: .customLong("bn-first"), help: "Multiplier of the first batch-norm layer.") public var bnFirst:
        Float = d.firstBNMultiplier
    @Option(name: .customLong("w-tv2"), help: "Weight of the L2 total variation.") public var wTV2: Float = d.weightTV2
    @Option(name: .customLong("w-tv1"), help: "Weight of the L1 total variation.") public var wTV1: Float = d.weightTV1
    @Option(name: .customLong("w-l2"), help: "Weight of the image norm.") public var wL2: Float = d.weightL2
    @Option(name: .customLong("warm-start"), help: "Share of iterations run first at half resolution (0 off).") public
        var warmStart: Float = d.warmStart
    @Flag(
        name: .customLong("no-saa"),
        help: ArgumentHelp(
            "Without Scale-Aware Aggregation: one target class per image over all its pixels, plain "
                + "cross-entropy (the ablation).")) public var noSAA = false

    public var options: InversionOptions {
        var o = InversionOptions()
        o.iterations = iterations
        o.learningRate = synthLr
        o.warmup = warmup
        o.batchSize = synthBatch
        o.resolution = resolution
        o.jitter = jitter
        o.flip = flip
        o.maxClasses = classesPerImage
        o.areaMin = areaMin
        o.areaMax = areaMax
        o.areaTotalMax = areaTotal
        o.margin = margin
        o.absentFraction = absentFraction
        o.lambdaOut = lOut
        o.lambdaAbsent = lAbs
        o.weightBN = wBN
        o.firstBNMultiplier = bnFirst
        o.weightTV2 = wTV2
        o.weightTV1 = wTV1
        o.weightL2 = wL2
        o.warmStart = warmStart
        o.scaleAwareAggregation = !noSAA
        return o
    }
}

/// The table printed at the end of a synthesis run and of `hrhf-pack inspect`.
public func qualitySummary(_ m: PackManifest, out: String, imagesPerMinute: Double?, seconds: Double?) -> String {
    var rows: [[String]] = [
        ["pack", out],
        [
            "images",
            "\(m.images.count)" + (m.shard.map { " (shard \($0.index)/\($0.count) of \(m.generator.count))" } ?? ""),
        ],
        ["classes", m.classes.map { "\($0.id)" }.joined(separator: ",")],
        ["area correlation (target vs achieved)", String(format: "%.3f", m.quality.areaCorrelation)],
        ["area mean absolute difference", String(format: "%.3f", m.quality.areaMeanAbsoluteDifference)],
        ["class fidelity", String(format: "%.1f%%", 100 * m.quality.fidelity)],
        ["teacher mean confidence", String(format: "%.3f", m.quality.meanConfidence)],
    ]
    if let imagesPerMinute { rows.append(["throughput", String(format: "%.2f images/min", imagesPerMinute)]) }
    if let seconds { rows.append(["time", formatDuration(seconds)]) }
    return formatTable(header: ["synthetic pack", ""], rows: rows, leftAligned: true)
}

/// Parses "1-15", "1,3,5-7" into class ids, at most `maxClassID` (1000: ADE20K has 150 classes),
/// so that a mistyped range cannot allocate without bound.
public func parseClassList(_ text: String, option: String = "--classes", maxClassID: Int = 1000) throws -> [Int] {
    var out: [Int] = []
    for part in text.split(separator: ",", omittingEmptySubsequences: false) {
        let bounds = part.split(separator: "-", omittingEmptySubsequences: false)
            .map { Int($0.trimmingCharacters(in: .whitespaces)) }
        guard bounds.count == 1 || bounds.count == 2, let lo = bounds.first ?? nil, let hi = bounds.last ?? nil,
            1 <= lo, lo <= hi, hi <= maxClassID
        else {
            throw OptionError(option: option, "\(text): class ids from 1 to \(maxClassID) such as 1-15 or 1,3,5-7")
        }
        out += Array(lo...hi)
    }
    return out
}
