import XCTest

@testable import HRHF

/// PLOP's terms against the authors' own functions (Fixtures/plop.safetensors, written by
/// tools/gen_plop_fixtures.py from PLOP's train.py in float64). float32 sums of a few thousand
/// terms: relative error about 1e-6, so 1e-5 is the bound.
final class PLOPTests: XCTestCase {
    let file = "plop.safetensors"
    func t(_ key: String) throws -> Tensor { try Fixtures.tensor(file, key) }
    func labels(_ key: String) throws -> Labels {
        let v = try t(key)
        return Labels(shape: v.shape, values: v.array.map { Int32($0) })
    }

    func testLocalPODMatchesPLOPsFeaturesDistillation() throws {
        let old = try (0..<4).map { try t("pod/old\($0)") }
        let new = try (0..<4).map { i -> Tensor in
            let x = try t("pod/new\(i)")
            x.requiresGrad = true
            return x
        }
        let loss = localPOD(new: new, old: old, oldClasses: 5, newClasses: 2)
        assertClose(loss, try t("pod/loss"), tolerance: 1e-5, "local POD")
        loss.backward()
        for i in 0..<4 { assertClose(new[i].grad, try t("pod/grad_new\(i)"), tolerance: 1e-5, "grad of map \(i)") }
        // As the methods table weighs it: 0.01 outside, the logits' factor 0.05 inside.
        let tableWeighted =
            0.01 * localPOD(new: new, old: old, oldClasses: 5, newClasses: 2, factor: 1, logitsFactor: 0.05)
        assertClose(tableWeighted, try t("pod/loss"), tolerance: 1e-5, "local POD as the table weighs it")
    }

    func testLocalPODOfEqualMapsIsZeroWithAZeroGradient() throws {
        let old = [try t("pod/old0"), try t("pod/old3")]
        let logits = concatChannels([old[1], Tensor(shape: [2, 2, 8, 8], values: [Float](repeating: -30, count: 256))])
        let stage = old[0].copy()
        stage.requiresGrad = true
        let loss = localPOD(new: [stage, logits], old: old, oldClasses: 5, newClasses: 2)
        // The new classes (-30 each) are added to the background logit: the logits differ, the stage does not.
        XCTAssertEqual(loss.item, try t("pod_equal/loss").item, accuracy: 1e-5 * max(1, try t("pod_equal/loss").item))
        loss.backward()
        XCTAssertEqual(stage.grad?.array.allSatisfy { $0 == 0 }, true, "PyTorch's norm has a zero gradient at 0")
        assertClose(stage.grad, try t("pod_equal/grad_new0"), tolerance: 0, "zero gradient")
    }

    func testPseudoLabelThresholdsLabelsAndAdaptiveFactorMatchPLOP() throws {
        let batches = try (0..<2).map {
            (oldLogits: try t("pseudo/old_logits\($0)"), labels: try labels("pseudo/labels\($0)"))
        }
        let thresholds = try PseudoLabelThresholds.measure(batches: 2, classesAfterStep: 7, base: 0.001) { batches[$0] }
        assertClose(
            Tensor(shape: [5], values: thresholds.values), try t("pseudo/thresholds"), tolerance: 1e-5, "thresholds")
        let (pseudo, weights) = plopPseudoLabels(
            batches[0].labels, oldLogits: batches[0].oldLogits, oldClasses: 5, thresholds: thresholds)
        XCTAssertEqual(pseudo.values, try labels("pseudo/pseudo_labels").values)
        XCTAssertTrue(
            pseudo.values.contains(255) && pseudo.values.contains { $0 >= 1 && $0 < 5 }, "both outcomes occur")
        let logits = try t("pseudo/new_logits")
        logits.requiresGrad = true
        let ce = crossEntropy(logits, pseudo, pixelWeights: weights)
        assertClose(ce, try t("pseudo/ce"), tolerance: 1e-5, "PLOP's cross-entropy")
        ce.backward()
        assertClose(logits.grad, try t("pseudo/grad_new_logits"), tolerance: 1e-5, "its gradient")
        // The adaptive factor of each image, recovered from the weights of one of its pixels.
        let valid = Float(pseudo.values.filter { $0 != 255 }.count) / Float(pseudo.count)
        let factors = (0..<3).map { weights.pointer[$0 * 36] / valid }
        assertClose(Tensor(shape: [3], values: factors), try t("pseudo/factor"), tolerance: 1e-5, "adaptive factors")
    }

    /// PLOP's reading of a histogram's median, on hand-made histograms.
    func testMedianReadingAsPLOPWritesIt() {
        // Half of 10 pixels is 5: the first bin holds 6, so the median is 5/6 of its width.
        var bins = [Int](repeating: 0, count: 100)
        bins[0] = 6
        bins[3] = 4
        XCTAssertEqual(
            PseudoLabelThresholds(histograms: [bins], maxEntropy: 1, base: 0).values[0], 0.05 / 6, accuracy: 1e-7)
        // Its running count adds bin indices (0, 1, 2, ...), not counts: with 4 pixels in bin 0
        // and 6 in bin 2, bin 1 is passed (count 0 + index 1 added), and bin 2 holds 5 <= 1 + 6.
        bins = [Int](repeating: 0, count: 100)
        bins[0] = 4
        bins[2] = 6
        XCTAssertEqual(
            PseudoLabelThresholds(histograms: [bins], maxEntropy: 1, base: 0).values[0], 0.02 + 4.0 / 6 * 0.01,
            accuracy: 1e-7)
        // A class the old model never predicts keeps the base threshold.
        XCTAssertEqual(
            PseudoLabelThresholds(histograms: [[Int](repeating: 0, count: 100)], maxEntropy: 1, base: 0.001).values,
            [0.001])
    }

    func testLocalPODEmbeddingAndRowNormsHaveFiniteDifferenceGradients() {
        let x = randn([2, 3, 10, 10], seed: 4)
        checkGradients([x], samples: 12) { localPODEmbedding(square($0[0]), scales: [1, 2, 4]) }
        let m = randn([3, 7], seed: 5)
        checkGradients([m], samples: 12) { rowNorms($0[0]) }
    }

    /// The stage sums PLOP distils: each stage's last block before its activation, in both flavours.
    func testStageSumsAreTheStagesBeforeTheirLastActivation() throws {
        let x = randn([1, 3, 32, 32], seed: 6)
        let (_, tv, _) = try SynthesisTests.tinyTeacher()
        let mib = try DeepLabV3(
            ArchitectureDescription(
                name: "tiny-mib", flavor: .mib, block: .bottleneck, layers: [1, 1, 1, 1], baseWidth: 4,
                outputStride: 16, headChannels: 8, classesPerStep: [3, 2]), seed: 3)
        for (model, activation) in [(tv, { relu($0) }), (mib, { leakyRelu($0, slope: 0.01) })]
            as [(DeepLabV3, (Tensor) -> Tensor)]
        {
            model.eval()
            let plain = model.run(x), kept = model.run(x, stageSums: true)
            XCTAssertEqual(kept.logits.array, plain.logits.array, "the same logits")
            XCTAssertEqual(kept.stageSums.count, 4)
            XCTAssertTrue(plain.stageSums.isEmpty)
            let stage4 = model.torchvisionBackbone?.features(x).stage4 ?? model.mibBody!(x)
            XCTAssertEqual(
                activation(kept.stageSums[3]).array, stage4.array, "the last stage's output is its sum activated")
            XCTAssertLessThan(kept.stageSums[3].array.min()!, 0, "a sum before the activation has negative values")
        }
    }
}
