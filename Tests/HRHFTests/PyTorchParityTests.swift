import XCTest

@testable import HRHF

/// Ops and a ResNet block against PyTorch (Fixtures/core_ops.safetensors, written by
/// tools/gen_core_fixtures.py from float64 references). Tolerance: relative error 1e-4 of the
/// tensor's largest value, float32's accumulated rounding over sums of a few hundred terms.
final class PyTorchParityTests: XCTestCase {
    let file = "core_ops.safetensors"
    func t(_ key: String) throws -> Tensor { try Fixtures.tensor(file, key) }

    func testConv2dCases() throws {
        let names = [
            "plain", "strided", "dilated", "grouped", "pointwise", "strided_pointwise", "k7s2", "dilated_pad_wide",
            "dead_taps", "dead_tap_rows", "no_live_tap",
        ]
        // 1 thread: one product per image; 2: whole images per worker (the fixtures' batch is
        // even); 3: columns and input channels split between workers.
        // Block limits: the default (every fixture's im2col fits whole), then blocks of 16 and of
        // 1 output column(s) (one output row in the input-gradient pass), as large layers use.
        // Per-tap products: never (im2col, as the fixtures' small channel counts choose), and
        // always (every stride-1 single-group case; a block limit of 1 float gives one output
        // row per product).
        let saved = (ParallelConfig.threads, Im2colBlocking.floats, Im2colBlocking.minColumns, PerTapProducts.mode)
        defer {
            (ParallelConfig.threads, Im2colBlocking.floats, Im2colBlocking.minColumns, PerTapProducts.mode) = saved
        }
        let limits = [1, 2, 3].map({ ($0, 0) }) + [(1, 16), (2, 1), (3, 16)]
        for (mode, (threads, blockColumns)) in [PerTapProducts.Mode.never, .always].flatMap({ m in
            limits.map { (m, $0) }
        }) {
            (ParallelConfig.threads, PerTapProducts.mode) = (threads, mode)
            (Im2colBlocking.floats, Im2colBlocking.minColumns) =
                blockColumns == 0 ? (saved.1, saved.2) : (1, blockColumns)
            for name in names {
                let p = "conv/\(name)/"
                let label =
                    "\(name) at \(threads) threads, per-tap \(mode)"
                    + (blockColumns == 0 ? "" : ", im2col blocks of \(blockColumns) columns")
                let x = try t(p + "x").requiringGrad(), w = try t(p + "weight").requiringGrad()
                let config = try t(p + "config").array.map { Int($0) }
                let bias = try Fixtures.file(file)[p + "bias"]?.copy().requiringGrad()
                let y = conv2d(
                    x, weight: w, bias: bias, stride: (config[0], config[0]), padding: (config[1], config[1]),
                    dilation: (config[2], config[2]), groups: config[3])
                XCTAssertEqual(y.shape, try t(p + "y").shape, label)
                assertClose(y, try t(p + "y"), "\(label) output")
                y.backward(gradient: try t(p + "gy"))
                assertClose(x.grad, try t(p + "gx"), "\(label) input gradient")
                assertClose(w.grad, try t(p + "gweight"), "\(label) weight gradient")
                if let bias { assertClose(bias.grad, try t(p + "gbias"), "\(label) bias gradient") }
            }
        }
    }

    func testBatchNormTrainAndEval() throws {
        for mode in ["train", "eval"] {
            let p = "batchnorm/\(mode)/"
            let x = try t(p + "x").requiringGrad()
            let bn = BatchNorm2d(4)
            bn.weight.assign(try t(p + "weight"))
            bn.bias.assign(try t(p + "bias"))
            bn.runningMean.assign(try t(p + "running_mean_before"))
            bn.runningVar.assign(try t(p + "running_var_before"))
            bn.train(mode == "train")
            let y = bn(x)
            assertClose(y, try t(p + "y"), "\(mode) output")
            y.backward(gradient: try t(p + "gy"))
            assertClose(x.grad, try t(p + "gx"), "\(mode) input gradient")
            assertClose(bn.weight.grad, try t(p + "gweight"), "\(mode) weight gradient")
            assertClose(bn.bias.grad, try t(p + "gbias"), "\(mode) bias gradient")
            assertClose(bn.runningMean, try t(p + "running_mean_after"), "\(mode) running mean")
            assertClose(bn.runningVar, try t(p + "running_var_after"), "\(mode) running var (unbiased update)")
        }
    }

