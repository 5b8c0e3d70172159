import Foundation

/// The new model of step t: the old one with `newClasses` more outputs. New classifier rows
/// start as the background row; their bias and the background's are b_bg - log(newClasses + 1)
/// (MiB's initialisation, so the background's probability is shared, not changed).
public func extendModel(_ old: DeepLabV3, card: ModelCard, newClassNames: [String], step: Int) throws -> (DeepLabV3, ModelCard) {
    let added = newClassNames.count
    precondition(added >= 1, "a step adds at least one class")
    var arch = old.architecture
    arch.classesPerStep.append(added)
    let model = try DeepLabV3(arch)
    let oldState = Dictionary(old.stateDict().map { ($0.name, $0.tensor) }, uniquingKeysWith: { a, _ in a })
    let oldClasses = old.numClasses
    let headChannels = arch.headChannels
    for (name, t) in model.stateDict() {
        if let v = oldState[name], v.shape == t.shape { t.assign(v) }
    }
    /// A grown 1x1 classifier: the old rows copied, each new row the background row, the new
    /// biases and the background's b_bg - log(added + 1).
    func grow(_ w: Tensor, _ b: Tensor, from ow: Tensor, _ ob: Tensor) {
        let inChannels = ow.shape[1]
        w.pointer.update(from: ow.pointer, count: ow.count)
        b.pointer.update(from: ob.pointer, count: ob.count)
        let shared = ob.pointer[0] - Foundation.log(Float(added + 1))
        for k in oldClasses..<(oldClasses + added) {
            for i in 0..<inChannels { w.pointer[k * inChannels + i] = ow.pointer[i] }
            b.pointer[k] = shared
        }
        b.pointer[0] = shared
    }
    switch arch.flavor {
    case .torchvision:
        grow(model.classifiers[0].weight, model.classifiers[0].bias!, from: old.classifiers[0].weight, old.classifiers[0].bias!)
    case .mib:
        // One classifier per step: the new one is `cls.<step>`, all of its rows new.
        let ow = old.classifiers[0].weight, ob = old.classifiers[0].bias!
        let shared = ob.pointer[0] - Foundation.log(Float(added + 1))
        let w = model.classifiers.last!.weight, b = model.classifiers.last!.bias!
        for k in 0..<added {
            for i in 0..<headChannels { w.pointer[k * headChannels + i] = ow.pointer[i] }
            b.pointer[k] = shared
        }
        model.classifiers[0].bias!.pointer[0] = shared
    }
    // The auxiliary head's classifier grows the same way.
    let newState = Dictionary(model.stateDict().map { ($0.name, $0.tensor) }, uniquingKeysWith: { a, _ in a })
    if arch.auxHead, let aw = newState["aux_classifier.4.weight"], let ab = newState["aux_classifier.4.bias"],
       let ow = oldState["aux_classifier.4.weight"], let ob = oldState["aux_classifier.4.bias"] {
        grow(aw, ab, from: ow, ob)
    }
    var newCard = card
    newCard.architecture = arch
    newCard.classes += newClassNames.enumerated().map { ClassInfo(id: oldClasses + $0.offset, name: $0.element) }
    newCard.history.append(IncrementalStep(step: step, classes: Array(oldClasses..<(oldClasses + added))))
    return (model, newCard)
}

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

/// Class prototypes of the old model: the mean head feature of the pixels it labels with high
/// confidence, per old class (nil where no pixel qualifies).
public struct Prototypes {
    public var vectors: [[Float]?]
    public var channels: Int

    /// From images (a pack's, without old data; or the step's own when there is no pack).
    public static func compute(old: DeepLabV3, images: [Tensor], confidence: Float) -> Prototypes {
        let classes = old.numClasses, channels = old.architecture.headChannels
        var sums = [[Double]](repeating: [Double](repeating: 0, count: channels), count: classes)
        var counts = [Int](repeating: 0, count: classes)
        withNoGrad {
            for x in images {
                let out = old.run(x, upsample: false)
                let (n, _, h, w) = nchw(out.logits, "prototypes")
                let (labels, best) = channelArgmax(softmax(out.logits))
                let f = out.features
                for b in 0..<n {
                    for i in 0..<(h * w) {
                        let k = Int(labels[b * h * w + i])
                        guard best[b * h * w + i] >= confidence else { continue }
                        counts[k] += 1
                        for ch in 0..<channels { sums[k][ch] += Double(f.pointer[(b * channels + ch) * h * w + i]) }
                    }
                }
            }
        }
        return Prototypes(vectors: (0..<classes).map { k in counts[k] > 0 ? sums[k].map { Float($0 / Double(counts[k])) } : nil },
                          channels: channels)
    }

