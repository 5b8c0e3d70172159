import XCTest

@testable import HRHF

final class AutogradTests: XCTestCase {
    func testTensorBytesAreCountedAndGlibcKeepsFreedBlocks() {
        #if canImport(Glibc)
            // The malloc settings were once silently skipped (a preprocessor test that was never
            // true); a training iteration then spent a third of its time in page faults.
            XCTAssertTrue(mallocKeepsFreedMemory)
        #endif
        let before = TensorStorage.liveBytes
        TensorStorage.resetPeakBytes()
        withExtendedLifetime(Tensor(zeros: [1000])) {
            XCTAssertEqual(TensorStorage.liveBytes - before, 4000)
        }
        XCTAssertEqual(TensorStorage.liveBytes, before)
        XCTAssertEqual(TensorStorage.peakBytes - before, 4000)
    }

    func testNoGradScopeRecordsNothing() {
        let x = randn([2, 3], seed: 1).requiringGrad()
        let y = withNoGrad { exp(x) * 2 }
        XCTAssertFalse(y.requiresGrad)
        XCTAssertNil(y.gradFn)
        XCTAssertTrue(GradMode.isEnabled, "grad mode restored after the scope")
        let z = exp(x) * 2
        XCTAssertTrue(z.requiresGrad)
    }

    func testInputOnlyGradientLeavesFrozenWeightsAlone() {
        var rng = SeededGenerator(seed: 2)
        let model = Sequential([
            Conv2d(3, 4, kernelSize: 3, padding: 1, rng: &rng), BatchNorm2d(4), ReLU(),
            Conv2d(4, 2, kernelSize: 1, rng: &rng),
        ])
        model.eval()
        model.setRequiresGrad(false)
        let x = randn([1, 3, 6, 6], seed: 3).requiringGrad()
        sum(model(x)).backward()
        XCTAssertNotNil(x.grad)
        XCTAssertGreaterThan(x.grad!.array.map { Swift.abs($0) }.max()!, 0)
        for (name, p) in model.namedParameters() { XCTAssertNil(p.grad, "\(name) of a frozen model got a gradient") }
    }

    func testWeightOnlyAndBothGradients() {
        var rng = SeededGenerator(seed: 4)
        let conv = Conv2d(2, 3, kernelSize: 3, padding: 1, rng: &rng)
        let x = randn([1, 2, 4, 4], seed: 5)
        sum(conv(x)).backward()
        XCTAssertNil(x.grad)
        XCTAssertNotNil(conv.weight.grad)
        XCTAssertNotNil(conv.bias?.grad)
        // Bias gradient of sum(conv(x)) is the number of output positions.
        XCTAssertEqual(conv.bias!.grad!.array, [16, 16, 16])
    }

    func testGradientsAccumulateAcrossBackwardCallsAndReusedInputs() {
        let x = Tensor(shape: [3], values: [1, 2, -3]).requiringGrad()
        sum(x * x).backward()
        XCTAssertEqual(x.grad!.array, [2, 4, -6])
        sum(x * 3 + x).backward()
        XCTAssertEqual(x.grad!.array, [6, 8, -2], "second backward adds 4 to each, as PyTorch accumulates")
    }

    /// A batch view reads its images in place, keeps their memory alive, adds no tensor bytes
    /// and sends its gradient to its rows as `sliceBatch` does.
    func testBatchViewSharesMemoryAndRoutesItsGradientToItsRows() {
        let w = Tensor(shape: [2, 2, 3], values: (0..<12).map { Float($0 % 5) - 1 })
        var view: Tensor?
        var expected: [Float] = []
        do {
            let leaf = Tensor(shape: [3, 2, 3], values: (0..<18).map { Float($0) - 4 }).requiringGrad()
            let x = leaf * 2
            let bytes = TensorStorage.liveBytes
            let v = batchView(x, 1..<3)
            XCTAssertEqual(TensorStorage.liveBytes, bytes, "a view allocates nothing")
            XCTAssertEqual(v.shape, [2, 2, 3])
            XCTAssertEqual(v.array, sliceBatch(x, 1..<3).array)
            XCTAssertEqual(v.pointer, x.pointer + 6)
            sum(v * w).backward()
            XCTAssertEqual(leaf.grad!.array, [Float](repeating: 0, count: 6) + w.array.map { 2 * $0 })
            expected = v.array
            view = withNoGrad { batchView(x, 1..<3) }
        }
        // The parent tensor is gone; its memory lives on in the view.
        XCTAssertEqual(view!.array, expected)
    }

