import XCTest

@testable import HRHF

final class DistillationTests: XCTestCase {
    func labelsWithIgnore(_ shape: [Int], classes: Int, seed: UInt64) -> Labels {
        var rng = SeededGenerator(seed: seed)
        return Labels(
            shape: shape,
            values: (0..<shape.reduce(1, *)).map { _ in
                rng.nextUnitFloat() < 0.15 ? 255 : Int32(rng.next() % UInt64(classes))
            })
    }

    func testLossesHaveFiniteDifferenceGradients() {
        let new = randn([2, 6, 3, 4], seed: 1, std: 1.5), old = randn([2, 4, 3, 4], seed: 2, std: 1.5)
        var rng = SeededGenerator(seed: 3)
        let realLabels = Labels(shape: [2, 3, 4], values: (0..<24).map { _ in [0, 4, 5, 255][Int(rng.next() % 4)] })
        let weights = Tensor.uniform([2, 3, 4], low: 0.5, high: 2, rng: &rng)
        checkGradients([new]) {
            nllLoss(logSoftmax($0[0]), self.labelsWithIgnore([2, 3, 4], classes: 6, seed: 4), pixelWeights: weights)
        }
        checkGradients([new]) { unbiasedCrossEntropy($0[0], realLabels, oldClasses: 4) }
        let relabelled = Labels(
            shape: [2, 3, 4], values: (0..<24).map { _ in [0, 2, 4, 5, 255][Int(rng.next() % 5)] })
        checkGradients([new]) { unbiasedCrossEntropy($0[0], relabelled, oldClasses: 4) }
        checkGradients([new]) { unbiasedCrossEntropy($0[0], realLabels, oldClasses: 4, pixelWeights: weights) }
        let fakeLabels = Labels(shape: [2, 3, 4], values: (0..<24).map { _ in [0, 1, 3, 255][Int(rng.next() % 4)] })
        checkGradients([new]) { foldedCrossEntropy($0[0], fakeLabels, oldClasses: 4, pixelWeights: weights) }
        checkGradients([new]) { unbiasedDistillation($0[0], old, temperature: 1) }
        checkGradients([new]) { unbiasedDistillation($0[0], old, temperature: 2) }
        checkGradients([new]) { plainDistillation($0[0], old, temperature: 1) }
        checkGradients([new]) { softDistillation($0[0], old, temperature: 2) }
        checkGradients([new]) { sharpEntropy($0[0], old, confidence: 0.4) }
        checkGradients([new]) { relationDistillation($0[0], old) }
    }

    func testUnbiasedCrossEntropyAndKDValues() {
        // One pixel, 3 old classes (0, 1, 2), 2 new (3, 4).
        let logits = Tensor(shape: [1, 5, 1, 1], values: [0.5, 1.0, -0.3, 2.0, 0.1])
        let p = softmax(logits).array
        let bgLabel = unbiasedCrossEntropy(logits, Labels(shape: [1, 1, 1], values: [0]), oldClasses: 3).item
        XCTAssertEqual(
            bgLabel, -Foundation.log(p[0] + p[1] + p[2]), accuracy: 1e-5, "background absorbs the old classes")
        let newLabel = unbiasedCrossEntropy(logits, Labels(shape: [1, 1, 1], values: [3]), oldClasses: 3).item
        XCTAssertEqual(newLabel, -Foundation.log(p[3]), accuracy: 1e-5)
        let relabelled = unbiasedCrossEntropy(logits, Labels(shape: [1, 1, 1], values: [2]), oldClasses: 3).item
        XCTAssertEqual(
            relabelled, -Foundation.log(p[2]), accuracy: 1e-5, "a re-labelled old pixel is scored on its class")
        let folded = foldedCrossEntropy(logits, Labels(shape: [1, 1, 1], values: [0]), oldClasses: 3).item
        XCTAssertEqual(
            folded, -Foundation.log(p[0] + p[3] + p[4]), accuracy: 1e-5, "fake background absorbs the new classes")
        let foldedOld = foldedCrossEntropy(logits, Labels(shape: [1, 1, 1], values: [2]), oldClasses: 3).item
        XCTAssertEqual(foldedOld, -Foundation.log(p[2]), accuracy: 1e-5)
        let oldLogits = Tensor(shape: [1, 3, 1, 1], values: [0.2, -1, 0.7])
        let q = softmax(oldLogits).array
        let kd = unbiasedDistillation(logits, oldLogits).item
        let expected =
            -(q[0] * Foundation.log(p[0] + p[3] + p[4]) + q[1] * Foundation.log(p[1]) + q[2] * Foundation.log(p[2])) / 3
        XCTAssertEqual(kd, expected, accuracy: 1e-5, "new classes fold into background")
        // Soft: KL over the old classes is zero when the new model agrees with the old one.
        let same = concatChannels([oldLogits, Tensor(shape: [1, 2, 1, 1], values: [3, -2])])
        XCTAssertEqual(softDistillation(same, oldLogits, temperature: 2).item, 0, accuracy: 1e-6)
        XCTAssertGreaterThan(softDistillation(logits, oldLogits, temperature: 2).item, 0)
    }