    /// GSC's prototypical re-labelling of the background pixels of real labels: a background
    /// pixel whose old-model argmax is old class c becomes c when softmax(-||phi - p_k|| / T)
    /// over the old classes gives c at least tauP and the old model's confidence is at least
    /// tauConf; where the prototype's nearest class disagrees with the old argmax it becomes 255.
    /// The old prediction is read per pixel (`oldLogits` at label resolution), the feature at
    /// the pixel's cell of `oldFeatures`: deciding whole feature cells would give old objects
    /// blocky labels that cut into the background around them.
    public func relabel(_ labels: Labels, oldLogits: Tensor, oldFeatures: Tensor, options: DistillationOptions) -> Labels {
        let (n, c, h, w) = nchw(oldLogits, "relabel")
        precondition(labels.shape == [n, h, w], "relabel: labels \(labels.shape) for logits \(oldLogits.shape)")
        let (fh, fw) = (oldFeatures.shape[2], oldFeatures.shape[3])
        let (oldArgmax, oldConfidence) = channelArgmax(softmax(oldLogits))
        var values = labels.values
        for b in 0..<n {
            // Per feature cell: the prototypes' nearest class and their softmax over old classes.
            var cells: [Int: (nearest: Int, probabilities: [Float])] = [:]
            func prototypeView(_ cell: Int) -> (nearest: Int, probabilities: [Float]) {
                if let v = cells[cell] { return v }
                var logits = [Float](repeating: -.infinity, count: c)
                for j in 0..<c {
                    guard let v = vectors[j] else { continue }
                    var d: Float = 0
                    for ch in 0..<channels {
                        let diff = oldFeatures.pointer[(b * channels + ch) * fh * fw + cell] - v[ch]
                        d += diff * diff
                    }
                    logits[j] = -d.squareRoot() / options.prototypeTemperature
                }
                let m = logits.max() ?? 0
                let e = logits.map { $0.isFinite ? Foundation.exp($0 - m) : 0 }
                let z = max(e.reduce(0, +), .leastNormalMagnitude)
                let view = (logits.firstIndex(of: m) ?? 0, e.map { $0 / z })
                cells[cell] = view
                return view
            }
            for y in 0..<h {
                let fy = min(fh - 1, y * fh / h)
                for x in 0..<w {
                    let j = (b * h + y) * w + x
                    guard values[j] == 0 else { continue }
                    let k = Int(oldArgmax[j])
                    guard k != 0 else { continue }
                    let view = prototypeView(fy * fw + min(fw - 1, x * fw / w))
                    if view.nearest != k {
                        values[j] = 255
                    } else if view.probabilities[k] >= options.prototypeTau && oldConfidence[j] >= options.prototypeOldConfidence {
                        values[j] = Int32(k)
                    }
                }
            }
        }
        return Labels(shape: labels.shape, values: values)
    }
}

/// How re-labelling fared against the full masks of the step's training images, where old
/// objects keep their classes. A diagnostic for the user: the method never reads those labels.
public struct RelabelAudit: Codable, Equatable, Sendable {
    /// Per class: pixels re-labelled to it that are it, that are background, that are another class.
    public var right: [Int]
    public var wrongBackground: [Int]
    public var wrongOther: [Int]
    /// Per class: its pixels among the step's background that kept background or became 255.
    public var missed: [Int]

    public init(classes: Int) {
        right = .init(repeating: 0, count: classes)
        wrongBackground = right; wrongOther = right; missed = right
    }

    /// Counts one batch: `before` the step's labels, `after` re-labelled, `truth` the full masks.
    public mutating func add(before: Labels, after: Labels, truth: Labels) {
        precondition(before.shape == after.shape && before.shape == truth.shape, "audit: label shapes differ")
        for j in 0..<before.values.count where before.values[j] == 0 {
            let t = Int(truth.values[j]), v = Int(after.values[j])
            if v != 0 && v != 255 {
                if t == v { right[v] += 1 } else if t == 0 { wrongBackground[v] += 1 } else { wrongOther[v] += 1 }
            } else if t > 0 && t < missed.count {
                missed[t] += 1
            }
        }
    }

    public var relabelled: Int { right.reduce(0, +) + wrongBackground.reduce(0, +) + wrongOther.reduce(0, +) }
    /// Share of re-labelled pixels that hold their new class.
    public var precision: Double? { relabelled == 0 ? nil : Double(right.reduce(0, +)) / Double(relabelled) }
    /// Share of the old objects' pixels in the step's background that were re-labelled correctly.
    public var recall: Double? {
        let found = right.reduce(0, +), total = found + missed.reduce(0, +)
        return total == 0 ? nil : Double(found) / Double(total)
    }

    /// One line: totals, then the classes with the most wrong pixels.
    public func summary() -> String {
        guard let precision else { return "no pixel re-labelled" }
        let wrong = (0..<right.count).map { ($0, wrongBackground[$0] + wrongOther[$0]) }.filter { $0.1 > 0 }.sorted { $0.1 > $1.1 }
        let worst = wrong.prefix(3).map { c, n in "class \(c) \(n) wrong of \(n + right[c])" }.joined(separator: ", ")
        return String(format: "%d pixels re-labelled, precision %.1f%% (%.1f%% true background), recall %.1f%%",
                      relabelled, 100 * precision, 100 * Double(wrongBackground.reduce(0, +)) / Double(relabelled), 100 * (recall ?? 0))
            + (worst.isEmpty ? "" : "; most wrong: " + worst)
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
