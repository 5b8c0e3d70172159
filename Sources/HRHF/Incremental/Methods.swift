import Foundation

/// The images of a batch a loss term reads: the step's real ones, the synthetic ones, or all.
public enum BatchHalf: String, Codable, Sendable, CaseIterable {
    case real, fake, both
}

/// How the new classifier rows of a step start.
public enum ClassifierInitialisation: String, Codable, Sendable {
    /// MiB's (and PLOP's `init_balanced`): each new row is the background row; their biases and
    /// the background's become b_bg - log(new classes + 1), so the background's probability is
    /// shared, not changed.
    case background
    /// PyTorch's default for a new 1x1 convolution, as MiB's code leaves the rows of methods
    /// without `init_balanced` (FT, LwF): weights and biases uniform in +-1/sqrt(input channels).
    case random
}

/// The images and labels a step trains on.
public enum TrainingSet: String, Codable, Sendable {
    /// The step's images, labelled for its own classes (the protocol).
    case step
    /// Every image of every step so far with all their labels: joint training, the upper bound.
    case allSteps = "all steps"
}

/// One term of a step's loss (METHOD.md), on one half of the batch.
public enum LossTerm: String, Codable, Sendable, CaseIterable {
    /// Cross-entropy: on the real half with the step's labels after background handling, on the
    /// fake half with the old model's confident argmax; GSC-compensated when the method says so.
    case ce
    /// MiB's unbiased knowledge distillation (new classes folded into background).
    case kd
    /// LwF's knowledge distillation over the old classes, as MiB implements it.
    case lwfKD = "lwf_kd"
    /// Mean squared difference of the new and the old model's head features.
    case feat
    /// GSC's soft distillation, sharpness and relation terms.
    case soft, sharp, rel
    /// PLOP's Local POD: the backbone stages' residual sums, the head features and the logits
    /// (new classes added to the background's), each squared and pooled per region at scales
    /// 1, 2 and 4; the logits' distance weighs 1/20 of the others' (PLOP's 0.0005 beside 0.01).
    case pod

    /// GSC's terms, which `StepBatch.gscSums` computes together on a half.
    static let gsc: Set<LossTerm> = [.soft, .sharp, .rel]

    /// The term's value on `half` of what the step computed (`gsc`: that half's GSC sums;
    /// `crossEntropyAndKD`: that half's cross-entropy and unbiased KD, when computed together).
    func value(
        on half: BatchHalf, _ batch: StepBatch, gsc: GSCTermSums?, crossEntropyAndKD: (ce: Tensor, kd: Tensor)?
    ) -> Tensor {
        let (new, old) = batch.logits(half)
        let (options, reduction) = (batch.options, batch.reduction)
        switch self {
        case .ce:
            return crossEntropyAndKD?.ce ?? batch.crossEntropy(half)
        case .kd:
            if let crossEntropyAndKD { return crossEntropyAndKD.kd }
            let folded = foldedBackground(oldClasses: old.shape[1], classes: new.shape[1])
            return unbiasedDistillation(
                new, old, temperature: options.kdTemperature, mask: nil, reduction: reduction,
                logSumExps: batch.logSumExps(half, merged: folded, scale: 1 / options.kdTemperature),
                oldSoftmax: options.kdTemperature == 1 ? batch.sharedOldSoftmax(half) : nil)
        case .lwfKD:
            return plainDistillation(new, old, temperature: options.kdTemperature, reduction: reduction)
        case .feat:
            let (newFeatures, oldFeatures) = batch.features(half)
            let difference = square(newFeatures - oldFeatures)
            return reduction.share(ofMean: mean(difference), count: Double(difference.count))
        case .soft:
            return gsc!.softDistillation(reduction: reduction)
        case .sharp:
            return gsc!.sharpEntropy(reduction: reduction)
        case .rel:
            return gsc!.relationDistillation(reduction: reduction)
        case .pod:
            let maps = batch.podMaps(half)
            return localPOD(
                new: maps.new, old: maps.old, oldClasses: batch.oldClasses,
                newClasses: new.shape[1] - batch.oldClasses, factor: 1, logitsFactor: 0.05, reduction: reduction)
        }
    }
}

