import XCTest

@testable import HRHF

/// The fused unbiased cross-entropy and distillation ops against the compositions of logsumexp,
/// slices, concatenations and `nllLoss` they replace: the same values and gradients to float32
/// rounding, on maps wider than one pixel block (512) so block edges and vector tails are crossed.
final class FusedLossTests: XCTestCase {
    /// The composition `mergedBackgroundNLL` computed before it was one op.
    func composedNLL(_ logits: Tensor, _ target: Labels, merged: [Range<Int>], kept: Int, weights: Tensor?) -> Tensor {
        let den = logSumExp(logits)
        let slices = merged.map { sliceChannels(logits, $0) }
        let background = logSumExp(slices.count == 1 ? slices[0] : concatChannels(slices)) - den
        let parts = kept > 1 ? [background, sliceChannels(logits, 1..<kept) - den] : [background]
        return nllLoss(concatChannels(parts), target, pixelWeights: weights)
    }

    /// The composition `unbiasedDistillation` computed before it was one op.
    func composedKD(_ newLogits: Tensor, _ oldLogits: Tensor, temperature: Float, mask: Tensor?) -> Tensor {
        let old = oldLogits.shape[1], c = newLogits.shape[1]
        let x = newLogits * (1 / temperature)
        let q = withNoGrad { softmax(oldLogits * (1 / temperature)) }
        let den = logSumExp(x)
        let background = logSumExp(concatChannels([sliceChannels(x, 0..<1), sliceChannels(x, old..<c)])) - den
        let perPixel =
            sliceChannels(q, 0..<1) * background
            + sum(sliceChannels(q, 1..<old) * (sliceChannels(x, 1..<old) - den), axes: [1], keepDims: true)
        return -composedMaskedMean(perPixel, mask) * (1 / Float(old))
    }

    /// Mean of an N x 1 x H x W map over the pixels where `mask` is 1, as the terms computed it.
    func composedMaskedMean(_ x: Tensor, _ mask: Tensor?) -> Tensor {
        guard let mask else { return mean(x) }
        let count = mask.array.reduce(0, +)
        return count > 0 ? sum(x * mask) * (1 / count) : sum(x * 0)
    }

    /// The composition `softDistillation` computed before it was one op.
    func composedSoft(_ newLogits: Tensor, _ oldLogits: Tensor, temperature: Float) -> Tensor {
        let old = oldLogits.shape[1]
        let logP = logSoftmax(sliceChannels(newLogits, 0..<old) * (1 / temperature))
        let (q, logQ) = withNoGrad {
            (softmax(oldLogits * (1 / temperature)), logSoftmax(oldLogits * (1 / temperature)))
        }
        return sum(q * (logQ - logP)) * (temperature * temperature / Float(q.count / old))
    }

    /// The composition of `sharpEntropy`'s entropy term before it was one op.
    func composedEntropy(_ logits: Tensor, _ mask: Tensor) -> Tensor {
        let logP = logSoftmax(logits)
        return composedMaskedMean(-sum(exp(logP) * logP, axes: [1], keepDims: true), mask)
    }

    /// `gradientCompensationWeights` as it was computed from the full softmax.
    func composedCompensation(
        _ logits: Tensor, _ target: Labels, stepOfClass: [Int], currentStep: Int, z: Float, merged: Range<Int>?
    ) -> [Float] {
        let p = softmax(logits).array
        let (n, c, h, w) = nchw(logits, "test")
        let hw = h * w
        var g = [Float](repeating: 0, count: n * hw), sums = [Double](repeating: 0, count: currentStep + 1)
        var counts = [Int](repeating: 0, count: currentStep + 1)
        for j in 0..<(n * hw) {
            let y = Int(target.values[j])
            guard y != 255, stepOfClass[y] < currentStep else { continue }
            var py = p[(j / hw * c + y) * hw + j % hw]
            if y == 0, let merged { for k in merged { py += p[(j / hw * c + k) * hw + j % hw] } }
            g[j] = Foundation.pow(max(1 - py, 0), z)
            sums[stepOfClass[y]] += Double(g[j])
            counts[stepOfClass[y]] += 1
        }
        return (0..<(n * hw)).map { j in
            let y = Int(target.values[j])
            guard y != 255 else { return 0 }
            guard stepOfClass[y] < currentStep else { return 1 }
            return min(max(Float(Double(g[j]) * Double(counts[stepOfClass[y]]) / sums[stepOfClass[y]]), 0.1), 5)
        }
    }