    func testGradientCompensationWeights() {
        // Two old-class pixels of step 0 with p(y) 0.9 and 0.5, one new-class pixel, one ignored.
        let logits = Tensor(
            shape: [1, 3, 1, 4],
            values: [
                Foundation.log(0.9), Foundation.log(0.5), 0, 0,
                Foundation.log(0.1), Foundation.log(0.5), 0, 0,
                -30, -30, 0, 0,
            ])
        let labels = Labels(shape: [1, 1, 4], values: [0, 0, 2, 255])
        let w = gradientCompensationWeights(
            logits, labels, stepOfClass: [0, 0, 1], currentStep: 1, z: 2, wMin: 0.5, wMax: 2)
        // g^z = 0.01 and 0.25, mean 0.13: 0.0769 -> clamped to 0.5; 1.923.
        XCTAssertEqual(w.pointer[0], 0.5, accuracy: 1e-5)
        XCTAssertEqual(w.pointer[1], 0.25 / 0.13, accuracy: 1e-4)
        XCTAssertEqual(w.pointer[2], 1, "new-class pixels weigh 1")
        XCTAssertEqual(w.pointer[3], 0)
        // Under the unbiased CE, background's p is p(0) + p(1): 1.0 and 1.0 here, so g = 0 for both
        // (mean 0: weight 1), the new-class pixel still 1.
        let wu = gradientCompensationWeights(
            logits, labels, stepOfClass: [0, 0, 1], currentStep: 1, z: 2, wMin: 0.5, wMax: 2,
            backgroundIncludes: 1..<2)
        XCTAssertEqual(Array(wu.array.prefix(3)), [1, 1, 1])
        // Three old classes, labels 0 and 1 (a re-labelled pixel).
        let l3 = Tensor(
            shape: [1, 4, 1, 2],
            values: [
                Foundation.log(0.6), Foundation.log(0.6), Foundation.log(0.1), Foundation.log(0.2),
                Foundation.log(0.1), Foundation.log(0.1), Foundation.log(0.2), Foundation.log(0.1),
            ])
        let w3 = gradientCompensationWeights(
            l3, Labels(shape: [1, 1, 2], values: [0, 1]), stepOfClass: [0, 0, 0, 1], currentStep: 1,
            z: 1, wMin: 0.1, wMax: 10, backgroundIncludes: 1..<3)
        // Pixel 0 (p = 0.6, 0.1, 0.1, 0.2; label 0): g = 1 - (0.6 + 0.1 + 0.1) = 0.2. Pixel 1
        // (p = 0.6, 0.2, 0.1, 0.1; label 1): g = 1 - 0.2 = 0.8. Mean 0.5.
        XCTAssertEqual(w3.pointer[0], 0.2 / 0.5, accuracy: 1e-4)
        XCTAssertEqual(w3.pointer[1], 0.8 / 0.5, accuracy: 1e-4)
    }