/// A loss term as a method uses it: its weight and the half of the batch it reads.
public struct WeightedTerm: Codable, Equatable, Sendable {
    public var term: LossTerm
    public var weight: Float
    public var half: BatchHalf

    public init(_ term: LossTerm, _ weight: Float, _ half: BatchHalf) {
        self.term = term
        self.weight = weight
        self.half = half
    }

    /// The term's name in the step's loss parts.
    public var label: String { half == .fake ? "fake_" + term.rawValue : term.rawValue }

    /// Position in the sum of a step's loss: real, fake, then whole-batch terms, each in
    /// `LossTerm`'s order (the order the benchmark's results were made in).
    var rank: Int {
        BatchHalf.allCases.firstIndex(of: half)! * LossTerm.allCases.count + LossTerm.allCases.firstIndex(of: term)!
    }
}

/// An incremental method: the terms of its loss, how it handles the background of real images,
/// whether GSC compensates its cross-entropy, how new classifier rows start, and its images.
public struct Method: Codable, Equatable, Sendable {
    public var name: String
    public var terms: [WeightedTerm]
    public var background: BackgroundHandling
    public var gradientCompensation: Bool
    public var classifier: ClassifierInitialisation
    public var trainingSet: TrainingSet

    public init(
        _ name: String, _ terms: [WeightedTerm], background: BackgroundHandling,
        gradientCompensation: Bool = false, classifier: ClassifierInitialisation = .background,
        trainingSet: TrainingSet = .step
    ) {
        self.name = name
        self.terms = terms
        self.background = background
        self.gradientCompensation = gradientCompensation
        self.classifier = classifier
        self.trainingSet = trainingSet
    }

    /// Whether the method reads synthetic images (a term on the fake half).
    public var readsPacks: Bool { terms.contains { $0.half == .fake } }

    /// Sets a term's weight: 0 removes it, a term the method lacks joins at its place in the sum.
    public mutating func setWeight(_ term: LossTerm, on half: BatchHalf, _ weight: Float) {
        let added = WeightedTerm(term, weight, half)
        terms.removeAll { $0.term == term && $0.half == half }
        guard weight != 0 else { return }
        terms.insert(added, at: terms.firstIndex { $0.rank > added.rank } ?? terms.count)
    }

    /// Checks what options can break: every weight finite and positive, each term once, a term
    /// the real half reads, and the cross-entropy on a half with labels.
    public func validate() throws {
        for t in terms {
            guard t.weight.isFinite && t.weight > 0 else {
                throw OptionError(option: t.label, "weight \(t.weight): a weight is a finite number above 0")
            }
            guard t.term != .ce || t.half != .both else {
                throw OptionError(option: t.label, "the cross-entropy reads the labels of the real or the fake half")
            }
            guard terms.filter({ $0.term == t.term && $0.half == t.half }).count == 1 else {
                throw OptionError(option: t.label, "given twice in method \(name)")
            }
        }
        guard terms.contains(where: { $0.half != .fake }) else {
            throw OptionError(option: "method", "\(name) has no term on the real images")
        }
    }
}

/// A method option that cannot be used, and why.
public struct OptionError: Error, CustomStringConvertible, Equatable {
    public var option: String
    public var reason: String

    public init(option: String, _ reason: String) {
        self.option = option
        self.reason = reason
    }

    public var description: String { "\(option): \(reason)" }
}

/// The methods: the one place each is defined. `hrhf-distill --list-methods` prints this table.
extension Method {
    private static func real(_ term: LossTerm, _ weight: Float = 1) -> WeightedTerm { .init(term, weight, .real) }
    private static func fake(_ term: LossTerm, _ weight: Float = 1) -> WeightedTerm { .init(term, weight, .fake) }
    private static func both(_ term: LossTerm, _ weight: Float) -> WeightedTerm { .init(term, weight, .both) }

