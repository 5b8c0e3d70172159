import Foundation

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
        return Prototypes(
            vectors: (0..<classes).map { k in counts[k] > 0 ? sums[k].map { Float($0 / Double(counts[k])) } : nil },
            channels: channels)
    }

    /// GSC's prototypical re-labelling of the background pixels of real labels: a background
    /// pixel whose old-model argmax is old class c becomes c when softmax(-||phi - p_k|| / T)
    /// over the old classes gives c at least tauP and the old model's confidence is at least
    /// tauConf; where the prototype's nearest class disagrees with the old argmax it becomes 255.
    /// The old prediction is read per pixel (`oldLogits` at label resolution), the feature at
    /// the pixel's cell of `oldFeatures`: deciding whole feature cells would give old objects
    /// blocky labels that cut into the background around them. `oldPrediction`, when given, is the
    /// old model's on these images (computed once per step), else it is computed from `oldLogits`.
    public func relabel(
        _ labels: Labels, oldLogits: Tensor, oldFeatures: Tensor, options: DistillationOptions,
        oldPrediction: OldPrediction? = nil
    ) -> Labels {
        let (n, c, h, w) = nchw(oldLogits, "relabel")
        precondition(labels.shape == [n, h, w], "relabel: labels \(labels.shape) for logits \(oldLogits.shape)")
        let (fh, fw) = (oldFeatures.shape[2], oldFeatures.shape[3])
        let prediction = oldPrediction ?? OldPrediction(oldLogits)
        precondition(
            prediction.shape == oldLogits.shape, "relabel: prediction \(prediction.shape) for \(oldLogits.shape)")
        let (oldArgmax, oldConfidence) = (prediction.argmax, prediction.confidence)
        var values = labels.values
        // Images apart on both cores: each writes only its own pixels' labels.
        values.withUnsafeMutableBufferPointer { values in
            parallelBlocks(n) { images in
                for b in images {
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
                            } else if view.probabilities[k] >= options.prototypeTau
                                && oldConfidence[j] >= options.prototypeOldConfidence
                            {
                                values[j] = Int32(k)
                            }
                        }
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
        wrongBackground = right
        wrongOther = right
        missed = right
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
        let wrong = (0..<right.count).map { ($0, wrongBackground[$0] + wrongOther[$0]) }.filter { $0.1 > 0 }.sorted {
            $0.1 > $1.1
        }
        let worst = wrong.prefix(3).map { c, n in "class \(c) \(n) wrong of \(n + right[c])" }.joined(separator: ", ")
        return String(
            format: "%d pixels re-labelled, precision %.1f%% (%.1f%% true background), recall %.1f%%",
            relabelled, 100 * precision, 100 * Double(wrongBackground.reduce(0, +)) / Double(relabelled),
            100 * (recall ?? 0))
            + (worst.isEmpty ? "" : "; most wrong: " + worst)
    }
}