    func testClassifierInitialisationKeepsOldProbabilities() throws {
        for (arch, file) in [(ModelParityTests.tvSmall, "tv_small"), (ModelParityTests.mibSmall, "mib_small")] {
            let old = try DeepLabV3(arch)
            let weights = try Fixtures.file("models/\(file).safetensors")
            try old.loadStateDict(Dictionary(uniqueKeysWithValues: weights.tensors.map { ($0.name, $0.tensor) }))
            old.eval()
            let card = ModelCard(architecture: arch, classNames: Array(DatasetClasses.voc.prefix(arch.numClasses)))
            let (new, newCard) = try extendModel(
                old, card: card, newClassNames: ["a", "b", "c"], step: arch.classesPerStep.count)
            new.eval()
            XCTAssertEqual(new.numClasses, old.numClasses + 3)
            XCTAssertEqual(newCard.history.last?.classes, Array(old.numClasses..<(old.numClasses + 3)))
            XCTAssertEqual(newCard.classes.last?.name, "c")
            let x = try Fixtures.tensor("models/\(file)_logits.safetensors", "input")
            let (pOld, pNew) = withNoGrad { (softmax(old.run(x).logits), softmax(new.run(x).logits)) }
            let (n, c, h, w) = nchw(pOld, "test")
            let cNew = pNew.shape[1]
            var worst: Float = 0
            for b in 0..<n {
                for i in 0..<(h * w) {
                    var folded: Float = 0
                    for k in [0] + Array(c..<cNew) { folded += pNew.pointer[(b * cNew + k) * h * w + i] }
                    worst = max(worst, Swift.abs(folded - pOld.pointer[(b * c) * h * w + i]))
                    for k in 1..<c {
                        worst = max(
                            worst,
                            Swift.abs(pNew.pointer[(b * cNew + k) * h * w + i] - pOld.pointer[(b * c + k) * h * w + i]))
                    }
                }
            }
            XCTAssertLessThan(worst, 1e-5, "\(file): background + new = old background, old classes unchanged")
        }
    }

    /// FT, LwF and joint start their new rows as PyTorch starts a new 1x1 convolution (MiB's code
    /// without init_balanced): uniform in +-1/sqrt(input channels), from the run's seed.
    func testRandomClassifierInitialisationIsPyTorchsDefaultFromTheSeed() throws {
        for arch in [ModelParityTests.tvSmall, ModelParityTests.mibSmall] {
            let old = try DeepLabV3(arch, seed: 2)
            let card = ModelCard(architecture: arch, classNames: Array(DatasetClasses.voc.prefix(arch.numClasses)))
            func grown(_ seed: UInt64) throws -> [Float] {
                let (new, _) = try extendModel(
                    old, card: card, newClassNames: ["a", "b"], step: arch.classesPerStep.count,
                    initialisation: .random, seed: seed)
                XCTAssertEqual(
                    new.classifiers[0].bias!.array.prefix(old.numClasses), old.classifiers[0].bias!.array[...],
                    "old rows, the background's bias included, unchanged")
                let w = new.classifiers.last!.weight.array, b = new.classifiers.last!.bias!.array
                let rows = arch.flavor == .mib ? w : Array(w.suffix(2 * arch.headChannels))
                return rows + (arch.flavor == .mib ? b : Array(b.suffix(2)))
            }
            let first = try grown(1), again = try grown(1), other = try grown(2)
            let bound = 1 / Float(arch.headChannels).squareRoot()
            XCTAssertEqual(first.count, 2 * arch.headChannels + 2)
            XCTAssertEqual(first, again, "the same seed, the same rows")
            XCTAssertNotEqual(first, other, "another seed, other rows")
            XCTAssertTrue(first.allSatisfy { Swift.abs($0) <= bound }, "within +-\(bound)")
            XCTAssertGreaterThan(first.map { Swift.abs($0) }.max()!, bound / 2, "spread over the range")
        }
    }

