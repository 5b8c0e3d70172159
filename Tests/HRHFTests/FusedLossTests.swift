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
        return -maskedMean(perPixel, mask) * (1 / Float(old))
    }

    /// Value and gradient of `loss` at `x`.
    func valueAndGradient(_ x: Tensor, _ loss: (Tensor) -> Tensor) -> (Float, [Float]) {
        x.grad = nil
        x.requiresGrad = true
        let value = loss(x)
        value.backward()
        return (value.item, x.grad!.array)
    }

    func assertClose(
        _ fused: (Float, [Float]), _ composed: (Float, [Float]), _ what: String, line: UInt = #line
    ) {
        XCTAssertEqual(fused.0, composed.0, accuracy: 2e-6 * abs(composed.0), what, line: line)
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

    func testMaskedUnbiasedDistillationHasFiniteDifferenceGradients() {
        let new = randn([2, 6, 3, 4], seed: 1, std: 1.5), old = randn([2, 4, 3, 4], seed: 2, std: 1.5)
        let mask = Tensor(shape: [2, 1, 3, 4], values: (0..<24).map { Float($0 % 3 == 0 ? 0 : 1) })
        checkGradients([new]) { unbiasedDistillation($0[0], old, temperature: 2, mask: mask) }
    }
}
