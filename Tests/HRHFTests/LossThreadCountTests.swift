import XCTest

@testable import HRHF

/// The loss parts that run on both cores (compensation weights' group sums and weights, prototype
/// re-labelling per image, the relation op's backward): the same numbers on one thread and on two,
/// on maps wider than one pixel block (512).
final class LossThreadCountTests: XCTestCase {
    let new = randn([2, 21, 20, 30], seed: 40, std: 2), old = randn([2, 16, 20, 30], seed: 41, std: 2)

    func onThreads<T>(_ threads: Int, _ body: () -> T) -> T {
        let saved = ParallelConfig.threads
        ParallelConfig.threads = threads
        defer { ParallelConfig.threads = saved }
        return body()
    }

    func testCompensationWeightsDoNotDependOnThreadCount() {
        var rng = SeededGenerator(seed: 42)
        let steps = (0..<21).map { $0 < 8 ? 0 : $0 < 16 ? 1 : 2 }
        let labels = Labels(
            shape: [2, 20, 30], values: (0..<1200).map { _ in [0, 3, 9, 15, 16, 20, 255][Int(rng.next() % 7)] })
        for merged in [nil, 1..<16, 16..<21] {
            func weights() -> [Float] {
                gradientCompensationWeights(
                    new, labels, stepOfClass: steps, currentStep: 2, z: 3.2, wMin: 0.1, wMax: 5,
                    backgroundIncludes: merged
                ).array
            }
            let one = onThreads(1, weights), two = onThreads(2, weights)
            XCTAssertEqual(one, two, "background with \(String(describing: merged))")
            // Two old step groups, each weighted around its own mean: neither all clamped nor all 1.
            XCTAssertGreaterThan(Set(zip(labels.values, one).filter { $0.0 == 3 || $0.0 == 9 }.map(\.1)).count, 10)
            XCTAssertEqual(zip(labels.values, one).filter { $0.0 == 255 }.map(\.1).max(), 0)
            XCTAssertEqual(zip(labels.values, one).filter { $0.0 >= 16 && $0.0 != 255 }.map(\.1).min(), 1)
        }
    }

    func testRelabellingDoesNotDependOnThreadCount() {
        let protos = Prototypes(vectors: (0..<16).map { k in k % 3 == 0 ? nil : [Float(k), 1, -1] }, channels: 3)
        let features = randn([2, 3, 5, 8], seed: 43, std: 5)
        var options = DistillationOptions(method: Method.table[0])
        (options.prototypeTau, options.prototypeOldConfidence) = (0.2, 0.3)
        let labels = Labels(shape: [2, 20, 30], values: (0..<1200).map { $0 % 5 == 0 ? 17 : 0 })
        func relabelled() -> [Int32] {
            protos.relabel(labels, oldLogits: old, oldFeatures: features, options: options).values
        }
        let one = onThreads(1, relabelled), two = onThreads(2, relabelled)
        XCTAssertEqual(one, two)
        // Both images re-labelled: pixels of the second image changed too.
        XCTAssertGreaterThan(one[600...].filter { $0 != 0 && $0 != 17 }.count, 0)
        XCTAssertGreaterThan(one[..<600].filter { $0 != 0 && $0 != 17 }.count, 0)
    }

    func testSoftmaxClassMeansGradientIsZeroPastTheOldChannels() {
        let assignment = (0..<1200).map { Int32($0 % 8) - 1 }
        let weights = randn([7, 16], seed: 44)
        func gradient() -> [Float] {
            // Freed memory full of NaN first: the backward's output must write every element.
            _ = Tensor(shape: new.shape, values: [Float](repeating: .nan, count: new.count))
            return valueAndGradient(new) {
                sum(softmaxClassMeans($0, channels: 16, assignment: assignment, classes: 7).means * weights)
            }.1
        }
        let one = onThreads(1, gradient), two = onThreads(2, gradient)
        XCTAssertEqual(one, two)
        // Classes 0-6 each assigned every 8th pixel of 1200 (-1 the rest): 150 pixels each.
        XCTAssertEqual(
            softmaxClassMeans(new, channels: 16, assignment: assignment, classes: 7).counts,
            [Float](repeating: 150, count: 7))
        // Elements (image * 21 + channel) * 600 + pixel: channels 16-20 are past the old ones.
        let past = one.indices.filter { $0 / 600 % 21 >= 16 }.map { one[$0] }
        XCTAssertEqual(past.count, 2 * 5 * 600)
        XCTAssertEqual(past.map { $0.isNaN ? 1 : Swift.abs($0) }.max(), 0)
        XCTAssertGreaterThan(one.map { Swift.abs($0) }.max()!, 1e-4)
    }

    func testGSCTermsTogetherDoNotDependOnThreadCount() {
        let prediction = OldPrediction(old)
        func valueAndGradients() -> (Float, [Float]) {
            _ = Tensor(shape: new.shape, values: [Float](repeating: .nan, count: new.count))
            return valueAndGradient(new) {
                let sums = gscTermSums(
                    $0, old, channels: 16,
                    GSCTermRequest(
                        softTemperature: 2, sharpMask: prediction.confidenceMask(threshold: 0.5),
                        relation: relationInputs(prediction)))
                return sums.softDistillation(reduction: .local) + sums.sharpEntropy(reduction: .local)
                    + sums.relationDistillation(reduction: .local)
            }
        }
        let one = onThreads(1, valueAndGradients), two = onThreads(2, valueAndGradients)
        XCTAssertEqual(one.0, two.0)
        XCTAssertEqual(one.1, two.1)
        XCTAssertFalse(one.1.contains { $0.isNaN })
        XCTAssertGreaterThan(one.1.map { Swift.abs($0) }.max()!, 1e-4)
    }

    func testBatchSliceOfAMapLargerThanTheGrainIsExact() {
        // 3 x 21 x 40 x 60 = 151 200 elements: a slice of two images is copied in blocks on both cores.
        let x = Tensor(shape: [3, 21, 40, 60], values: (0..<151_200).map { Float($0) })
        let slice = onThreads(2) { sliceBatch(x, 1..<3) }
        XCTAssertEqual(slice.shape, [2, 21, 40, 60])
        XCTAssertEqual(slice.array, (50_400..<151_200).map { Float($0) })
    }
}