    func testPrototypeRelabelling() {
        // Two old classes (0 bg, 1 cat), prototypes at (0, 0) and (1, 1) in a 2-channel space.
        let protos = Prototypes(vectors: [[0, 0], [1, 1]], channels: 2)
        // Three feature cells: a cat-like feature, a background-like one, and a background one;
        // six pixels, two per cell. The old model says cat (confidently) on pixels 0, 2, 3 and
        // background elsewhere: pixel 0 is relabelled cat, pixel 1 (background per pixel, though
        // its cell is cat-like) stays background, pixels 2 and 3 disagree with their cell's
        // prototype (255), pixels 4 and 5 stay background.
        let logits = Tensor(
            shape: [1, 2, 1, 6],
            values: [
                0, 5, 0, 0, 5, 5,
                5, 0, 5, 5, 0, 0,
            ])
        let features = Tensor(shape: [1, 2, 1, 3], values: [1, 0, 0, 1, 0, 0])
        let labels = Labels(shape: [1, 1, 6], values: [0, 0, 0, 0, 0, 0])
        var o = DistillationOptions(method: Method.table[0])
        o.prototypeTau = 0.6
        o.prototypeOldConfidence = 0.9
        let out = protos.relabel(labels, oldLogits: logits, oldFeatures: features, options: o)
        XCTAssertEqual(out.values, [1, 0, 255, 255, 0, 0])
        // Below the old model's confidence threshold: left as background.
        o.prototypeOldConfidence = 0.999
        XCTAssertEqual(
            protos.relabel(labels, oldLogits: logits, oldFeatures: features, options: o).values, [0, 0, 255, 255, 0, 0])
        o.prototypeOldConfidence = 0.9
        // Pixels labelled with a new class are never touched.
        let kept = protos.relabel(
            Labels(shape: [1, 1, 6], values: [7, 0, 0, 0, 0, 0]), oldLogits: logits, oldFeatures: features, options: o)
        XCTAssertEqual(kept.values[0], 7)
    }

    static func stepFixture(
        method: String, iterations: Int = 4, options: DistillationOptions? = nil,
        auditRelabelling: Bool = false
    ) throws -> (DistillationStep, URL) {
        let (url, model, card) = try SynthesisTests.tinyTeacher()
        let packURL = temporaryDirectory().appendingPathComponent("p.tar")
        var o = SynthesisTests.smallOptions()
        o.resolution = 24
        _ = try SynthesisJob(
            teacherURL: url, model: model, card: card, classes: [1, 2, 3, 4, 5], count: 4, options: o, seed: 1,
            out: packURL
        ).run(resume: false)
        let train = try VOCDataset(root: DataTests.shapesRoot, split: "train", classNames: DatasetClasses.shapes)
        let task = try IncrementalTask.named("1-5,6-8", foreground: 20)
        let config = TrainingConfig(
            iterations: iterations, batchSize: 4, cropSize: 24, learningRate: 0.01, seed: 5, checkpointEvery: 2)
        let step = try DistillationStep(
            old: model, oldCard: card, train: train, task: task, step: 1, setting: .overlap,
            packs: [try SyntheticPack(url: packURL)], options: try options ?? DistillationOptions.preset(method),
            config: config, auditRelabelling: auditRelabelling)
        return (step, url)
    }

