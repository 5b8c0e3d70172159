import Foundation

// PLOP (Douillard et al., CVPR 2021) as its authors' code runs it (arthurdouillard/CVPR2021_PLOP,
// train.py, method PLOP): entropy pseudo-labels with per-class thresholds from the step's training
// set, the adaptive factor on the cross-entropy, and Local POD on the backbone stages, the head
// features and the logits. tools/gen_plop_fixtures.py runs the authors' own functions on fixed
// inputs; PLOPTests compares these with them.

/// PLOP's per-pixel entropy of probabilities (N x C x H x W): -mean over channels of
/// p log(p + 1e-8), divided by log C. (Its mean over channels makes the range [0, 1/C], not [0, 1].)
func plopEntropy(_ probabilities: Tensor) -> [Float] {
    let (n, c, inner) = channelLayout(probabilities, "PLOP entropy")
    let factor = 1 / Foundation.log(Float(c) + 1e-8)
    var out = [Float](repeating: 0, count: n * inner)
    let p = probabilities.pointer
    for b in 0..<n {
        for k in 0..<c {
            for i in 0..<inner {
                let v = p[(b * c + k) * inner + i]
                out[b * inner + i] += v * Foundation.log(v + 1e-8)
            }
        }
    }
    return out.map { -factor * ($0 / Float(c)) }
}

/// PLOP's pseudo-labelling thresholds for one step: per class the old model predicts, the median
/// of the scaled entropy (`plopEntropy` / log(classes after the step)) over the background pixels
/// of one pass over the step's training batches, at least `base` (PLOP's `--threshold`, 0.001).
public struct PseudoLabelThresholds: Codable, Equatable, Sendable {
    /// Per old class (background included).
    public var values: [Float]
    /// log of the number of classes after the step: PLOP's `max_entropy`.
    public var maxEntropy: Float

    /// PLOP's `find_median`: a 100-bin histogram per class over [0, 1] and its reading of the
    /// median, reproduced as written, including that its running count adds bin indices rather
    /// than bin counts (so the first bin holding half of a class's pixels is the one read).
    public init(histograms: [[Int]], maxEntropy: Float, base: Float) {
        self.maxEntropy = maxEntropy
        values = histograms.map { h in
            let total = h.reduce(0, +)
            guard total > 0 else { return max(0, base) }
            let bins = h.count
            let half = Double(total) / 2
            var runningSum = 0.0
            var lowerBorder = 0.0, binIndex = 0
            for b in 0..<bins {
                lowerBorder = Double(b) / Double(bins)
                binIndex = Int(lowerBorder * Double(bins))
                if half >= runningSum && half <= runningSum + Double(h[binIndex]) { break }
                runningSum += lowerBorder * Double(bins)
            }
            // Past the last bin PLOP extrapolates from it, unbounded if it is empty: kept as written.
            let median = lowerBorder + (half - runningSum) / Double(h[binIndex]) * (1 / Double(bins))
            return max(Float(median), base)
        }
    }

    /// The thresholds from `batches` of (old logits at the labels' size, step labels).
    public static func measure(
        batches: Int, classesAfterStep: Int, base: Float, bins: Int = 100,
        _ batch: (Int) throws -> (oldLogits: Tensor, labels: Labels)
    ) throws -> PseudoLabelThresholds {
        let maxEntropy = Foundation.log(Float(classesAfterStep))
        var histograms: [[Int]] = []
        for i in 0..<batches {
            let (logits, labels) = try batch(i)
            let probabilities = softmax(logits)
            let c = logits.shape[1]
            if histograms.isEmpty { histograms = [[Int]](repeating: [Int](repeating: 0, count: bins), count: c) }
            let entropy = plopEntropy(probabilities)
            let argmax = channelArgmax(probabilities).indices
            for j in 0..<labels.count where labels.values[j] == 0 {
                let scaled = entropy[j] / maxEntropy * Float(bins)
                guard scaled.isFinite else {
                    throw TrainingError(iteration: 0, "the old model's outputs are not finite on training batch \(i)")
                }
                histograms[Int(argmax[j])][min(Int(scaled), bins - 1)] += 1
            }
        }
        return PseudoLabelThresholds(histograms: histograms, maxEntropy: maxEntropy, base: base)
    }
}

