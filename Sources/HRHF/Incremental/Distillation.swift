import Foundation

/// How the background of real images is handled (METHOD.md).
public enum BackgroundHandling: String, Codable, Sendable, CaseIterable {
    /// Plain cross-entropy on the step's labels (old objects stay background: fine-tuning).
    case plain
    /// MiB's unbiased cross-entropy.
    case unbiased
    /// PLOP's: background pixels take the old model's argmax where its entropy is below the
    /// class's threshold (from the step's training set), else are ignored; each image's
    /// cross-entropy is scaled by its share of certain background pixels.
    case pseudo
    /// GSC's prototypical pseudo re-labelling; the background pixels it leaves are scored with
    /// the unbiased cross-entropy, since prototypes find only some of the old objects.
    case proto
}

/// A distillation step's method (its row of `Method.table`, with any weight overridden) and
/// the settings its terms share; every default is here.
public struct DistillationOptions: Codable, Equatable, Sendable {
    public var method: Method
    /// Share of each batch drawn from the synthetic packs, added to the real images of the batch,
    /// for a method with terms on the fake half (0: real images only).
    public var fakeRatio: Float = 0.5
    /// Fake half: only pack images in which the teacher gave every target class at least this
    /// share of the area it was asked for (nil: every image). A pack that failed to show its
    /// class (its images rehearse other classes where the class was meant) then rehearses nothing.
    public var fakeMinimumAchievedShare: Float?
    public var kdTemperature: Float = 1
    /// Fake half: the old model's argmax is a label where its probability is at least this.
    public var fakeConfidence: Float = 0.7
    /// Score the fake half's background as background-or-new (as its KD does) instead of
    /// background alone.
    public var fakeFoldsNewClasses = true
    /// Clamp of GSC's step-aware compensation weights: narrower than METHOD.md's [0.5, 2], which
    /// lost old classes on the held-out set (docs/tuning.md).
    public var compensationMin: Float = 0.8
    public var compensationMax: Float = 1.25
    public var softTemperature: Float = 2
    public var sharpConfidence: Float = 0.9
    /// Prototypes: mean feature of pixels the old model labels with confidence >= this.
    public var prototypeConfidence: Float = 0.9
    /// Re-label when the prototype softmax of the old argmax class is >= tauP ...
    public var prototypeTau: Float = 0.7
    /// ... and the old model's confidence is >= tauConf. Both strict because re-labelling
    /// trusts the old model, and over several steps its errors compound (docs/tuning.md).
    public var prototypeOldConfidence: Float = 0.9
    public var prototypeTemperature: Float = 1
    /// Pseudo-labels: the least entropy threshold of a class (PLOP's `--threshold`).
    public var pseudoBaseThreshold: Float = 0.001
    /// Batch norm keeps the old model's running statistics during the step (half of every
    /// batch is synthetic, with other statistics than real test images). Off: training diverged
    /// with it on the zoo model (docs/tuning.md).
    public var freezeBatchNorm = false
    /// Real batches over which batch norm's running statistics are re-estimated after the step
    /// (torch's update_bn; 0: keep those of training). Off: the weights learn under the mixed
    /// batches' normalisation, so statistics of real images alone no longer fit them.
    public var batchNormRecalibration = 0
    /// Batch norm normalises a batch's real and fake images with their own statistics in
    /// training, and its running statistics follow the real ones only (`BatchNorm2d.batchSplit`).
    public var splitBatchNorm = false

    public init(method: Method) {
        self.method = method
    }

    /// The options of a method of `Method.table`, with the defaults above.
    public static func preset(_ name: String) throws -> DistillationOptions {
        DistillationOptions(method: try Method.named(name))
    }

    /// Whether the step's batches hold fake images.
    public var usesFakeHalf: Bool { method.readsPacks && fakeRatio > 0 }

    /// Checks the method and the settings that options can break.
    public func validate() throws {
        try method.validate()
        guard fakeRatio.isFinite && fakeRatio >= 0 && fakeRatio < 1 else {
            throw OptionError(option: "fake ratio", "\(fakeRatio): a share of the batch from 0 up to (not including) 1")
        }
        if let share = fakeMinimumAchievedShare, !(share > 0 && share <= 1) {
            throw OptionError(option: "fake min achieved", "\(share): a share of the asked area above 0, at most 1")
        }
        guard compensationMin > 0 && compensationMin <= compensationMax && compensationMax.isFinite else {
            throw OptionError(option: "compensation range", "\(compensationMin),\(compensationMax): 0 < MIN <= MAX")
        }
        guard pseudoBaseThreshold.isFinite && pseudoBaseThreshold >= 0 else {
            throw OptionError(option: "pseudo threshold", "\(pseudoBaseThreshold): a number from 0")
        }
        guard batchNormRecalibration >= 0 else {
            throw OptionError(option: "bn recalibration", "\(batchNormRecalibration) batches: a count from 0")
        }
    }
}