    func assertClose(
        _ fused: (Float, [Float]), _ composed: (Float, [Float]), _ what: String, line: UInt = #line
    ) {
        XCTAssertEqual(fused.0, composed.0, accuracy: 2e-6 * abs(composed.0), what, line: line)
        // Swift's max() passes over a NaN, so a NaN anywhere is a failure of its own.
        XCTAssertFalse(fused.0.isNaN || fused.1.contains { $0.isNaN }, "\(what): NaN", line: line)
        let scale = composed.1.map(abs).max()!
        XCTAssertGreaterThan(scale, 0, what, line: line)
        let worst = zip(fused.1, composed.1).map { abs($0 - $1) }.max()!
        XCTAssertLessThanOrEqual(worst, 2e-6 * scale, "\(what): gradient", line: line)
    }

    func testMergedBackgroundNLLMatchesTheComposition() {
        var rng = SeededGenerator(seed: 11)
        let shape = [2, 21, 20, 30]
        let logits = Tensor.randn(shape, std: 3, rng: &rng)
        let weights = Tensor.uniform([2, 20, 30], low: 0.2, high: 3, rng: &rng)
        // Real labels: background, re-labelled old classes, new classes, ignored.
        let real = Labels(
            shape: [2, 20, 30], values: (0..<1200).map { _ in [0, 0, 3, 15, 16, 20, 255][Int(rng.next() % 7)] })
        for w in [nil, weights] {
            assertClose(
                valueAndGradient(logits) { unbiasedCrossEntropy($0, real, oldClasses: 16, pixelWeights: w) },
                valueAndGradient(logits) { self.composedNLL($0, real, merged: [0..<16], kept: 21, weights: w) },
                "unbiased CE, weighted: \(w != nil)")
        }
        let fake = Labels(shape: [2, 20, 30], values: (0..<1200).map { _ in [0, 1, 9, 15, 255][Int(rng.next() % 5)] })
        assertClose(
            valueAndGradient(logits) { foldedCrossEntropy($0, fake, oldClasses: 16, pixelWeights: weights) },
            valueAndGradient(logits) {
                self.composedNLL($0, fake, merged: [0..<1, 16..<21], kept: 16, weights: weights)
            },
            "folded CE")
        let ignored = Labels(shape: [2, 20, 30], repeating: 255)
        let none = valueAndGradient(logits) { unbiasedCrossEntropy($0, ignored, oldClasses: 16) }
        XCTAssertEqual(none.0, 0)
        XCTAssertEqual(none.1.map(abs).max(), 0, "no pixel to score: a zero gradient")
    }

    func testUnbiasedDistillationMatchesTheComposition() {
        var rng = SeededGenerator(seed: 12)
        let new = Tensor.randn([2, 21, 20, 30], std: 3, rng: &rng),
            old = Tensor.randn([2, 16, 20, 30], std: 3, rng: &rng)
        let mask = Tensor(shape: [2, 1, 20, 30], values: (0..<1200).map { _ in rng.next() % 3 == 0 ? 0 : 1 })
        for temperature: Float in [1, 2] {
            for m in [nil, mask] {
                assertClose(
                    valueAndGradient(new) { unbiasedDistillation($0, old, temperature: temperature, mask: m) },
                    valueAndGradient(new) { self.composedKD($0, old, temperature: temperature, mask: m) },
                    "unbiased KD, T \(temperature), masked: \(m != nil)")
            }
        }
        let empty = Tensor(zeros: [2, 1, 20, 30])
        let none = valueAndGradient(new) { unbiasedDistillation($0, old, mask: empty) }
        XCTAssertEqual(none.0, 0)
        XCTAssertEqual(none.1.map(abs).max(), 0, "an empty mask: a zero gradient")
    }

