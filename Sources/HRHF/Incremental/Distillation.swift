import Foundation

/// How the background of real images is handled (METHOD.md).
public enum BackgroundHandling: String, Codable, Sendable, CaseIterable {
    /// Plain cross-entropy on the step's labels (old objects stay background: fine-tuning).
    case plain
    /// MiB's unbiased cross-entropy.
    case unbiased
    /// Old-model pseudo-labels on background pixels, entropy-thresholded (PLOP).
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
    public var kdTemperature: Float = 1
    /// Fake half: the old model's argmax is a label where its probability is at least this.
    public var fakeConfidence: Float = 0.7
    /// Score the fake half's background as background-or-new (as its KD does) instead of
    /// background alone.
    public var fakeFoldsNewClasses = true
    /// Clamp of GSC's step-aware compensation weights. METHOD.md's [0.5, 2] cost 2-4 points of
    /// all-class mIoU on the held-out Shapes set (tools/tune.sh, docs/tuning.md).
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
    /// Pseudo-labels: normalised entropy below this (and below the class's batch median).
    public var pseudoEntropy: Float = 0.5
    /// Batch norm keeps the old model's running statistics during the step (half of every
    /// batch is synthetic, with other statistics than real test images). Off: with the zoo
    /// model at lr 0.01 it diverged within 10 iterations.
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
        guard compensationMin > 0 && compensationMin <= compensationMax && compensationMax.isFinite else {
            throw OptionError(option: "compensation range", "\(compensationMin),\(compensationMax): 0 < MIN <= MAX")
        }
        guard batchNormRecalibration >= 0 else {
            throw OptionError(option: "bn recalibration", "\(batchNormRecalibration) batches: a count from 0")
        }
    }
}

/// PLOP-style pseudo-labels: background pixels of real labels take the old model's argmax
/// when it is an old foreground class and the prediction's normalised entropy is below both
/// `threshold` and the median entropy of that class's pixels in the batch.
public func pseudoLabel(_ labels: Labels, oldLogits: Tensor, threshold: Float) -> Labels {
    let logP = logSoftmax(oldLogits)
    let (n, c, h, w) = nchw(logP, "pseudo-label")
    let hw = h * w
    let argmax = channelArgmax(logP).indices.map(Int.init)
    // Normalised entropy per pixel: -sum p log p / log C.
    let entropyMap = sum(exp(logP) * logP, axes: [1]) * (-1 / Foundation.log(Float(c)))
    let entropy = entropyMap.array
    var perClass = [[Float]](repeating: [], count: c)
    for j in 0..<(n * hw) where labels.values[j] == 0 { perClass[argmax[j]].append(entropy[j]) }
    let medians = perClass.map { v -> Float in v.isEmpty ? 0 : v.sorted()[v.count / 2] }
    var values = labels.values
    for j in 0..<(n * hw) where values[j] == 0 && argmax[j] != 0 && entropy[j] <= min(threshold, medians[argmax[j]]) {
        values[j] = Int32(argmax[j])
    }
    return Labels(shape: labels.shape, values: values)
}