    // GSC's weights were chosen on a held-out Shapes set (tools/tune.sh; docs/tuning.md): METHOD.md's
    // 1 / 0.1 / 1 cost 2-4 points of all-class mIoU there.
    public static let table: [Method] = [
        // The baselines as their authors' code runs them (MiB's argparser.py, PLOP's train.py).
        Method("ft", [real(.ce)], background: .plain, classifier: .random),
        Method("lwf", [real(.ce), real(.lwfKD, 100)], background: .plain, classifier: .random),
        Method("mib", [real(.ce), real(.kd, 10)], background: .unbiased),
        Method("plop", [real(.ce), real(.pod, 0.01)], background: .pseudo),
        Method(
            "gsc", [real(.ce), both(.soft, 0.25), both(.sharp, 0.02), both(.rel, 0.25)],
            background: .proto, gradientCompensation: true),
        Method("hrhf", [real(.ce), real(.kd, 10), fake(.ce), fake(.kd, 10)], background: .unbiased),
        Method(
            "hrhf+gsc",
            [
                real(.ce), real(.kd, 10), fake(.ce), fake(.kd, 10),
                both(.soft, 0.25), both(.sharp, 0.02), both(.rel, 0.25),
            ],
            background: .proto, gradientCompensation: true),
        Method(
            "hrhf+gsc-no-compensation",
            [
                real(.ce), real(.kd, 10), fake(.ce), fake(.kd, 10),
                both(.soft, 0.25), both(.sharp, 0.02), both(.rel, 0.25),
            ],
            background: .proto),
        Method(
            "hrhf+gsc-no-proto",
            [
                real(.ce), real(.kd, 10), fake(.ce), fake(.kd, 10),
                both(.soft, 0.25), both(.sharp, 0.02), both(.rel, 0.25),
            ],
            background: .unbiased, gradientCompensation: true),
        Method(
            "hrhf+gsc-no-relation",
            [
                real(.ce), real(.kd, 10), fake(.ce), fake(.kd, 10),
                both(.soft, 0.25), both(.sharp, 0.02),
            ],
            background: .proto, gradientCompensation: true),
        Method(
            "hrhf+gsc-no-soft-sharp", [real(.ce), real(.kd, 10), fake(.ce), fake(.kd, 10), both(.rel, 0.25)],
            background: .proto, gradientCompensation: true),
        // hrhf+gsc with the pack read for prototypes only: what the synthetic images add as a half.
        Method(
            "hrhf+gsc-no-fake", [real(.ce), real(.kd, 10), both(.soft, 0.25), both(.sharp, 0.02), both(.rel, 0.25)],
            background: .proto, gradientCompensation: true),
        Method("joint", [real(.ce)], background: .plain, classifier: .random, trainingSet: .allSteps),
    ]

    public static func named(_ name: String) throws -> Method {
        guard let method = table.first(where: { $0.name == name }) else {
            throw OptionError(option: "method", "unknown method \(name): \(table.map(\.name).joined(separator: ", "))")
        }
        return method
    }

    /// The table as text: per half of the batch, each term with its weight.
    public static func listing(_ methods: [Method] = table) -> String {
        func terms(_ m: Method, _ half: BatchHalf) -> String {
            let list = m.terms.filter { $0.half == half }.map { String(format: "%g %@", $0.weight, $0.term.rawValue) }
            return list.isEmpty ? "-" : list.joined(separator: ", ")
        }
        let rows = methods.map { m in
            [
                m.name, terms(m, .real), terms(m, .fake), terms(m, .both), m.background.rawValue,
                m.gradientCompensation ? "GSC" : "-", m.classifier.rawValue, m.trainingSet.rawValue,
            ]
        }
        let header = [
            "method", "real half", "fake half", "whole batch", "background", "ce compensation",
            "new rows from", "training set",
        ]
        let table = formatTable(header: header, rows: rows, leftAligned: true)
        return table.split(separator: "\n").map { line in String(line.reversed().drop { $0 == " " }.reversed()) }
            .joined(separator: "\n")
    }
}

