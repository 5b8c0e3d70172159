import XCTest

@testable import HRHF

/// Finite-difference checks of every differentiable op (tolerances in `checkGradients`).
final class GradientCheckTests: XCTestCase {
    /// Values at least 0.1 away from zero, so kinks (relu, abs) are not straddled by the step.
    func awayFromZero(_ shape: [Int], seed: UInt64) -> Tensor {
        let t = randn(shape, seed: seed)
        for i in 0..<t.count { t.pointer[i] = (t.pointer[i] < 0 ? -0.1 : 0.1) + t.pointer[i] }
        return t
    }

    /// A shuffled ramp: distinct values 0.05 apart, so no max or top-k choice flips under the step.
    func distinctValues(_ shape: [Int], seed: UInt64) -> Tensor {
        var rng = SeededGenerator(seed: seed)
        let n = shape.reduce(1, *)
        var values = (0..<n).map { Float($0) * 0.05 - Float(n) * 0.025 }
        values.shuffle(using: &rng)
        return Tensor(shape: shape, values: values)
    }

    func testBroadcastArithmetic() {
        let shapes: [([Int], [Int])] = [
            ([2, 3, 4, 5], [2, 3, 4, 5]), ([2, 3, 4, 5], [1, 3, 1, 1]),
            ([2, 1, 4, 5], [2, 3, 1, 5]), ([3, 4], [1]), ([2, 3, 2, 2], [3, 1, 1]),
        ]
        for (i, (sa, sb)) in shapes.enumerated() {
            let a = randn(sa, seed: UInt64(10 + i)), b = randn(sb, seed: UInt64(20 + i))
            checkGradients([a, b]) { $0[0] + $0[1] }
            checkGradients([a, b]) { $0[0] - $0[1] }
            checkGradients([a, b]) { $0[0] * $0[1] }
            let positive = mapValues(b) { 1.5 + Swift.abs($0) }
            checkGradients([a, positive]) { $0[0] / $0[1] }
        }
        let a = randn([2, 3, 2, 2], seed: 3)
        checkGradients([a]) { 2.5 * $0[0] - 1 }
        checkGradients([a]) { 3 - $0[0] / 4 }
    }

    func testUnaryMaps() {
        let x = randn([2, 3, 4], seed: 4)
        let positive = mapValues(x) { 0.5 + Swift.abs($0) }
        checkGradients([x]) { exp($0[0]) }
        checkGradients([positive]) { log($0[0]) }
        checkGradients([positive]) { sqrt($0[0]) }
        checkGradients([x]) { square($0[0]) }
        checkGradients([awayFromZero([2, 3, 4], seed: 5)]) { abs($0[0]) }
        checkGradients([positive]) { pow($0[0], 1.7) }
        checkGradients([x]) { sigmoid($0[0]) }
    }

    func testActivations() {
        let x = awayFromZero([2, 3, 5, 4], seed: 6)
        checkGradients([x]) { relu($0[0]) }
        // 21 values: the SIMD loop's 16 and a scalar tail of 5.
        checkGradients([awayFromZero([3, 7], seed: 5)], samples: 21) { relu($0[0]) }
        checkGradients([x]) { leakyRelu($0[0], slope: 0.01) }
        checkGradients([x]) { leakyRelu($0[0], slope: 0.2) }
        // Bounds chosen away from every value (all values are >= 0.1 from 0, and +-0.05 is too).
        checkGradients([x]) { clamp($0[0], min: -0.05, max: 0.05) }
        checkGradients([x]) { clamp($0[0], min: -0.7, max: 1.2) }
        checkGradients([x]) { xs in
            var rng = SeededGenerator(seed: 7)
            return dropout(xs[0], p: 0.3, training: true, rng: &rng)
        }
    }

    func testConvolutionCombinations() {
        // (Cin, Cout, k, stride, padding, dilation, groups, bias)
        let cases: [(Int, Int, Int, Int, Int, Int, Int, Bool)] = [
            (3, 4, 3, 1, 1, 1, 1, true), (4, 6, 3, 2, 1, 1, 1, false), (4, 4, 3, 1, 2, 2, 1, true),
            (6, 4, 3, 1, 1, 1, 2, true), (4, 4, 3, 2, 3, 3, 4, false), (5, 3, 1, 1, 0, 1, 1, true),
            (4, 2, 1, 2, 0, 1, 1, false), (2, 3, 5, 2, 2, 1, 1, true), (3, 2, 3, 1, 0, 1, 1, true),
            // Dilation 7 on a 7x6 map: taps reading only padding are skipped (only the centre
            // column of taps is live horizontally, the centre row vertically).
            (3, 4, 3, 1, 7, 7, 1, true), (4, 4, 3, 1, 6, 6, 2, false),
        ]
        for (i, c) in cases.enumerated() {
            let x = randn([2, c.0, 7, 6], seed: UInt64(30 + i))
            let w = randn([c.1, c.0 / c.6, c.2, c.2], seed: UInt64(40 + i), std: 0.3)
            var inputs = [x, w]
            if c.7 { inputs.append(randn([c.1], seed: UInt64(50 + i))) }
            checkGradients(inputs, samples: 8) { t in
                conv2d(
                    t[0], weight: t[1], bias: t.count > 2 ? t[2] : nil, stride: (c.3, c.3),
                    padding: (c.4, c.4), dilation: (c.5, c.5), groups: c.6)
            }
        }
    }

