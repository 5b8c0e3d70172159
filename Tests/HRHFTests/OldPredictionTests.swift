import XCTest

@testable import HRHF

/// The old model's prediction computed once per step and the relation term's fused op, against
/// the per-term computations they replace: the same values (bitwise where the arithmetic is the
/// same) and gradients to float32 rounding, on maps wider than one pixel block (512 pixels).
final class OldPredictionTests: XCTestCase {
    let new = randn([2, 21, 20, 30], seed: 21, std: 3), old = randn([2, 16, 20, 30], seed: 22, std: 3)

    /// `relationDistillation` before its per-pixel work was one op.
    func composedRelation(_ newLogits: Tensor, _ oldLogits: Tensor) -> Tensor {
        let classes = oldLogits.shape[1]
        let pNew = softmax(sliceChannels(newLogits, 0..<classes))
        let (q, assignment) = withNoGrad { () -> (Tensor, [Int32]) in
            let q = softmax(oldLogits)
            return (q, channelArgmax(q).indices)
        }
        let rows = Set(assignment).count
        let rowsNew = classConditionalMeans(pNew, assignment: assignment, classes: classes)
        let rowsOld = withNoGrad { classConditionalMeans(q, assignment: assignment, classes: classes) }
        return sum(abs(rowsNew - rowsOld)) * (1 / Float(rows * classes))
    }

    /// Largest difference of `a` and `b` relative to the largest magnitude in `b`.
    func relativeDifference(_ a: [Float], _ b: [Float]) -> Float {
        precondition(a.count == b.count)
        return zip(a, b).map { Swift.abs($0 - $1) }.max()! / max(b.map { Swift.abs($0) }.max()!, .leastNormalMagnitude)
    }

    func testPredictionIsTheArgmaxOfTheSoftmaxAndItsImages() {
        let prediction = OldPrediction(old)
        let q = softmax(old)
        let (indices, best) = channelArgmax(q)
        XCTAssertEqual(prediction.argmax, indices)
        XCTAssertEqual(prediction.confidence, best)
        XCTAssertEqual(prediction.probabilities.array, q.array)
        XCTAssertEqual(prediction.shape, [2, 16, 20, 30])
        XCTAssertEqual(Set(indices).count, 16, "every class is someone's argmax")
        // The second image alone: the same as the prediction computed from its logits.
        let second = prediction.images(1..<2), alone = OldPrediction(sliceBatch(old, 1..<2))
        XCTAssertEqual(second.shape, [1, 16, 20, 30])
        XCTAssertEqual(second.argmax, alone.argmax)
        XCTAssertEqual(second.confidence, alone.confidence)
        XCTAssertEqual(second.probabilities.array, alone.probabilities.array)
        XCTAssertEqual(second.images(0..<1).argmax, alone.argmax, "a part of a part")
        // Confident labels and mask at 0.5: the argmax or 255, 1 or 0.
        let labels = prediction.confidentLabels(threshold: 0.5)
        XCTAssertEqual(labels.shape, [2, 20, 30])
        XCTAssertEqual(labels.values, zip(indices, best).map { $1 >= 0.5 ? $0 : 255 })
        XCTAssertEqual(prediction.confidenceMask(threshold: 0.5).array, best.map { $0 >= 0.5 ? 1 : 0 })
        XCTAssertGreaterThan(labels.values.filter { $0 == 255 }.count, 100)
        XCTAssertGreaterThan(labels.values.filter { $0 != 255 }.count, 100)
    }