/// PLOP's labels for the real images and the weight of each pixel's cross-entropy: a pixel
/// labelled background (or an old class) takes the old model's argmax where its scaled entropy is
/// below that class's threshold, else 255 (ignored); each image's loss is scaled by its share of
/// such pixels that were certain (the "classif adaptive factor"), and the loss is the mean over
/// every pixel, ignored ones counting 0 (PLOP's `reduction="none"` then `.mean()`; every pixel of
/// every rank's share).
func plopPseudoLabels(
    _ labels: Labels, oldLogits: Tensor, oldClasses: Int, thresholds: PseudoLabelThresholds,
    reduction: BatchReduction = .local
) -> (labels: Labels, pixelWeights: Tensor) {
    let probabilities = softmax(oldLogits)
    let (n, _, inner) = channelLayout(probabilities, "PLOP pseudo-labels")
    let entropy = plopEntropy(probabilities)
    let argmax = channelArgmax(probabilities).indices
    var values = labels.values
    var factor = [Float](repeating: 0, count: n)
    for b in 0..<n {
        var certain = 0, background = 0
        for j in (b * inner)..<((b + 1) * inner) where values[j] < Int32(oldClasses) {
            background += 1
            let k = Int(argmax[j])
            if entropy[j] / thresholds.maxEntropy < thresholds.values[k] {
                certain += 1
                values[j] = Int32(k)
            } else {
                values[j] = 255
            }
        }
        factor[b] = Float(certain) / (Float(background) + 1e-6)
    }
    // nll_loss divides by the pixels not ignored; PLOP's mean divides by all of them.
    let counts = reduction.total([Double(values.reduce(0) { $0 + ($1 == 255 ? 0 : 1) }), Double(values.count)])
    let scale = Float(counts[0]) / Float(max(counts[1], 1))
    let weights = Tensor(shape: labels.shape, values: (0..<values.count).map { factor[$0 / inner] * scale })
    return (Labels(shape: labels.shape, values: values), weights)
}

/// PLOP's Local POD embedding of an N x C x H x W map: for each scale s and each of the s x s
/// regions of side W / s (PLOP's `w // scale`, on both axes), the region's mean over its width
/// (C x rows values) then over its height (C x columns values), concatenated per image: N x D.
func localPODEmbedding(_ x: Tensor, scales: [Int]) -> Tensor {
    let (n, _, h, w) = nchw(x, "local POD")
    var pieces: [Tensor] = []
    for scale in scales {
        let k = w / scale
        for i in 0..<scale {
            for j in 0..<scale {
                let rows = min(i * k, h)..<min((i + 1) * k, h), columns = (j * k)..<((j + 1) * k)
                guard !rows.isEmpty && !columns.isEmpty else { continue }
                let region = cropSpatial(x, rows: rows, columns: columns)
                pieces.append(reshape(mean(region, axes: [3]), [n, -1]))
                pieces.append(reshape(mean(region, axes: [2]), [n, -1]))
            }
        }
    }
    return concatChannels(pieces)
}

/// The L2 norm of each row of an N x D matrix. Its gradient is 0 where a norm is 0, as
/// PyTorch's (a new model starts equal to the old one, so Local POD's first distances are 0).
func rowNorms(_ x: Tensor) -> Tensor {
    precondition(x.rank == 2, "row norms of an N x D matrix, got \(x.shape)")
    let (n, d) = (x.shape[0], x.shape[1])
    let out = Tensor(zeros: [n])
    for r in 0..<n {
        var s: Float = 0
        for i in 0..<d { s += x.pointer[r * d + i] * x.pointer[r * d + i] }
        out.pointer[r] = s.squareRoot()
    }
    record(out, "row_norms", [x]) { g in
        let gx = Tensor(zeros: [n, d])
        for r in 0..<n where out.pointer[r] > 0 {
            let f = g.pointer[r] / out.pointer[r]
            for i in 0..<d { gx.pointer[r * d + i] = f * x.pointer[r * d + i] }
        }
        return [gx]
    }
    return out
}

/// PLOP's Local POD over pairs of maps (new, old), the logits last: each map squared, embedded
/// (`localPODEmbedding`, scales 1, 2, 4), the L2 distance per image averaged over the batch, times
/// `factor` (0.01) or for the logits `logitsFactor` (0.0005), times sqrt(classes / new classes);
/// their sum over the number of maps. The new model's logits have their new classes' logits added
/// to the background's (PLOP's `extra_channels: sum`). The batch is every rank's share.
func localPOD(
    new: [Tensor], old: [Tensor], oldClasses: Int, newClasses: Int, factor: Float = 0.01,
    logitsFactor: Float = 0.0005, scales: [Int] = [1, 2, 4], reduction: BatchReduction = .local
) -> Tensor {
    precondition(new.count == old.count && !new.isEmpty, "local POD: maps in pairs")
    let classes = oldClasses + newClasses
    let schedule = (Float(classes) / Float(newClasses)).squareRoot()
    var total: Tensor?
    for (index, (a, b)) in zip(new, old).enumerated() {
        var newMap = a
        if index == new.count - 1 {
            let c = a.shape[1]
            let background = sliceChannels(a, 0..<1) + sum(sliceChannels(a, oldClasses..<c), axes: [1], keepDims: true)
            newMap = oldClasses > 1 ? concatChannels([background, sliceChannels(a, 1..<oldClasses)]) : background
        }
        let oldEmbedding = withNoGrad { localPODEmbedding(square(b), scales: scales) }
        let distance = reduction.share(
            ofMean: mean(rowNorms(localPODEmbedding(square(newMap), scales: scales) - oldEmbedding)),
            count: Double(a.shape[0]))
        let weight = (index == new.count - 1 ? logitsFactor : factor) * schedule
        total = total.map { $0 + weight * distance } ?? weight * distance
    }
    return total! * (1 / Float(new.count))
}