/// What a step computed on one batch, which its loss terms read: both models' outputs, the
/// real half's labels after background handling, and the halves of the batch.
struct StepBatch {
    let options: DistillationOptions
    let new: (logits: Tensor, features: Tensor)
    /// The old model's logits upsampled to the input's size, its features at the head's.
    let old: (logits: Tensor, features: Tensor)
    let realCount: Int
    let hasFake: Bool
    let newReal: Tensor, oldReal: Tensor
    let newFake: Tensor?, oldFake: Tensor?
    let oldClasses: Int
    let stepOfClass: [Int]
    let step: Int
    /// The real half's labels after the method's background handling.
    var labels: Labels
    /// Sums the terms' batch-wide statistics over the ranks that share the batch (each rank holds
    /// its shares of the real and of the fake images).
    let reduction: BatchReduction
    /// Weights of the real half's cross-entropy pixels from the background handling (PLOP's).
    var realPixelWeights: Tensor?
    /// For Local POD, each model's maps (stage sums, head features, logits at the features' size).
    var pod: (new: [Tensor], old: [Tensor])?
    /// The old model's softmax, argmax and confidence, computed once for the terms that read them
    /// (GSC's, the fake half's labels, re-labelling) on the images they read; nil when none does.
    let sharedOldPrediction: (images: Range<Int>, prediction: OldPrediction)?
    /// Per half, the new logits' log-sum-exps over all channels and over the background its
    /// cross-entropy merges, computed once for that cross-entropy, its compensation weights and
    /// (at KD temperature 1) the unbiased KD, which would each exponentiate them again; on the
    /// real half, also over the KD's background from the same exps.
    let sharedLogSumExps: [BatchHalf: [ChannelSetLogSumExps]]

    init(
        options: DistillationOptions, new: (logits: Tensor, features: Tensor), old: (logits: Tensor, features: Tensor),
        realCount: Int, labels: Labels, oldClasses: Int, stepOfClass: [Int], step: Int,
        reduction: BatchReduction = .local
    ) {
        self.options = options
        self.reduction = reduction
        self.new = new
        self.old = old
        self.realCount = realCount
        let n = new.logits.shape[0]
        hasFake = realCount < n
        // One view per half, shared by every term that reads it (the terms only read them).
        newReal = hasFake ? batchView(new.logits, 0..<realCount) : new.logits
        oldReal = hasFake ? withNoGrad { batchView(old.logits, 0..<realCount) } : old.logits
        newFake = hasFake ? batchView(new.logits, realCount..<n) : nil
        oldFake = hasFake ? withNoGrad { batchView(old.logits, realCount..<n) } : nil
        self.labels = labels
        self.oldClasses = oldClasses
        self.stepOfClass = stepOfClass
        self.step = step
        var halves: Set<BatchHalf> = options.method.background == .proto ? [.real] : []
        for t in options.method.terms where t.half != .fake || hasFake {
            if t.term == .sharp || t.term == .rel || (t.term == .ce && t.half == .fake) { halves.insert(t.half) }
        }
        let shared: BatchHalf? = halves.isEmpty ? nil : halves.count == 1 ? halves.first! : .both
        let (real, fake) = (oldReal, oldFake)
        sharedOldPrediction = shared.map { half in
            (Self.images(half, realCount, n), OldPrediction(half == .real ? real : half == .fake ? fake! : old.logits))
        }
        var sums: [BatchHalf: [ChannelSetLogSumExps]] = [:]
        let unbiased = options.method.background == .unbiased || options.method.background == .proto
        let folded = foldedBackground(oldClasses: oldClasses, classes: new.logits.shape[1])
        let realKD = options.kdTemperature == 1 && options.method.terms.contains { $0.term == .kd && $0.half == .real }
        for t in options.method.terms where t.term == .ce {
            if t.half == .real && unbiased {
                sums[.real] = channelSetLogSumExps(
                    newReal, merged: [unbiasedBackground(oldClasses: oldClasses)] + (realKD ? [folded] : []), scale: 1)
            } else if t.half == .fake && hasFake && options.fakeFoldsNewClasses {
                sums[.fake] = [channelSetLogSumExps(newFake!, merged: folded, scale: 1)]
            }
        }
        sharedLogSumExps = sums
    }