    func testTermsGivenThePredictionComputeWhatTheyComputeAlone() {
        let prediction = OldPrediction(old)
        XCTAssertEqual(
            valueAndGradient(new) { sharpEntropy($0, old, confidence: 0.5, oldPrediction: prediction) }.1,
            valueAndGradient(new) { sharpEntropy($0, old, confidence: 0.5) }.1)
        let given = valueAndGradient(new) { relationDistillation($0, old, oldPrediction: prediction) }
        let alone = valueAndGradient(new) { relationDistillation($0, old) }
        XCTAssertEqual(given.0, alone.0)
        XCTAssertEqual(given.1, alone.1)
        let protos = Prototypes(vectors: (0..<16).map { k in k % 3 == 0 ? nil : [Float(k), 1, -1] }, channels: 3)
        let features = randn([2, 3, 5, 8], seed: 23, std: 5)
        var options = DistillationOptions(method: Method.table[0])
        (options.prototypeTau, options.prototypeOldConfidence) = (0.2, 0.3)
        let labels = Labels(shape: [2, 20, 30], values: (0..<1200).map { $0 % 5 == 0 ? 17 : 0 })
        let relabelled = protos.relabel(
            labels, oldLogits: old, oldFeatures: features, options: options, oldPrediction: prediction)
        XCTAssertEqual(
            relabelled.values, protos.relabel(labels, oldLogits: old, oldFeatures: features, options: options).values)
        XCTAssertGreaterThan(relabelled.values.filter { $0 != 0 && $0 != 17 }.count, 0, "some pixels re-labelled")
    }

    func testRelationTermMatchesTheComposition() {
        let fused = valueAndGradient(new) { relationDistillation($0, old) }
        let composed = valueAndGradient(new) { self.composedRelation($0, old) }
        XCTAssertGreaterThan(fused.0, 0.01)
        XCTAssertEqual(fused.0, composed.0, accuracy: 1e-6 * composed.0)
        XCTAssertLessThanOrEqual(relativeDifference(fused.1, composed.1), 1e-6)
        // Elements (image * 21 + channel) * 600 + pixel: channels 16-20 are the new classes'.
        let newChannels = fused.1.indices.filter { $0 / 600 % 21 >= 16 }.map { Swift.abs(fused.1[$0]) }
        XCTAssertEqual(newChannels.count, 2 * 5 * 600)
        XCTAssertEqual(newChannels.max(), 0, "no gradient on the new classes' channels")
    }

    func testSoftmaxClassMeansMatchesTheComposition() {
        // Some pixels assigned to no class (-1), class 4 to none.
        var rng = SeededGenerator(seed: 24)
        let assignment = (0..<1200).map { _ in [-1, 0, 1, 2, 3, 5, 6][Int(rng.next() % 7)] as Int32 }
        let q = softmax(old)
        let weights = randn([7, 16], seed: 25)
        let fused = softmaxClassMeans(new, channels: 16, assignment: assignment, classes: 7, alongside: q)
        let composed = classConditionalMeans(softmax(sliceChannels(new, 0..<16)), assignment: assignment, classes: 7)
        XCTAssertLessThanOrEqual(relativeDifference(fused.means.array, composed.array), 1e-6)
        XCTAssertEqual(
            fused.means.array[(4 * 16)..<(5 * 16)], ArraySlice(repeating: 0, count: 16), "class 4 has no pixel")
        XCTAssertLessThanOrEqual(
            relativeDifference(
                fused.constantMeans!.array, classConditionalMeans(q, assignment: assignment, classes: 7).array),
            1e-6)
        let gradient = valueAndGradient(new) {
            sum(softmaxClassMeans($0, channels: 16, assignment: assignment, classes: 7).means * weights)
        }
        let composedGradient = valueAndGradient(new) {
            sum(classConditionalMeans(softmax(sliceChannels($0, 0..<16)), assignment: assignment, classes: 7) * weights)
        }
        XCTAssertLessThanOrEqual(relativeDifference(gradient.1, composedGradient.1), 1e-5)
        XCTAssertNil(softmaxClassMeans(new, channels: 16, assignment: assignment, classes: 7).constantMeans)
    }

    func testSoftmaxClassMeansHasFiniteDifferenceGradients() {
        let logits = randn([2, 6, 3, 4], seed: 26, std: 1.5), weights = randn([3, 4], seed: 27)
        let assignment: [Int32] = (0..<24).map { [-1, 0, 1, 2][$0 % 4] }
        checkGradients([logits]) {
            sum(softmaxClassMeans($0[0], channels: 4, assignment: assignment, classes: 3).means * weights)
        }
    }
}