    func testRelabelAuditCountsAgainstTheFullMasks() throws {
        // Six background pixels of the step (one holds a new class 7 and is skipped); truth: old
        // classes 1 and 2, background, and future class 9.
        let before = Labels(shape: [1, 1, 7], values: [0, 0, 0, 0, 0, 0, 7])
        let after = Labels(shape: [1, 1, 7], values: [1, 1, 2, 0, 255, 2, 7])
        let truth = Labels(shape: [1, 1, 7], values: [1, 0, 9, 1, 2, 2, 7])
        var audit = RelabelAudit(classes: 3)
        audit.add(before: before, after: after, truth: truth)
        XCTAssertEqual(audit.right, [0, 1, 1])
        XCTAssertEqual(audit.wrongBackground, [0, 1, 0])
        XCTAssertEqual(audit.wrongOther, [0, 0, 1])
        XCTAssertEqual(audit.missed, [0, 1, 1])
        XCTAssertEqual(audit.relabelled, 4)
        XCTAssertEqual(audit.precision!, 0.5, accuracy: 1e-12)
        XCTAssertEqual(audit.recall!, 0.5, accuracy: 1e-12)
        XCTAssertNil(RelabelAudit(classes: 3).precision)

        // In a step, the audit's batches are the training batches with their full masks: every
        // pixel the step labels with a new class holds that class in the full mask too.
        let (step, _) = try Self.stepFixture(method: "hrhf+gsc", auditRelabelling: true)
        let real = try step.data.realLoader.batch(2), full = try step.data.auditLoader!.batch(2)
        XCTAssertEqual(real.images.array, full.images.array)
        var newPixels = 0
        for (l, t) in zip(real.labels.values, full.labels.values) where l != 0 && l != 255 {
            XCTAssertEqual(l, t)
            newPixels += 1
        }
        XCTAssertGreaterThan(newPixels, 0)
        _ = try step.loss(2)
        let counted = step.relabelAudit!
        // Old-class pixels in the step's background: each is re-labelled right, re-labelled to
        // another class, or missed.
        var oldPixels = 0
        for (l, t) in zip(real.labels.values, full.labels.values) where l == 0 && t > 0 && t < 6 { oldPixels += 1 }
        XCTAssertGreaterThan(oldPixels, 0)
        XCTAssertLessThanOrEqual(counted.right.reduce(0, +) + counted.missed.reduce(0, +), oldPixels)
        XCTAssertGreaterThanOrEqual(counted.relabelled + counted.missed.reduce(0, +), oldPixels)
        XCTAssertNil(
            try Self.stepFixture(method: "mib", auditRelabelling: true).0.relabelAudit, "only re-labelling is audited")
    }

    func testBatchNormRecalibrationUsesRealBatchesOnly() throws {
        // Half of every training batch is synthetic; after the step the first batch-norm layer's
        // running mean is the average channel mean of its input (conv1's output) over the real
        // batches drawn after the training iterations, none of them fake.
        let (step, _) = try Self.stepFixture(method: "hrhf+gsc")
        let modules = Dictionary(uniqueKeysWithValues: step.model.namedModules().map { ($0.name, $0.module) })
        let conv1 = try XCTUnwrap(modules["backbone.conv1"] as? Conv2d),
            bn1 = try XCTUnwrap(modules["backbone.bn1"] as? BatchNorm2d)
        try step.recalibrateBatchNorm(batches: 2)
        var expected = [Float](repeating: 0, count: bn1.runningMean.count)
        for b in 0..<2 {
            let x = try step.data.realLoader.batch(step.config.iterations + b).images
            XCTAssertEqual(x.shape[0], step.data.realPerBatch)
            let means = withNoGrad { mean(conv1(x), axes: [0, 2, 3]) }.array
            for c in expected.indices { expected[c] += means[c] / 2 }
        }
        assertClose(bn1.runningMean, Tensor(shape: [expected.count], values: expected), "recalibrated running mean")
        XCTAssertEqual(bn1.numBatchesTracked?.item, 2)
        XCTAssertEqual(bn1.momentum, 0.1)
    }