    /// Images `range` of the batch that `half` covers.
    static func images(_ half: BatchHalf, _ realCount: Int, _ n: Int) -> Range<Int> {
        half == .fake ? realCount..<n : 0..<(half == .real ? realCount : n)
    }

    /// The shared old prediction when it covers `half`, and the half's images within it.
    func sharedPrediction(_ half: BatchHalf) -> (prediction: OldPrediction, images: Range<Int>)? {
        let range = Self.images(half, realCount, new.logits.shape[0])
        guard let shared = sharedOldPrediction,
            shared.images.lowerBound <= range.lowerBound && range.upperBound <= shared.images.upperBound
        else { return nil }
        let offset = shared.images.lowerBound
        return (shared.prediction, (range.lowerBound - offset)..<(range.upperBound - offset))
    }

    /// The old model's prediction on `half`: the shared one, or its part, or else computed here.
    func oldPrediction(_ half: BatchHalf) -> OldPrediction {
        guard let (prediction, images) = sharedPrediction(half) else { return OldPrediction(logits(half).old) }
        return images == 0..<prediction.shape[0] ? prediction : prediction.images(images)
    }

    /// The old model's softmax on `half` when the step computed it anyway: the whole batch's
    /// tensor and the half's first image in it.
    func sharedOldSoftmax(_ half: BatchHalf) -> (probabilities: Tensor, firstImage: Int)? {
        sharedPrediction(half).map {
            ($0.prediction.wholeProbabilities, $0.prediction.imageRange.lowerBound + $0.images.lowerBound)
        }
    }

    /// The log-sum-exps of `half`'s new logits computed once, when they are over `merged` at `scale`.
    func logSumExps(_ half: BatchHalf, merged: [Range<Int>], scale: Float) -> ChannelSetLogSumExps? {
        sharedLogSumExps[half]?.first { $0.matches(logits(half).new, merged: merged, scale: scale) }
    }

    /// The new and the old model's logits on `half` (the fake half exists when `hasFake`).
    func logits(_ half: BatchHalf) -> (new: Tensor, old: Tensor) {
        switch half {
        case .real: (newReal, oldReal)
        case .fake: (newFake!, oldFake!)
        case .both: (new.logits, old.logits)
        }
    }

    func features(_ half: BatchHalf) -> (new: Tensor, old: Tensor) {
        halfOf(half, new.features, old.features)
    }

    /// The images of `half` in a new and an old map of the whole batch.
    func halfOf(_ half: BatchHalf, _ newMap: Tensor, _ oldMap: Tensor) -> (new: Tensor, old: Tensor) {
        let n = newMap.shape[0]
        let range = Self.images(half, realCount, n)
        guard range != 0..<n else { return (newMap, oldMap) }
        return (sliceBatch(newMap, range), withNoGrad { sliceBatch(oldMap, range) })
    }

    func podMaps(_ half: BatchHalf) -> (new: [Tensor], old: [Tensor]) {
        let halves = zip(pod!.new, pod!.old).map { halfOf(half, $0, $1) }
        return (halves.map(\.new), halves.map(\.old))
    }