    func testGSCTermsMatchTheCompositions() {
        var rng = SeededGenerator(seed: 13)
        let new = Tensor.randn([2, 21, 20, 30], std: 3, rng: &rng),
            old = Tensor.randn([2, 16, 20, 30], std: 3, rng: &rng)
        for temperature: Float in [1, 2] {
            assertClose(
                valueAndGradient(new) { softDistillation($0, old, temperature: temperature) },
                valueAndGradient(new) { self.composedSoft($0, old, temperature: temperature) },
                "soft distillation, T \(temperature)")
        }
        let mask = withNoGrad {
            Tensor(shape: [2, 1, 20, 30], values: channelArgmax(softmax(old)).values.map { $0 >= 0.5 ? 1 : 0 })
        }
        XCTAssertGreaterThan(mask.array.reduce(0, +), 100)
        assertClose(
            valueAndGradient(new) { sharpEntropy($0, old, confidence: 0.5) },
            valueAndGradient(new) { self.composedEntropy($0, mask) }, "sharpness")
        let none = valueAndGradient(new) { sharpEntropy($0, old, confidence: 1.5) }
        XCTAssertEqual(none.0, 0)
        XCTAssertEqual(none.1.map(abs).max(), 0, "no confident pixel: a zero gradient")
        // Classes 0-15 of step 0, 16-20 of step 1; labels of both steps and ignored pixels.
        let steps = (0..<21).map { $0 < 16 ? 0 : 1 }
        let labels = Labels(
            shape: [2, 20, 30], values: (0..<1200).map { _ in [0, 0, 2, 15, 16, 20, 255][Int(rng.next() % 7)] })
        for merged in [nil, 1..<16, 16..<21] {
            let fused = gradientCompensationWeights(
                new, labels, stepOfClass: steps, currentStep: 1, z: 3.2, wMin: 0.1, wMax: 5,
                backgroundIncludes: merged
            ).array
            let composed = composedCompensation(new, labels, stepOfClass: steps, currentStep: 1, z: 3.2, merged: merged)
            XCTAssertEqual(Set(composed.map { $0 == 0 ? 0 : $0 == 1 ? 1 : 2 }).count, 3, "ignored, new and old pixels")
            XCTAssertLessThanOrEqual(
                zip(fused, composed).map { abs($0 - $1) / max($1, 1e-3) }.max()!, 1e-4,
                "compensation weights, background with \(String(describing: merged))")
        }
    }

    /// GSC's terms as `StepBatch` computes them, from one `gscTermSums` for those requested.
    func gscTogether(
        _ new: Tensor, _ old: Tensor, _ prediction: OldPrediction, soft: Float, sharp: Float, rel: Float
    ) -> Tensor {
        let sums = gscTermSums(
            new, old, channels: old.shape[1],
            GSCTermRequest(
                softTemperature: soft > 0 ? 2 : nil,
                sharpMask: sharp > 0 ? prediction.confidenceMask(threshold: 0.5) : nil,
                relation: rel > 0 ? relationInputs(prediction) : nil))
        var total = Tensor(scalar: 0)
        if soft > 0 { total = total + soft * sums.softDistillation(reduction: .local) }
        if sharp > 0 { total = total + sharp * sums.sharpEntropy(reduction: .local) }
        if rel > 0 { total = total + rel * sums.relationDistillation(reduction: .local) }
        return total
    }

    /// The same terms each computed alone.
    func gscAlone(_ new: Tensor, _ old: Tensor, soft: Float, sharp: Float, rel: Float) -> Tensor {
        var total = Tensor(scalar: 0)
        if soft > 0 { total = total + soft * softDistillation(new, old, temperature: 2) }
        if sharp > 0 { total = total + sharp * sharpEntropy(new, old, confidence: 0.5) }
        if rel > 0 { total = total + rel * relationDistillation(new, old) }
        return total
    }