    func testBatchSliceGradientsAreAddedAtTheirRowsInAnyOrder() {
        // Small integers: every sum is exact, so each order must give the same bits.
        let w = (1...4).map { k in Tensor(shape: [4, 3], values: (0..<12).map { Float(($0 * k) % 7) - 3 }) }
        let leafValues = (0..<12).map { Float($0 % 5) - 2 }
        // Rows 0-1 from w0's rows 0-1, rows 1-3 from w1's rows 0-2, all rows from w2, row 3 from w3's row 0.
        var expected = w[2].array
        for i in 0..<6 { expected[i] += w[0].array[i] }
        for i in 3..<12 { expected[i] += w[1].array[i - 3] }
        for i in 9..<12 { expected[i] += w[3].array[i - 9] }
        func terms(_ x: Tensor) -> [Tensor] {
            [
                sum(sliceBatch(x, 0..<2) * sliceBatch(w[0], 0..<2)),
                sum(sliceBatch(x, 1..<4) * sliceBatch(w[1], 0..<3)),
                sum(x * w[2]),
                sum(sliceBatch(sliceBatch(x, 2..<4), 1..<2) * sliceBatch(w[3], 0..<1)),
            ]
        }
        let orders = [[0, 1, 2, 3], [3, 2, 1, 0], [1, 3, 0, 2], [2, 0, 3, 1], [3, 0, 1, 2]]
        for order in orders {
            for throughAnOp in [false, true] {
                let leaf = Tensor(shape: [4, 3], values: leafValues).requiringGrad()
                // Through an op, the summed slices reach a backward before the leaf.
                let x = throughAnOp ? leaf * 1 : leaf
                let all = terms(x)
                order.dropFirst().reduce(all[order[0]]) { $0 + all[$1] }.backward()
                XCTAssertEqual(leaf.grad!.array, expected, "order \(order), through an op: \(throughAnOp)")
            }
        }
        // Rows no slice covers get zeros (the tape leaves them unwritten until the sum is done).
        let leaf = Tensor(shape: [4, 3], values: leafValues).requiringGrad()
        func partialLoss() -> Tensor {
            let all = terms(leaf * 1)
            return all[3] + all[0]
        }
        partialLoss().backward()
        var covered = [Float](repeating: 0, count: 12)
        for i in 0..<6 { covered[i] = w[0].array[i] }
        for i in 9..<12 { covered[i] = w[3].array[i - 9] }
        XCTAssertEqual(leaf.grad!.array, covered)
        // A second backward adds to the leaf's gradient.
        partialLoss().backward()
        XCTAssertEqual(leaf.grad!.array, covered.map { $0 * 2 })
    }

    func testTapeNeverWritesIntoAGradientABackwardPassedThrough() {
        let w = Tensor(shape: [3], values: [1, 2, 3]), v = Tensor(shape: [3], values: [10, 20, 30])
        for ownTermFirst in [false, true] {
            let p = Tensor(shape: [3], values: [0.5, -1, 2]).requiringGrad()
            let q = Tensor(shape: [3], values: [4, 5, -6]).requiringGrad()
            // The sum's backward hands the same gradient to p and q; p then gets a second term.
            let shared = sum((p + q) * w), own = sum(p * v)
            (ownTermFirst ? own + shared : shared + own).backward()
            XCTAssertEqual(q.grad!.array, [1, 2, 3], "own term first: \(ownTermFirst)")
            XCTAssertEqual(p.grad!.array, [11, 22, 33], "own term first: \(ownTermFirst)")
            XCTAssertFalse(p.grad!.storage === q.grad!.storage)
        }
    }

    func testDeepGraphDoesNotOverflowTheStack() {
        let x = Tensor(shape: [1], values: [0.5]).requiringGrad()
        var y = x
        for _ in 0..<20_000 { y = y * 1.0001 }
        y.backward()
        XCTAssertEqual(x.grad!.item, pow(1.0001, 20_000), accuracy: 1e-2)
    }

    func testGraphIsReleasedAfterBackward() {
        weak var intermediate: Tensor?
        let x = randn([4], seed: 6).requiringGrad()
        do {
            let mid = exp(x)
            intermediate = mid
            let loss = sum(mid * 2)
            loss.backward()
        }
        XCTAssertNil(intermediate, "intermediates are freed with the graph (no reference cycles)")
    }