    /// The cross-entropy of `half`: real images on the step's labels (old objects scored as
    /// background-or-old under the unbiased and prototype handlings, MiB), fake images on the old
    /// model's confident argmax (new classes folded into background unless the options say not).
    func crossEntropy(_ half: BatchHalf) -> Tensor {
        if let ce = channelSetCrossEntropy(half) {
            return mergedBackgroundNLL(
                logits(half).new, ce.labels, merged: ce.merged, kept: ce.kept, pixelWeights: ce.pixelWeights,
                reduction: reduction, logSumExps: ce.logSumExps)
        }
        let new = logits(half).new
        if half == .real {
            return plainCrossEntropy(
                new, labels, pixelWeights: product(realPixelWeights, compensation(new, labels, backgroundIncludes: nil))
            )
        }
        precondition(half == .fake, "validated: the cross-entropy reads one half")
        let fakeLabels = oldPrediction(.fake).confidentLabels(threshold: options.fakeConfidence)
        return plainCrossEntropy(new, fakeLabels, pixelWeights: compensation(new, fakeLabels, backgroundIncludes: nil))
    }

    /// The cross-entropy of `half` when it scores label 0 as a set of channels (`channelSetNLL`):
    /// the real half's under the unbiased and prototype handlings (background or old), the fake
    /// half's with the new classes folded into background. Its labels, channels, pixel weights
    /// and the logits' log-sum-exps when computed once.
    func channelSetCrossEntropy(_ half: BatchHalf) -> (
        labels: Labels, merged: [Range<Int>], kept: Int, pixelWeights: Tensor?, logSumExps: ChannelSetLogSumExps?
    )? {
        let new = logits(half).new
        let classes = new.shape[1]
        if half == .real {
            guard options.method.background == .unbiased || options.method.background == .proto else { return nil }
            precondition(
                oldClasses >= 1 && oldClasses < classes, "unbiased CE: \(oldClasses) old of \(classes) classes")
            let merged = unbiasedBackground(oldClasses: oldClasses)
            let sums = logSumExps(.real, merged: merged, scale: 1)
            return (
                labels, merged, classes,
                compensation(new, labels, backgroundIncludes: 1..<oldClasses, logSumExps: sums), sums
            )
        }
        precondition(half == .fake, "validated: the cross-entropy reads one half")
        guard options.fakeFoldsNewClasses else { return nil }
        precondition(oldClasses >= 1 && oldClasses < classes, "folded CE: \(oldClasses) old of \(classes) classes")
        let fakeLabels = oldPrediction(.fake).confidentLabels(threshold: options.fakeConfidence)
        let merged = foldedBackground(oldClasses: oldClasses, classes: classes)
        let sums = logSumExps(.fake, merged: merged, scale: 1)
        return (
            fakeLabels, merged, oldClasses,
            compensation(new, fakeLabels, backgroundIncludes: oldClasses..<classes, logSumExps: sums), sums
        )
    }

    /// The cross-entropy and the unbiased KD of `half` as one op (`channelSetNLLAndUnbiasedKD`),
    /// when the method has both there, the KD at temperature 1 and a channel-set cross-entropy,
    /// and no other term takes a gradient through the same logits: the op's one gradient is then
    /// what the tape would have added from the two, bit for bit (with a third, the tape's adds
    /// would run in another order). Without fake images the real half is the whole batch's logits.
    func crossEntropyAndKD(_ half: BatchHalf, terms: [WeightedTerm]) -> (ce: Tensor, kd: Tensor)? {
        let read = Set(terms.filter { $0.half == half }.map(\.term))
        let logitsTerms: Set<LossTerm> = [.ce, .kd, .lwfKD, .soft, .sharp, .rel]
        let sameLogits = terms.filter { $0.half == half || ($0.half == .both && !hasFake) }
        guard half != .both && read.contains(.ce) && read.contains(.kd) && options.kdTemperature == 1,
            sameLogits.allSatisfy({ $0.term == .ce || $0.term == .kd || !logitsTerms.contains($0.term) }),
            let ce = channelSetCrossEntropy(half)
        else { return nil }
        let (new, old) = logits(half)
        let values = channelSetNLLAndUnbiasedKD(
            new, ce.labels, merged: ce.merged, kept: ce.kept, pixelWeights: ce.pixelWeights,
            logSumExps: ce.logSumExps, oldLogits: old, oldSoftmax: sharedOldSoftmax(half),
            distillationLogSumExps: logSumExps(
                half, merged: foldedBackground(oldClasses: oldClasses, classes: new.shape[1]), scale: 1))
        return (
            reduction.share(ofMean: reshape(sliceBatch(values, 0..<1), []), count: labelledPixels(ce.labels)),
            reduction.share(
                ofMean: reshape(sliceBatch(values, 1..<2), []), count: Double(Float(new.count / new.shape[1])))
        )
    }