    /// The fused evaluation block (conv, folded batch norm, activation) against the ops in turn:
    /// the same products with the affine applied in another order, so values and input
    /// gradients agree to a few float32 roundings (relative 1e-5); and finite differences.
    func testFusedConvolutionBlockMatchesTheLayersInTurn() {
        // (Cin, Cout, k, stride, padding, dilation, groups, conv bias, slope)
        let cases: [(Int, Int, Int, Int, Int, Int, Int, Bool, Float?)] = [
            (3, 4, 3, 1, 1, 1, 1, false, 0), (4, 6, 3, 2, 1, 1, 1, true, nil), (4, 4, 3, 1, 2, 2, 2, false, 0.01),
            (5, 3, 1, 1, 0, 1, 1, false, 0), (3, 4, 3, 1, 7, 7, 1, true, 0),
        ]
        for (i, c) in cases.enumerated() {
            let x = randn([2, c.0, 7, 6], seed: UInt64(130 + i))
            let w = randn([c.1, c.0 / c.6, c.2, c.2], seed: UInt64(140 + i), std: 0.3)
            let convBias = c.7 ? randn([c.1], seed: UInt64(150 + i)) : nil
            let gamma = randn([c.1], seed: UInt64(160 + i)), beta = randn([c.1], seed: UInt64(170 + i))
            let rm = randn([c.1], seed: UInt64(180 + i), std: 0.2),
                rv = mapValues(randn([c.1], seed: UInt64(190 + i))) { 0.5 + Swift.abs($0) }
            func layers(_ t: Tensor) -> Tensor {
                let y = batchNorm2d(
                    conv2d(
                        t, weight: w, bias: convBias, stride: (c.3, c.3), padding: (c.4, c.4),
                        dilation: (c.5, c.5), groups: c.6),
                    weight: gamma, bias: beta, runningMean: rm, runningVar: rv, training: false)
                return c.8.map { leakyRelu(y, slope: $0) } ?? y
            }
            let scale = Tensor(zeros: [c.1]), shift = Tensor(zeros: [c.1])
            for ch in 0..<c.1 {
                scale.pointer[ch] = gamma.pointer[ch] / (rv.pointer[ch] + 1e-5).squareRoot()
                shift.pointer[ch] =
                    beta.pointer[ch] - rm.pointer[ch] * scale.pointer[ch] + (convBias?.pointer[ch] ?? 0)
                    * scale.pointer[ch]
            }
            func fused(_ t: Tensor) -> Tensor {
                conv2dAffine(
                    t, weight: w, scale: scale, shift: shift, negativeSlope: c.8, stride: (c.3, c.3),
                    padding: (c.4, c.4), dilation: (c.5, c.5), groups: c.6)
            }
            let r = randn(
                [2, c.1, (7 + 2 * c.4 - c.5 * (c.2 - 1) - 1) / c.3 + 1, (6 + 2 * c.4 - c.5 * (c.2 - 1) - 1) / c.3 + 1],
                seed: UInt64(200 + i))
            var grads: [Tensor] = []
            var values: [Tensor] = []
            for f in [layers, fused] {
                let xi = x.detached()
                xi.requiresGrad = true
                let y = f(xi)
                values.append(y)
                sum(y * r).backward()
                grads.append(xi.grad!)
            }
            assertClose(values[1], values[0], tolerance: 1e-5, "case \(i) values")
            assertClose(grads[1], grads[0], tolerance: 1e-5, "case \(i) input gradient")
            if c.8 != 0 { checkGradients([x.detached()], samples: 8) { fused($0[0]) } }
        }
    }

