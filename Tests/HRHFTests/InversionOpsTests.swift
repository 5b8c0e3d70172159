import XCTest

@testable import HRHF

/// The synthesis loss terms' fused ops against the compositions they replace, and their
/// finite-difference gradients.
final class InversionOpsTests: XCTestCase {
    /// Values and the gradient of sum(f(x) * weights) for a fixed random weighting.
    func valuesAndGradient(_ x: Tensor, _ f: (Tensor) -> Tensor) -> (Tensor, Tensor) {
        x.grad = nil
        x.requiresGrad = true
        let y = f(x)
        sum(y * randn(y.shape, seed: 5)).backward()
        return (y.detached(), x.grad!.copy())
    }

    func testChannelMeanVarianceMatchesTheComposition() {
        // 37 pixels a plane: the eight-lane sums and their scalar tail both count; an offset mean.
        let x = randn([3, 5, 37, 1], seed: 1, std: 2) + 0.7
        let fused = valuesAndGradient(x) { channelMeanVariance($0) }
        let composed = valuesAndGradient(x) { t in
            let mu = mean(t, axes: [0, 2, 3])
            let variance = mean(square(t - reshape(mu, [1, -1, 1, 1])), axes: [0, 2, 3])
            return concatBatch([reshape(mu, [1, 5]), reshape(variance, [1, 5])])
        }
        XCTAssertEqual(fused.0.shape, [2, 5])
        assertClose(fused.0, composed.0, tolerance: 1e-5, "mean and variance")
        assertClose(fused.1, composed.1, tolerance: 1e-5, "gradient")
        checkGradients([randn([2, 3, 4, 5], seed: 2)]) { channelMeanVariance($0[0]) }
    }

    func testTotalVariationMatchesTheCompositionEvenWhereNeighboursAreEqual() {
        let x = randn([2, 3, 6, 7], seed: 3)
        // Equal neighbours (a difference of exactly 0): abs's gradient there is 0.
        for i in 0..<7 { x.pointer[2 * 7 + i] = x.pointer[3 * 7 + i] }
        let fused = valuesAndGradient(x) { totalVariationRows($0) }
        let composed = valuesAndGradient(x) { t in
            let (_, _, h, w) = nchw(t, "test")
            let pairs: [((Range<Int>, Range<Int>), (Range<Int>, Range<Int>))] = [
                ((0..<h, 0..<(w - 1)), (0..<h, 1..<w)),
                ((0..<(h - 1), 0..<w), (1..<h, 0..<w)),
                ((1..<h, 0..<(w - 1)), (0..<(h - 1), 1..<w)),
                ((0..<(h - 1), 0..<(w - 1)), (1..<h, 1..<w)),
            ]
            var l2 = Tensor(zeros: [2]), l1 = Tensor(zeros: [2])
            for (a, b) in pairs {
                let d = cropSpatial(t, rows: a.0, columns: a.1) - cropSpatial(t, rows: b.0, columns: b.1)
                l2 = l2 + mean(square(d), axes: [1, 2, 3])
                l1 = l1 + mean(abs(d), axes: [1, 2, 3])
            }
            return concatBatch([reshape(l2, [1, 2]), reshape(l1, [1, 2])])
        }
        XCTAssertEqual(fused.0.shape, [2, 2])
        assertClose(fused.0, composed.0, tolerance: 1e-5, "total variation")
        assertClose(fused.1, composed.1, tolerance: 1e-5, "gradient")
        let (l2, l1) = SegInversion.totalVariation(x)
        XCTAssertEqual(l2.array, Array(fused.0.array[0..<2]))
        XCTAssertEqual(l1.array, Array(fused.0.array[2..<4]))
        checkGradients([randn([2, 2, 5, 4], seed: 4)]) { totalVariationRows($0[0]) }
    }

    func testSpatialTopKMeanTakesTheLowestIndicesAmongTies() {
        // Few distinct values, so most k-th values are tied: the ranking is by value, then index.
        var rng = SeededGenerator(seed: 6)
        let x = Tensor(shape: [2, 3, 9, 7], values: (0..<378).map { _ in Float(rng.next() % 5) })
        let k = [1, 9, 30, 0, 63, 17]
        x.requiresGrad = true
        let out = spatialTopKMean(x, k: k)
        sum(out).backward()
        for p in 0..<6 {
            let plane = Array(x.array[(p * 63)..<((p + 1) * 63)])
            let ranked = plane.indices.sorted { plane[$0] > plane[$1] || (plane[$0] == plane[$1] && $0 < $1) }
            let chosen = Set(ranked.prefix(k[p]))
            let expected = k[p] == 0 ? 0 : chosen.map { plane[$0] }.reduce(0, +) / Float(k[p])
            XCTAssertEqual(out.pointer[p], expected, accuracy: 1e-6, "plane \(p)")
            let gradient = Array(x.grad!.array[(p * 63)..<((p + 1) * 63)])
            XCTAssertEqual(
                gradient, plane.indices.map { chosen.contains($0) ? 1 / Float(k[p]) : 0 }, "plane \(p) gradient")
        }
    }
}