    /// Cross-entropy averaged over the labelled pixels of every rank's share of the batch.
    func plainCrossEntropy(_ logits: Tensor, _ labels: Labels, pixelWeights: Tensor?) -> Tensor {
        reduction.share(
            ofMean: HRHF.crossEntropy(logits, labels, pixelWeights: pixelWeights), count: labelledPixels(labels))
    }

    func product(_ a: Tensor?, _ b: Tensor?) -> Tensor? {
        guard let a, let b else { return a ?? b }
        return a * b
    }

    /// GSC's step-aware pixel weights when the method compensates its cross-entropy.
    /// `logSumExps`, when given, are the logits' over all channels and over background and `backgroundIncludes`.
    func compensation(
        _ logits: Tensor, _ labels: Labels, backgroundIncludes: Range<Int>?, logSumExps: ChannelSetLogSumExps? = nil
    ) -> Tensor? {
        guard options.method.gradientCompensation else { return nil }
        let z = Float(oldClasses) / Float(logits.shape[1] - oldClasses)
        return gradientCompensationWeights(
            logits, labels, stepOfClass: stepOfClass, currentStep: step, z: z,
            wMin: options.compensationMin, wMax: options.compensationMax,
            backgroundIncludes: backgroundIncludes, reduction: reduction, logSumExps: logSumExps)
    }

    /// The per-pixel sums of GSC's `terms` on `half`, in one pass over its logits.
    func gscSums(_ half: BatchHalf, _ terms: Set<LossTerm>) -> GSCTermSums {
        let (new, old) = logits(half)
        let prediction = terms.contains(.sharp) || terms.contains(.rel) ? oldPrediction(half) : nil
        let request = GSCTermRequest(
            softTemperature: terms.contains(.soft) ? options.softTemperature : nil,
            sharpMask: terms.contains(.sharp) ? prediction!.confidenceMask(threshold: options.sharpConfidence) : nil,
            relation: terms.contains(.rel) ? relationInputs(prediction!) : nil)
        return gscTermSums(new, old, channels: old.shape[1], request)
    }

    /// The method's loss: its terms' weighted sum, in the table's order, and each term's value.
    func loss() throws -> (total: Tensor, parts: [String: Float]) {
        var total: Tensor?
        var labels: [String] = [], values: [Double] = []
        let terms = options.method.terms.filter { $0.half != .fake || hasFake }
        var gsc: [BatchHalf: GSCTermSums] = [:]
        var crossEntropyAndKD: [BatchHalf: (ce: Tensor, kd: Tensor)] = [:]
        for half in BatchHalf.allCases {
            let read = Set(terms.filter { $0.half == half }.map(\.term)).intersection(LossTerm.gsc)
            if !read.isEmpty { gsc[half] = gscSums(half, read) }
        }
        for half in BatchHalf.allCases { crossEntropyAndKD[half] = self.crossEntropyAndKD(half, terms: terms) }
        for t in terms {
            let value = t.term.value(
                on: t.half, self, gsc: gsc[t.half], crossEntropyAndKD: crossEntropyAndKD[t.half])
            total = total.map { $0 + t.weight * value } ?? t.weight * value
            labels.append(t.label)
            values.append(Double(value.item))
        }
        guard let total else { throw OptionError(option: "method", "\(options.method.name) has no term on this batch") }
        // The parts shown are the whole batch's: each rank's parts summed.
        return (total, Dictionary(uniqueKeysWithValues: zip(labels, reduction.total(values).map { Float($0) })))
    }
}