    func testGSCTermsTogetherMatchTheTermsAlone() {
        var rng = SeededGenerator(seed: 17)
        let old = Tensor.randn([2, 16, 20, 30], std: 3, rng: &rng)
        // Then with the new classes' logits far above the old ones on some pixels: the softmax
        // over the old channels cannot come from the exps over all channels there.
        var far = Tensor.randn([2, 21, 20, 30], std: 3, rng: &rng).array
        for j in stride(from: 0, to: 600, by: 7) { far[(1 * 21 + 18) * 600 + j] += 150 }
        for values in [Tensor.randn([2, 21, 20, 30], std: 3, rng: &rng).array, far] {
            let new = Tensor(shape: [2, 21, 20, 30], values: values), prediction = OldPrediction(old)
            for (soft, sharp, rel): (Float, Float, Float) in [(0.25, 0.02, 0.25), (0, 1, 1), (1, 0, 1), (1, 1, 0)] {
                let together = valueAndGradient(new) {
                    self.gscTogether($0, old, prediction, soft: soft, sharp: sharp, rel: rel)
                }
                let alone = valueAndGradient(new) { self.gscAlone($0, old, soft: soft, sharp: sharp, rel: rel) }
                assertClose(together, alone, "GSC terms \(soft) soft, \(sharp) sharp, \(rel) relation")
            }
        }
    }

    func testGSCTermsTogetherHaveFiniteDifferenceGradients() {
        var rng = SeededGenerator(seed: 5)
        let new = Tensor.randn([2, 6, 3, 4], rng: &rng), old = Tensor.randn([2, 4, 3, 4], rng: &rng)
        let prediction = OldPrediction(old)
        checkGradients([new]) { self.gscTogether($0[0], old, prediction, soft: 1, sharp: 1, rel: 1) }
    }

    func testMaskedUnbiasedDistillationHasFiniteDifferenceGradients() {
        let new = randn([2, 6, 3, 4], seed: 1, std: 1.5), old = randn([2, 4, 3, 4], seed: 2, std: 1.5)
        let mask = Tensor(shape: [2, 1, 3, 4], values: (0..<24).map { Float($0 % 3 == 0 ? 0 : 1) })
        checkGradients([new]) { unbiasedDistillation($0[0], old, temperature: 2, mask: mask) }
    }

    /// Pixels whose merged channels lie 200 below the others (their exps, shifted by the overall
    /// peak, underflow to 0) still match the compositions, which take each logsumexp with its
    /// own peak: the fused ops fall back to the merged set's own peak there, forward and backward.
    func testFusedOpsMatchTheCompositionsWhenTheMergedChannelsUnderflow() {
        var rng = SeededGenerator(seed: 14)
        let shape = [2, 21, 20, 30], hw = 600
        var values = Tensor.randn(shape, std: 3, rng: &rng).array
        // Every third pixel: channels 0..<16 (unbiased CE's merged set) and 0, 16..<21 (KD's) far below.
        for b in 0..<2 {
            for j in stride(from: 0, to: hw, by: 3) {
                for k in 0..<16 { values[(b * 21 + k) * hw + j] -= 200 }
            }
            for j in stride(from: 1, to: hw, by: 3) {
                for k in [0, 16, 17, 18, 19, 20] { values[(b * 21 + k) * hw + j] -= 200 }
            }
        }
        let logits = Tensor(shape: shape, values: values)
        let labels = Labels(
            shape: [2, 20, 30], values: (0..<1200).map { _ in [0, 0, 3, 16, 20][Int(rng.next() % 5)] })
        assertClose(
            valueAndGradient(logits) { unbiasedCrossEntropy($0, labels, oldClasses: 16) },
            valueAndGradient(logits) { self.composedNLL($0, labels, merged: [0..<16], kept: 21, weights: nil) },
            "unbiased CE")
        let old = Tensor.randn([2, 16, 20, 30], std: 3, rng: &rng)
        for temperature: Float in [1, 2] {
            assertClose(
                valueAndGradient(logits) { unbiasedDistillation($0, old, temperature: temperature) },
                valueAndGradient(logits) { self.composedKD($0, old, temperature: temperature, mask: nil) },
                "unbiased KD, T \(temperature)")
        }
    }