    func testBatchNormTrainAndEval() {
        let x = randn([3, 4, 3, 5], seed: 60)
        let w = randn([4], seed: 61), b = randn([4], seed: 62)
        let rm = randn([4], seed: 63, std: 0.2), rv = mapValues(randn([4], seed: 64)) { 0.5 + Swift.abs($0) }
        checkGradients([x, w, b]) { t in
            batchNorm2d(t[0], weight: t[1], bias: t[2], runningMean: nil, runningVar: nil, training: true)
        }
        checkGradients([x, w, b]) { t in
            batchNorm2d(t[0], weight: t[1], bias: t[2], runningMean: rm, runningVar: rv, training: false)
        }
    }

    /// Batch norm with its activation fused, and a residual sum with its ReLU fused, against the
    /// ops in turn: the same float operations in the same order, so values and every gradient
    /// agree bit for bit (training and evaluation; ReLU and two leaky slopes). The unfused ops
    /// have their own finite-difference checks; the fused ones get theirs where no value sits
    /// near a kink (evaluation with an identity normalisation; sums of same-sign pairs).
    func testFusedActivationsMatchTheOpsInTurnBitForBit() {
        let x = randn([3, 4, 5, 4], seed: 68)
        let w = randn([4], seed: 61), b = randn([4], seed: 62)
        let rm = randn([4], seed: 63, std: 0.2), rv = mapValues(randn([4], seed: 64)) { 0.5 + Swift.abs($0) }
        let r = randn(x.shape, seed: 69)
        for training in [true, false] {
            for slope: Float in [0, 0.01, 0.2] {
                var values: [[Float]] = [], grads: [[[Float]]] = []
                for fused in [false, true] {
                    let t = [x, w, b].map { v -> Tensor in
                        let c = v.detached()
                        c.requiresGrad = true
                        return c
                    }
                    let stats = training ? (nil, nil) : (rm, rv)
                    let y: Tensor
                    if fused {
                        y = batchNorm2d(
                            t[0], weight: t[1], bias: t[2], runningMean: stats.0, runningVar: stats.1,
                            training: training, negativeSlope: slope)
                    } else {
                        let z = batchNorm2d(
                            t[0], weight: t[1], bias: t[2], runningMean: stats.0, runningVar: stats.1,
                            training: training)
                        y = slope == 0 ? relu(z) : leakyRelu(z, slope: slope)
                    }
                    sum(y * r).backward()
                    values.append(y.array)
                    grads.append(t.map { $0.grad!.array })
                }
                XCTAssertEqual(values[1], values[0], "training \(training) slope \(slope): values")
                XCTAssertEqual(grads[1], grads[0], "training \(training) slope \(slope): gradients of x, weight, bias")
                XCTAssertTrue(
                    values[0].contains { $0 < 0 } == (slope > 0) && values[0].contains { $0 == 0 } == (slope == 0),
                    "the activation did cut (slope \(slope))")
            }
        }
        let identityMean = Tensor(zeros: [4]), identityVar = Tensor(shape: [4], repeating: 1 - 1e-5)
        let a = awayFromZero([2, 4, 3, 3], seed: 75)
        checkGradients([a]) { t in
            batchNorm2d(
                t[0], weight: nil, bias: nil, runningMean: identityMean, runningVar: identityVar, training: false,
                negativeSlope: 0.2)
        }

        // relu(a + b): values and both gradients as the two ops give them, bit for bit.
        let u = randn([2, 3, 4, 5], seed: 76), v = randn([2, 3, 4, 5], seed: 77), ru = randn(u.shape, seed: 78)
        var results: [[[Float]]] = []
        for fused in [false, true] {
            let t = [u, v].map { s -> Tensor in
                let c = s.detached()
                c.requiresGrad = true
                return c
            }
            let y = fused ? addRelu(t[0], t[1]) : relu(t[0] + t[1])
            sum(y * ru).backward()
            results.append([y.array, t[0].grad!.array, t[1].grad!.array])
        }
        XCTAssertEqual(results[1], results[0], "addRelu against relu(a + b)")
        XCTAssertTrue(results[0][0].contains(0) && results[0][0].contains { $0 > 0 }, "the ReLU did cut")
        // Same-sign pairs keep every sum at least 0.1 from the kink.
        let p = awayFromZero([2, 3, 4, 5], seed: 79)
        checkGradients([p, mapValues(p) { $0 * 0.5 }]) { t in addRelu(t[0], t[1]) }
    }

    func testSplitBatchNormGradients() {
        let bn = BatchNorm2d(4)
        bn.weight.assign(randn([4], seed: 65))
        bn.bias.assign(randn([4], seed: 66))
        bn.batchSplit = 2
        checkGradients([randn([5, 4, 3, 3], seed: 67), bn.weight, bn.bias]) { t in bn(t[0]) }
    }