    func testUpdateBatchNormAveragesTheBatchesAsTorch() throws {
        var rng = SeededGenerator(seed: 1)
        let model = Sequential([
            Conv2d(3, 4, kernelSize: 3, padding: 1, rng: &rng), BatchNorm2d(4), ReLU(),
            Conv2d(4, 3, kernelSize: 1, bias: false, rng: &rng), BatchNorm2d(3),
        ])
        let names = model.stateDict().map(\.name)
        var before: [String: Tensor] = [:]
        for name in names { before[name] = try t("update_bn/before/" + name) }
        try model.loadStateDict(before)
        model.eval()
        let layers = model.namedModules().compactMap { $0.module as? BatchNorm2d }
        layers[0].momentum = 0.3
        // torch.optim.swa_utils.update_bn: running statistics reset, then the plain average of
        // three batches' statistics; the parameters untouched.
        try updateBatchNorm(model, batches: 3) { b in _ = model(try t("update_bn/batch\(b)")) }
        for (name, value) in model.stateDict() { assertClose(value, try t("update_bn/after/" + name), name) }
        XCTAssertFalse(model.training, "update_bn restores evaluation mode")
        XCTAssertEqual(layers.map(\.momentum), [0.3, 0.1], "update_bn restores each layer's momentum")
    }

    func testBilinearResize() throws {
        for name in ["up", "down", "mixed"] {
            let p = "resize/\(name)/"
            let x = try t(p + "x").requiringGrad()
            let ref = try t(p + "y")
            let y = resizeBilinear(x, size: (ref.shape[2], ref.shape[3]))
            assertClose(y, ref, "\(name) output")
            y.backward(gradient: try t(p + "gy"))
            assertClose(x.grad, try t(p + "gx"), "\(name) input gradient")
        }
    }

    func testMaxPool() throws {
        for name in ["even", "odd"] {
            let p = "maxpool/\(name)/"
            let x = try t(p + "x").requiringGrad()
            let y = maxPool2d(x, kernel: 3, stride: 2, padding: 1)
            assertClose(y, try t(p + "y"), "\(name) output")
            y.backward(gradient: try t(p + "gy"))
            assertClose(x.grad, try t(p + "gx"), "\(name) input gradient")
        }
    }

    func testCrossEntropyWithIgnoreAndWeights() throws {
        let target = labels(from: try t("ce/labels"))
        XCTAssertTrue(target.values.contains(255))
        let x = try t("ce/x").requiringGrad()
        let loss = crossEntropy(x, target)
        assertClose(loss, try t("ce/loss"), "loss")
        loss.backward()
        assertClose(x.grad, try t("ce/gx"), "gradient")
        x.grad = nil
        let weighted = crossEntropy(x, target, pixelWeights: try t("ce/weights"))
        assertClose(weighted, try t("ce/weighted_loss"), "weighted loss")
        weighted.backward()
        assertClose(x.grad, try t("ce/weighted_gx"), "weighted gradient")
    }

    func testSoftmaxFamily() throws {
        let x = try t("softmax/x")
        assertClose(softmax(x), try t("softmax/softmax"), "softmax")
        assertClose(logSoftmax(x), try t("softmax/log_softmax"), "log_softmax")
        assertClose(logSumExp(x), try t("softmax/logsumexp"), "logsumexp")
    }

    func testResNetBottleneckEndToEnd() throws {
        var rng = SeededGenerator(seed: 0)
        let down = Sequential([Conv2d(16, 32, kernelSize: 1, stride: 2, bias: false, rng: &rng), BatchNorm2d(32)])
        let block = Bottleneck(inplanes: 16, planes: 8, stride: 2, downsample: down, rng: &rng)
        let stored = try Fixtures.file(file).tensors.filter { $0.name.hasPrefix("block/param/") }
        var values: [String: Tensor] = [:]
        for (name, tensor) in stored { values[String(name.dropFirst("block/param/".count))] = tensor }
        // The module's state-dict keys are torchvision's, one for one.
        XCTAssertEqual(Set(block.stateDict().map(\.name)), Set(values.keys))
        try block.loadStateDict(values)
        block.train()
        let x = try t("block/x").requiringGrad()
        let y = block(x)
        assertClose(y, try t("block/y"), "block output")
        y.backward(gradient: try t("block/gy"))
        assertClose(x.grad, try t("block/gx"), "block input gradient")
        for (name, p) in block.namedParameters() {
            assertClose(p.grad, try t("block/grad/" + name), "gradient of \(name)")
        }
        for (name, b) in block.namedBuffers() {
            assertClose(b, try t("block/after/" + name), "buffer \(name) after one training step")
        }
    }
}