    func testSplitBatchNormTracksTheRealImagesOnly() throws {
        var o = try DistillationOptions.preset("hrhf+gsc")
        o.splitBatchNorm = true
        let (step, _) = try Self.stepFixture(method: "hrhf+gsc", options: o)
        let layers = step.model.namedModules().compactMap { $0.module as? BatchNorm2d }
        XCTAssertFalse(layers.isEmpty)
        XCTAssertTrue(layers.allSatisfy { $0.batchSplit == step.data.realPerBatch })
        let plain = try Self.stepFixture(method: "hrhf+gsc").0.model.namedModules().compactMap {
            $0.module as? BatchNorm2d
        }
        XCTAssertTrue(plain.allSatisfy { $0.batchSplit == nil }, "off by default")
        // One training forward of 4 real + 4 fake images moves the first layer's running mean
        // by momentum 0.1 towards the real images' channel means alone.
        let modules = Dictionary(uniqueKeysWithValues: step.model.namedModules().map { ($0.name, $0.module) })
        let conv1 = try XCTUnwrap(modules["backbone.conv1"] as? Conv2d),
            bn1 = try XCTUnwrap(modules["backbone.bn1"] as? BatchNorm2d)
        let before = bn1.runningMean.array
        let realMeans = withNoGrad { mean(conv1(try! step.data.realLoader.batch(0).images), axes: [0, 2, 3]) }.array
        step.model.train()
        XCTAssertTrue(try step.loss(0).total.item.isFinite)
        let expected = zip(before, realMeans).map { 0.9 * $0 + 0.1 * $1 }
        assertClose(
            bn1.runningMean, Tensor(shape: [expected.count], values: expected), "running mean from the real images")
    }

    func testHalfRealHalfFakeBatches() throws {
        let (step, _) = try Self.stepFixture(method: "hrhf+gsc")
        // Batch 4 real images; fake ratio 0.5 adds as many fake ones.
        XCTAssertEqual(step.data.realPerBatch, 4)
        XCTAssertEqual(try step.data.fakeSampler!.batch(0).shape, [4, 3, 24, 24])
        XCTAssertEqual(
            try step.data.fakeSampler!.batch(3).array, try step.data.fakeSampler!.batch(3).array, "deterministic")
        XCTAssertEqual(try step.data.realLoader.batch(0).images.shape, [4, 3, 24, 24])
        XCTAssertEqual(step.model.numClasses, 9)
        let (loss, parts) = try step.loss(0)
        XCTAssertTrue(loss.item.isFinite)
        XCTAssertEqual(Set(parts.keys), ["ce", "kd", "fake_ce", "fake_kd", "soft", "sharp", "rel"])
        let (mib, _) = try Self.stepFixture(method: "mib")
        XCTAssertNil(mib.data.fakeSampler)
        XCTAssertEqual(mib.data.realPerBatch, 4)
        XCTAssertEqual(Set(try mib.loss(0).parts.keys), ["ce", "kd"])
        XCTAssertThrowsError(try DistillationOptions.preset("nope"))
        // A quarter fake: 4 real + round(4 * 0.25 / 0.75) = 1 fake; a ratio of 1 leaves no real images.
        var quarter = try DistillationOptions.preset("hrhf")
        quarter.fakeRatio = 0.25
        let (q, _) = try Self.stepFixture(method: "hrhf", options: quarter)
        XCTAssertEqual(q.data.realPerBatch, 4)
        XCTAssertEqual(try q.data.fakeSampler!.batch(0).shape[0], 1)
        quarter.fakeRatio = 1
        XCTAssertThrowsError(try Self.stepFixture(method: "hrhf", options: quarter))
    }