    /// The stem's max pool (3x3, stride 2, padding 1) takes whole-window columns eight at a time:
    /// values, NaNs, ties (the first maximum in window order wins) and the gradient's routing are
    /// those of the plain window loop, on maps of several widths (a group overlaps the one before
    /// at the end of a row; odd widths clip the last window).
    func testStemMaxPoolMatchesTheWindowLoop() {
        var rng = SeededGenerator(seed: 72)
        for (h, w) in [(64, 64), (17, 17), (9, 33), (20, 40), (5, 19), (6, 16)] {
            // Quarter steps make many ties; a few NaNs.
            var values = (0..<(2 * 3 * h * w)).map { _ in Float(Int(rng.next() % 16)) / 4 }
            for _ in 0..<(values.count / 50) { values[Int(rng.next() % UInt64(values.count))] = .nan }
            let x = Tensor(shape: [2, 3, h, w], values: values)
            x.requiresGrad = true
            let y = maxPool2d(x, kernel: 3, stride: 2, padding: 1)
            let (oh, ow) = ((h - 1) / 2 + 1, (w - 1) / 2 + 1)
            XCTAssertEqual(y.shape, [2, 3, oh, ow])
            var expected = [Float](), expectedGrad = [Float](repeating: 0, count: values.count)
            for plane in 0..<6 {
                for oy in 0..<oh {
                    for ox in 0..<ow {
                        var best = Float.nan, at = -1
                        for iy in max(2 * oy - 1, 0)..<min(2 * oy + 2, h) {
                            for ix in max(2 * ox - 1, 0)..<min(2 * ox + 2, w) {
                                let j = plane * h * w + iy * w + ix
                                if at < 0 || values[j] > best || values[j].isNaN { (best, at) = (values[j], j) }
                            }
                        }
                        expected.append(best)
                        expectedGrad[at] += Float(expected.count)
                    }
                }
            }
            XCTAssertEqual(y.array.map(\.bitPattern), expected.map(\.bitPattern), "\(h)x\(w)")
            // Each output's gradient is its own position + 1, so a misrouted one shows.
            sum(y * Tensor(shape: y.shape, values: (1...y.count).map(Float.init))).backward()
            XCTAssertEqual(x.grad!.array, expectedGrad, "\(h)x\(w): gradient")
        }
    }

    func testPoolingAndResize() {
        checkGradients([distinctValues([2, 3, 9, 8], seed: 70)]) { maxPool2d($0[0], kernel: 3, stride: 2, padding: 1) }
        checkGradients([distinctValues([1, 2, 6, 6], seed: 71)]) { maxPool2d($0[0], kernel: 2, stride: 2, padding: 0) }
        checkGradients([randn([2, 3, 5, 4], seed: 72)]) { adaptiveAvgPool1x1($0[0]) }
        checkGradients([randn([2, 2, 5, 7], seed: 73)]) { resizeBilinear($0[0], size: (11, 9)) }
        checkGradients([randn([2, 2, 13, 10], seed: 74)]) { resizeBilinear($0[0], size: (4, 3)) }
    }

    func testSoftmaxFamily() {
        let x = randn([2, 5, 3, 4], seed: 80, std: 2)
        checkGradients([x]) { softmax($0[0]) }
        checkGradients([x]) { logSoftmax($0[0]) }
        checkGradients([x]) { logSumExp($0[0]) }
        checkGradients([randn([4, 6], seed: 81)]) { logSoftmax($0[0]) }
    }

    func testCrossEntropyWithIgnoreAndWeights() {
        var rng = SeededGenerator(seed: 90)
        let x = randn([2, 4, 3, 5], seed: 91, std: 2)
        let target = Labels(
            shape: [2, 3, 5],
            values: (0..<30).map { _ in
                rng.nextUnitFloat() < 0.2 ? 255 : Int32(rng.next() % 4)
            })
        let weights = Tensor.uniform([2, 3, 5], low: 0.5, high: 2, rng: &rng)
        XCTAssertTrue(target.values.contains(255) && target.values.contains(0))
        checkGradients([x]) { crossEntropy($0[0], target) }
        checkGradients([x]) { crossEntropy($0[0], target, pixelWeights: weights) }
        checkGradients([x]) { crossEntropy($0[0], target, reduction: .sum) }
        checkGradients([x]) { crossEntropy($0[0], target, pixelWeights: weights, reduction: .none) }
    }

    func testReductions() {
        let x = randn([2, 3, 4, 5], seed: 100)
        checkGradients([x]) { sum($0[0], axes: [1]) }
        checkGradients([x]) { sum($0[0], axes: [0, 2, 3], keepDims: true) }
        checkGradients([x]) { mean($0[0], axes: [-1, -2]) }
        checkGradients([x]) { mean($0[0]) }
        checkGradients([x]) { sum($0[0]) }
    }