    func testResultsDoNotDependOnThreadCount() {
        func run(threads: Int) -> [[Float]] {
            let saved = ParallelConfig.threads
            ParallelConfig.threads = threads
            defer { ParallelConfig.threads = saved }
            var rng = SeededGenerator(seed: 7)
            let conv = Conv2d(8, 8, kernelSize: 3, padding: 2, dilation: 2, rng: &rng)
            let bn = BatchNorm2d(8)
            let x = randn([2, 8, 40, 40], seed: 8).requiringGrad()
            let y = softmax(resizeBilinear(bn(conv(x)), size: (57, 61)))
            sum(y * y).backward()
            return [y.array, x.grad!.array, conv.weight.grad!.array, bn.weight.grad!.array]
        }
        let one = run(threads: 1), two = run(threads: 2), four = run(threads: 4)
        for i in 0..<one.count {
            let a = Tensor(shape: [one[i].count], values: one[i])
            // The toolkit's own kernels partition work without reordering sums; OpenBLAS may
            // split its products differently, which moves the last bits only.
            XCTAssertLessThanOrEqual(relativeError(Tensor(shape: [two[i].count], values: two[i]), a), 1e-5)
            XCTAssertLessThanOrEqual(relativeError(Tensor(shape: [four[i].count], values: four[i]), a), 1e-5)
        }
    }

    func testSplitBatchNormNormalisesEachPartAloneAndTracksTheFirst() {
        let x = randn([5, 3, 4, 4], seed: 20)
        // The fake part's statistics differ from the real part's, as a synthetic half would.
        let shifted = concatBatch([sliceBatch(x, 0..<2), sliceBatch(x, 2..<5) * 3 + 2])
        let split = BatchNorm2d(3), real = BatchNorm2d(3), fake = BatchNorm2d(3)
        for layer in [split, real, fake] {
            layer.weight.assign(Tensor(shape: [3], values: [1.5, 0.5, -1]))
            layer.bias.assign(Tensor(shape: [3], values: [0.1, 0, 2]))
        }
        split.batchSplit = 2
        let y = split(shifted)
        let expected = concatBatch([real(sliceBatch(shifted, 0..<2)), fake(sliceBatch(shifted, 2..<5))])
        assertClose(y, expected, "each part normalised with its own batch statistics")
        assertClose(split.runningMean, real.runningMean, "running mean from the first part only")
        assertClose(split.runningVar, real.runningVar, "running variance from the first part only")
        XCTAssertGreaterThan(relativeError(fake.runningMean, real.runningMean), 0.5, "the parts' statistics differ")
        // Evaluation, and a batch no larger than the split, are plain batch norm.
        split.eval()
        real.eval()
        assertClose(split(shifted), real(shifted), "evaluation ignores the split")
        split.train()
        let whole = BatchNorm2d(3)
        whole.weight.assign(split.weight)
        whole.bias.assign(split.bias)
        split.batchSplit = 5
        assertClose(split(shifted), whole(shifted), "a split at the batch size is one batch")
    }

    func testModuleStateDictNamesFollowPyTorch() {
        var rng = SeededGenerator(seed: 9)
        let down = Sequential([Conv2d(4, 8, kernelSize: 1, bias: false, rng: &rng), BatchNorm2d(8)])
        let block = BasicBlock(inplanes: 4, planes: 8, downsample: down, rng: &rng)
        XCTAssertEqual(
            block.stateDict().map(\.name),
            [
                "conv1.weight", "bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var",
                "bn1.num_batches_tracked",
                "conv2.weight", "bn2.weight", "bn2.bias", "bn2.running_mean", "bn2.running_var",
                "bn2.num_batches_tracked",
                "downsample.0.weight", "downsample.1.weight", "downsample.1.bias", "downsample.1.running_mean",
                "downsample.1.running_var", "downsample.1.num_batches_tracked",
            ])
    }

    func testLoadStateDictReportsEveryProblemAndChangesNothing() {
        var rng = SeededGenerator(seed: 10)
        let conv = Conv2d(2, 3, kernelSize: 3, rng: &rng)
        let before = conv.weight.array
        var values = ["weight": Tensor(zeros: [3, 2, 3, 3]), "extra.weight": Tensor(zeros: [1])]
        XCTAssertThrowsError(try conv.loadStateDict(values, source: "m.pth")) { error in
            let text = "\(error)"
            XCTAssertTrue(
                text.contains("m.pth") && text.contains("missing keys: bias")
                    && text.contains("unexpected keys: extra.weight"), text)
        }
        values = ["weight": Tensor(zeros: [3, 2, 1, 1]), "bias": Tensor(zeros: [3])]
        XCTAssertThrowsError(try conv.loadStateDict(values)) { error in
            XCTAssertTrue(
                "\(error)".contains("weight: shape [3, 2, 1, 1] where the model has [3, 2, 3, 3]"), "\(error)")
        }
        XCTAssertEqual(conv.weight.array, before)
    }
}