    /// The cross-entropies, the unbiased KD and the compensation weights read from log-sum-exps
    /// computed once per half give what each computes alone: the losses and gradients bit for bit
    /// (the same kernel makes them), the weights to 1e-5 relative (they took two log-sum-exps).
    func testUnbiasedDistillationFromTheOldPredictionMatchesItAlone() {
        var rng = SeededGenerator(seed: 19)
        let logits = Tensor.randn([2, 21, 20, 30], std: 3, rng: &rng)
        // A batch of three images' old logits, of which the KD reads the last two (a fake half).
        let batch = Tensor.randn([3, 16, 20, 30], std: 3, rng: &rng), old = sliceBatch(batch, 1..<3)
        let prediction = OldPrediction(batch)
        let mask = Tensor(shape: [2, 1, 20, 30], values: (0..<1200).map { _ in Float(rng.next() % 2) })
        for mask in [nil, mask] {
            let alone = valueAndGradient(logits) {
                unbiasedDistillation($0, old, temperature: 1, mask: mask, reduction: .local, logSumExps: nil)
            }
            let given = valueAndGradient(logits) {
                unbiasedDistillation(
                    $0, old, temperature: 1, mask: mask, reduction: .local, logSumExps: nil,
                    oldSoftmax: (prediction.wholeProbabilities, 1))
            }
            assertClose(given, alone, "unbiased KD from the old prediction, mask \(mask != nil)")
        }
    }

    func testTermsFromSharedLogSumExpsMatchTheTermsAlone() {
        var rng = SeededGenerator(seed: 15)
        let logits = Tensor.randn([2, 21, 20, 30], std: 3, rng: &rng)
        let old = Tensor.randn([2, 16, 20, 30], std: 3, rng: &rng)
        let steps = (0..<21).map { $0 < 16 ? 0 : 1 }
        let real = Labels(
            shape: [2, 20, 30], values: (0..<1200).map { _ in [0, 0, 3, 15, 16, 20, 255][Int(rng.next() % 7)] })
        let fake = Labels(shape: [2, 20, 30], values: (0..<1200).map { _ in [0, 1, 9, 15, 255][Int(rng.next() % 5)] })
        let unbiased = unbiasedBackground(oldClasses: 16), folded = foldedBackground(oldClasses: 16, classes: 21)
        for (labels, merged, includes) in [(real, unbiased, 1..<16), (fake, folded, 16..<21)] {
            let sums = channelSetLogSumExps(logits, merged: merged, scale: 1)
            let alone = gradientCompensationWeights(
                logits, labels, stepOfClass: steps, currentStep: 1, z: 3.2, wMin: 0.1, wMax: 5,
                backgroundIncludes: includes
            ).array
            let shared = gradientCompensationWeights(
                logits, labels, stepOfClass: steps, currentStep: 1, z: 3.2, wMin: 0.1, wMax: 5,
                backgroundIncludes: includes, reduction: .local, logSumExps: sums
            ).array
            XCTAssertGreaterThan(Set(alone).count, 100, "weights of many values")
            XCTAssertLessThanOrEqual(
                zip(shared, alone).map { abs($0 - $1) / max($1, 1e-3) }.max()!, 1e-5, "compensation over \(merged)")
        }
        let realSums = channelSetLogSumExps(logits, merged: unbiased, scale: 1)
        let fakeSums = channelSetLogSumExps(logits, merged: folded, scale: 1)
        let weights = Tensor.uniform([2, 20, 30], low: 0.2, high: 3, rng: &rng)
        let terms: [(String, ChannelSetLogSumExps, (Tensor, ChannelSetLogSumExps?) -> Tensor)] = [
            (
                "unbiased CE", realSums,
                {
                    mergedBackgroundNLL(
                        $0, real, merged: unbiased, kept: 21, pixelWeights: weights, reduction: .local,
                        logSumExps: $1)
                }
            ),
            (
                "folded CE", fakeSums,
                {
                    mergedBackgroundNLL(
                        $0, fake, merged: folded, kept: 16, pixelWeights: weights, reduction: .local,
                        logSumExps: $1)
                }
            ),
            (
                "unbiased KD", fakeSums,
                { unbiasedDistillation($0, old, temperature: 1, mask: nil, reduction: .local, logSumExps: $1) }
            ),
        ]
        for (what, sums, term) in terms {
            let alone = valueAndGradient(logits) { term($0, nil) }
            let shared = valueAndGradient(logits) { term($0, sums) }
            XCTAssertNotEqual(alone.0, 0, what)
            XCTAssertEqual(shared.0, alone.0, what)
            XCTAssertEqual(shared.1, alone.1, "\(what): gradient")
        }
    }