    func testSpatialTopK() {
        let x = distinctValues([2, 3, 4, 5], seed: 110)
        checkGradients([x], samples: 40) { spatialTopK($0[0], k: 6).values }
        checkGradients([x]) { mean(spatialTopK($0[0], k: 1).values) }
    }

    func testSpatialTopKMeanWithAPerPlaneK() {
        let x = distinctValues([2, 3, 4, 5], seed: 111)
        let k = [3, 0, 20, 1, 7, 5]
        checkGradients([x], samples: 40) { spatialTopKMean($0[0], k: k) }
        // The means themselves: the k largest of each plane.
        let out = spatialTopKMean(x, k: k)
        for p in 0..<6 {
            let plane = Array(x.array[(p * 20)..<((p + 1) * 20)]).sorted(by: >)
            let expected = k[p] == 0 ? 0 : plane.prefix(k[p]).reduce(0, +) / Float(k[p])
            XCTAssertEqual(out.pointer[p], expected, accuracy: 1e-5)
        }
    }

    func testClassConditionalMeans() {
        let x = randn([2, 3, 2, 3], seed: 112)
        var rng = SeededGenerator(seed: 113)
        let assignment = (0..<12).map { _ in Int32(rng.next() % 5) - 1 }
        checkGradients([x]) { classConditionalMeans($0[0], assignment: assignment, classes: 4) }
        let means = classConditionalMeans(x, assignment: assignment, classes: 4)
        for k in 0..<4 {
            let pixels = (0..<12).filter { assignment[$0] == Int32(k) }
            for ch in 0..<3 {
                let values = pixels.map { x.pointer[($0 / 6 * 3 + ch) * 6 + $0 % 6] }
                XCTAssertEqual(
                    means.pointer[k * 3 + ch], values.isEmpty ? 0 : values.reduce(0, +) / Float(values.count),
                    accuracy: 1e-6)
            }
        }
    }

    func testShapeOps() {
        let a = randn([2, 3, 4, 5], seed: 120), b = randn([2, 2, 4, 5], seed: 121)
        checkGradients([a]) { roll($0[0], dy: 1, dx: -2) }
        checkGradients([a]) { roll($0[0], dy: -5, dx: 7) }
        checkGradients([a]) { flipHorizontal($0[0]) }
        checkGradients([a]) { flipVertical($0[0]) }
        checkGradients([a, b]) { concatChannels([$0[0], $0[1]]) }
        checkGradients([a]) { sliceChannels($0[0], 1..<3) }
        checkGradients([a]) { sliceBatch($0[0], 1..<2) }
        // One tensor read whole and by overlapping batch slices: the tape sums the slices' rows.
        checkGradients([a]) {
            concatBatch([sliceBatch($0[0], 1..<2) * sliceBatch($0[0], 0..<1), $0[0] * 2, sliceBatch($0[0], 0..<2)])
        }
        checkGradients([a, randn([1, 3, 4, 5], seed: 122)]) { concatBatch([$0[0], $0[1]]) }
        checkGradients([a]) { reshape($0[0], [6, -1]) * reshape($0[0], [6, 20]) }
        checkGradients([a]) { cropSpatial($0[0], rows: 1..<3, columns: 0..<4) }
    }

    func testBatchNormStatisticsHookHasInputGradient() {
        var rng = SeededGenerator(seed: 130)
        let model = Sequential([
            Conv2d(3, 4, kernelSize: 3, padding: 1, rng: &rng), BatchNorm2d(4), ReLU(),
            Conv2d(4, 2, kernelSize: 1, rng: &rng), BatchNorm2d(2),
        ])
        model.eval()
        model.setRequiresGrad(false)
        let recorder = BatchNormStatisticsRecorder(attachingTo: model)
        XCTAssertEqual(recorder.layerCount, 2)
        let x = randn([2, 3, 5, 5], seed: 131)
        // R_bn = sum_l ||mu_l - running_mean_l|| + ||var_l - running_var_l||, differentiated to x.
        checkGradients([x]) { t in
            recorder.reset()
            _ = model(t[0])
            return recorder.records.reduce(Tensor(scalar: 0)) { acc, r in
                acc + sqrt(sum(square(r.mean - r.runningMean))) + sqrt(sum(square(r.variance - r.runningVar)))
            }
        }
        XCTAssertNil(model.parameters.first?.grad, "frozen weights must get no gradient")
    }
}