    func testFrozenBatchNormKeepsTheOldStatistics() throws {
        var options = try DistillationOptions.preset("hrhf+gsc")
        XCTAssertFalse(options.freezeBatchNorm)
        options.freezeBatchNorm = true
        let (step, _) = try Self.stepFixture(method: "hrhf+gsc", iterations: 2, options: options)
        let before = step.model.namedBuffers().map { $0.tensor.array }
        let weightsBefore = step.model.parameters.map { $0.array }
        let trainer = try step.makeTrainer(checkpoint: nil)
        try trainer.run(loss: { try step.loss($0).total })
        XCTAssertEqual(step.model.namedBuffers().map { $0.tensor.array }, before, "running statistics untouched")
        XCTAssertNotEqual(step.model.parameters.map { $0.array }, weightsBefore, "weights still learn")
    }

    func testInterruptedStepResumesToTheSameWeights() throws {
        func run(interrupt: Bool) throws -> [Float] {
            let (step, _) = try Self.stepFixture(method: "hrhf+gsc")
            let ckpt = temporaryDirectory().appendingPathComponent("s.ckpt")
            let trainer = try step.makeTrainer(checkpoint: ckpt)
            if interrupt {
                try trainer.run(stopAfter: 2, loss: { try step.loss($0).total })
                let (again, _) = try Self.stepFixture(method: "hrhf+gsc")
                let resumed = try again.makeTrainer(checkpoint: ckpt)
                XCTAssertTrue(try resumed.resume())
                try resumed.run(loss: { try again.loss($0).total })
                return again.model.stateDict().flatMap { $0.tensor.array }
            }
            try trainer.run(loss: { try step.loss($0).total })
            return step.model.stateDict().flatMap { $0.tensor.array }
        }
        XCTAssertEqual(try run(interrupt: false), try run(interrupt: true))
    }

    /// The tiny teacher of classes 0-5 and a pack of `count` 24-pixel images of its classes 1-5, with
    /// the synthesis options that made it.
    static func tinyTeacherAndPack(count: Int) throws -> (teacher: URL, pack: URL, options: InversionOptions) {
        let (url, model, card) = try SynthesisTests.tinyTeacher()
        var o = SynthesisTests.smallOptions()
        o.resolution = 24
        let pack = temporaryDirectory().appendingPathComponent("p0.tar")
        _ = try SynthesisJob(
            teacherURL: url, model: model, card: card, classes: [1, 2, 3, 4, 5], count: count, options: o, seed: 1,
            out: pack
        ).run(resume: false)
        return (url, pack, o)
    }

    /// `--fake-min-achieved`: a step's fake half draws only the pack images whose classes reached
    /// that share of their asked areas, and says how many of how many it kept.
    func testTheFakeHalfKeepsOnlyImagesThatReachedTheirAreas() throws {
        let (url, pack, _) = try Self.tinyTeacherAndPack(count: 4)
        // Say image 2 reached 0.9 of every area it was asked and the others a quarter, rebuilt as a valid pack.
        let made = try SyntheticPack(url: pack)
        var manifest = made.manifest
        for i in manifest.images.indices {
            manifest.images[i].achievedAreas = manifest.images[i].targetAreas.map { i == 2 ? 0.9 * $0 : 0.25 * $0 }
        }
        manifest.quality = SynthesisQuality(records: manifest.images, imagesPerMinute: nil)
        var entries: [HostilePackTests.Entry] = [("manifest.json", try manifest.encoded(), .file)]
        for r in manifest.images {
            entries.append((r.image, try ImageIO.encodePNG(try made.image(r)), .file))
            entries.append((r.label, try ImageIO.encodePalettePNG(try made.label(r)), .file))
        }
        let edited = try HostilePackTests.write(entries, name: "edited.tar")
        let train = try VOCDataset(root: DataTests.shapesRoot, split: "train", classNames: DatasetClasses.shapes)
        func step(keepingShare share: Float) throws -> IncrementalRun {
            var options = try DistillationOptions.preset("hrhf")
            options.fakeMinimumAchievedShare = share
            return IncrementalRun(
                old: url, train: train, val: nil, task: try IncrementalTask.named("1-5,6", foreground: 20),
                firstStep: 1, lastStep: 1, setting: .overlap, packs: [edited], options: options,
                config: TrainingConfig(iterations: 2, batchSize: 2, cropSize: 24, learningRate: 0.01, seed: 5),
                stepPackClasses: .none, synthesize: { _ in },
                out: temporaryDirectory().appendingPathComponent("m.safetensors"))
        }
        var kept: [Int: [Int]] = [:]
        _ = try step(keepingShare: 0.5).run {
            if case .fakeImagesKept(let step, let k, let offered, let share) = $0 {
                XCTAssertEqual(share, 0.5)
                kept[step] = [k, offered]
            }
        }
        XCTAssertEqual(kept, [1: [1, 4]], "image 2 alone reached half of its areas")
        let none = try step(keepingShare: 1)
        XCTAssertThrowsError(try none.run { _ in }) { e in
            XCTAssertTrue(
                "\(e)".hasPrefix(edited.path) && "\(e)".contains("none of the 4 images shows its classes on 1.0"),
                "\(e)")
        }
    }