    func testTermsFromSharedLogSumExpsHaveFiniteDifferenceGradients() {
        let new = randn([2, 6, 3, 4], seed: 3, std: 1.5), old = randn([2, 4, 3, 4], seed: 4, std: 1.5)
        let labels = Labels(shape: [2, 3, 4], values: (0..<24).map { [0, 1, 3, 255][$0 % 4] })
        let folded = foldedBackground(oldClasses: 4, classes: 6)
        checkGradients([new]) {
            let sums = channelSetLogSumExps($0[0], merged: folded, scale: 1)
            return mergedBackgroundNLL(
                $0[0], labels, merged: folded, kept: 4, pixelWeights: nil, reduction: .local, logSumExps: sums)
                + unbiasedDistillation($0[0], old, temperature: 1, mask: nil, reduction: .local, logSumExps: sums)
        }
    }

    /// The cross-entropy and the unbiased KD as one op give each op's value and the sum of their
    /// gradients bit for bit: on the real half's sets (unbiased CE, the KD's own log-sum-exps) and
    /// the fake half's (folded, shared), with the old softmax computed or given, with pixel weights.
    func testCrossEntropyAndKDTogetherMatchTheOpsAlone() {
        var rng = SeededGenerator(seed: 31)
        let logits = Tensor.randn([3, 21, 20, 29], std: 2, rng: &rng)
        let old = Tensor.randn([3, 16, 20, 29], std: 2, rng: &rng)
        let real = Labels(
            shape: [3, 20, 29], values: (0..<1740).map { _ in [0, 0, 3, 16, 20, 255][Int(rng.next() % 6)] })
        let fake = Labels(shape: [3, 20, 29], values: (0..<1740).map { _ in [0, 1, 9, 15, 255][Int(rng.next() % 5)] })
        let weights = Tensor.uniform([3, 20, 29], low: 0.2, high: 3, rng: &rng)
        let unbiased = unbiasedBackground(oldClasses: 16), folded = foldedBackground(oldClasses: 16, classes: 21)
        // The old model's softmax on a batch of 5 of which these are images 1-3.
        let wider = concatBatch([randn([1, 16, 20, 29], seed: 7), old, randn([1, 16, 20, 29], seed: 8)])
        let given = (softmax(wider), 1)
        var cases = 0
        for (labels, merged, kept, pixelWeights) in [(real, unbiased, 21, weights), (fake, folded, 16, nil)] {
            for oldSoftmax in [nil, given] {
                let sums = channelSetLogSumExps(logits, merged: merged, scale: 1)
                let alone = valueAndGradient(logits) {
                    channelSetNLL($0, labels, merged: merged, kept: kept, pixelWeights: pixelWeights, logSumExps: sums)
                        + 10 * unbiasedDistillationLoss($0, old, temperature: 1, mask: nil, oldSoftmax: oldSoftmax)
                }
                var values: [Float] = []
                let together = valueAndGradient(logits) {
                    let both = channelSetNLLAndUnbiasedKD(
                        $0, labels, merged: merged, kept: kept, pixelWeights: pixelWeights, logSumExps: sums,
                        oldLogits: old, oldSoftmax: oldSoftmax)
                    values = both.array
                    return reshape(sliceBatch(both, 0..<1), []) + 10 * reshape(sliceBatch(both, 1..<2), [])
                }
                let ce = channelSetNLL(logits, labels, merged: merged, kept: kept, pixelWeights: pixelWeights)
                let kd = unbiasedDistillationLoss(logits, old, temperature: 1, mask: nil, oldSoftmax: oldSoftmax)
                XCTAssertEqual(values, [ce.item, kd.item], "\(merged)")
                XCTAssertNotEqual(values[0] * values[1], 0)
                XCTAssertEqual(together.0, alone.0)
                XCTAssertEqual(together.1, alone.1, "\(merged), old softmax given: \(oldSoftmax != nil)")
                cases += 1
            }
        }
        XCTAssertEqual(cases, 4)
    }