    /// Two steps of one class each in one run: the pack made after step 1 holds step 1's class
    /// (earlier packs kept) or every old class (replacing them), or none at all; a second run skips
    /// both steps.
    func testMultiStepRunMakesAPackAfterEachStep() throws {
        let (url, firstPack, o) = try Self.tinyTeacherAndPack(count: 2)
        let train = try VOCDataset(root: DataTests.shapesRoot, split: "train", classNames: DatasetClasses.shapes)
        let task = try IncrementalTask.named("1-5,6,7", foreground: 20)
        let config = TrainingConfig(
            iterations: 2, batchSize: 2, cropSize: 24, learningRate: 0.01, seed: 5, checkpointEvery: 2)
        for mode in StepPackClasses.allCases {
            let out = temporaryDirectory().appendingPathComponent("m.safetensors")
            let run = IncrementalRun(
                old: url, train: train, val: nil, task: task, firstStep: 1, lastStep: 2, setting: .overlap,
                packs: [firstPack], options: try DistillationOptions.preset("hrhf"), config: config,
                stepPackClasses: mode,
                synthesize: { _ = try SynthesisJob(request: $0, count: 2, options: o).run(resume: true) },
                out: out)
            var packsPerStep: [Int: Int] = [:]
            _ = try run.run {
                if case .stepStarted(let step, _, let packs, _, _, _) = $0 { packsPerStep[step] = packs }
            }
            if mode == .none {
                XCTAssertFalse(
                    FileManager.default.fileExists(atPath: run.packURL(afterStep: 1).path), "no pack between steps")
                XCTAssertEqual(packsPerStep, [1: 1, 2: 1], "the first pack serves both steps")
                XCTAssertEqual(try ModelFile.load(out).0.numClasses, 8)
                continue
            }
            let between = try SyntheticPack(url: run.packURL(afterStep: 1))
            switch mode {
            case .none:
                break
            case .new:
                XCTAssertEqual(between.manifest.classes.map(\.id), [6], "step 1's new class only")
                XCTAssertEqual(packsPerStep, [1: 1, 2: 2], "the first pack stays in use")
            case .all:
                XCTAssertEqual(between.manifest.classes.map(\.id), [1, 2, 3, 4, 5, 6])
                XCTAssertEqual(packsPerStep, [1: 1, 2: 1], "the new pack replaces the first")
            }
            XCTAssertEqual(try ModelFile.load(out).0.numClasses, 8)
            XCTAssertEqual(try ModelFile.load(run.modelURL(step: 1)).0.numClasses, 7)
            var started = 0
            var kept: [Int: String] = [:]
            _ = try run.run { event in
                if case .stepStarted = event { started += 1 }
                if case .stepAlreadyDone(let step, let model) = event { kept[step] = model.path }
            }
            XCTAssertEqual(started, 0, "finished steps are skipped")
            XCTAssertEqual(kept, [1: run.modelURL(step: 1).path, 2: out.path], "and named as kept")
        }
    }
}