    /// Log-sum-exps over two sets from one pass are each bit for bit the one computed alone,
    /// also where a set lies far below the rest (its own peak then).
    func testLogSumExpsOverTwoSetsMatchEachAlone() {
        var rng = SeededGenerator(seed: 33)
        var values = Tensor.randn([2, 21, 20, 30], std: 2, rng: &rng).array
        // In some pixels the new channels (16..<21) stand 120 above the rest, in others the old
        // ones but background (1..<16): each set in turn lies far below the peak.
        for j in 0..<600 where j % 7 == 0 {
            for k in 16..<21 { values[(21 + k) * 600 + j] += 120 }
        }
        for j in 0..<600 where j % 7 == 3 {
            for k in 1..<16 { values[k * 600 + j] += 120 }
        }
        let logits = Tensor(shape: [2, 21, 20, 30], values: values)
        let unbiased = unbiasedBackground(oldClasses: 16), folded = foldedBackground(oldClasses: 16, classes: 21)
        for scale: Float in [1, 0.5] {
            let both = channelSetLogSumExps(logits, merged: [unbiased, folded], scale: scale)
            for (sums, merged) in zip(both, [unbiased, folded]) {
                let alone = channelSetLogSumExps(logits, merged: merged, scale: scale)
                XCTAssertTrue(sums.matches(logits, merged: merged, scale: scale))
                XCTAssertEqual(sums.all.array, alone.all.array)
                XCTAssertEqual(sums.union.array, alone.union.array, "\(merged) at \(scale)")
                XCTAssertTrue(sums.union.array.allSatisfy(\.isFinite))
            }
        }
    }

    func testCrossEntropyAndKDTogetherHaveFiniteDifferenceGradients() {
        let new = randn([2, 6, 3, 4], seed: 13, std: 1.5), old = randn([2, 4, 3, 4], seed: 14, std: 1.5)
        let labels = Labels(shape: [2, 3, 4], values: (0..<24).map { [0, 1, 3, 5, 255][$0 % 5] })
        var rng = SeededGenerator(seed: 15)
        let weights = Tensor.uniform([2, 3, 4], low: 0.5, high: 2, rng: &rng)
        checkGradients([new]) {
            let both = channelSetNLLAndUnbiasedKD(
                $0[0], labels, merged: unbiasedBackground(oldClasses: 4), kept: 6, pixelWeights: weights,
                logSumExps: nil, oldLogits: old, oldSoftmax: nil)
            return reshape(sliceBatch(both, 0..<1), []) + 3 * reshape(sliceBatch(both, 1..<2), [])
        }
    }

    /// `softmaxWithArgmax` gives softmax's probabilities and gradient and `channelArgmax`'s
    /// indices and values of them bit for bit, ties (equal channels) included.
    func testSoftmaxWithArgmaxEqualsTheOpsInTurn() {
        var rng = SeededGenerator(seed: 15)
        var values = Tensor.randn([2, 7, 20, 30], std: 2, rng: &rng).array
        for j in 0..<600 where j % 4 == 0 { values[(7 + 5) * 600 + j] = values[(7 + 2) * 600 + j] }
        let x = Tensor(shape: [2, 7, 20, 30], values: values), weights = Tensor.randn([2, 7, 20, 30], rng: &rng)
        x.requiresGrad = true
        let (p, indices, best) = softmaxWithArgmax(x)
        sum(p * weights).backward()
        let fusedGradient = x.grad!.array
        x.grad = nil
        let reference = softmax(x)
        sum(reference * weights).backward()
        let argmax = channelArgmax(reference)
        XCTAssertEqual(p.array, reference.array)
        XCTAssertEqual(indices, argmax.indices)
        XCTAssertEqual(best, argmax.values)
        XCTAssertEqual(fusedGradient, x.grad!.array)
        XCTAssertEqual(Set(indices).count, 7)
    }
}
