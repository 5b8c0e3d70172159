import XCTest

@testable import HRHF

final class DataTests: XCTestCase {
    /// A tiny Shapes set in VOC layout.
    static let shapesRoot: URL = {
        let dir = temporaryDirectory()
        try! ShapesGenerator(size: 32, seed: 5).write(to: dir, train: 24, val: 6)
        return dir
    }()

    func testShapesIsDeterministicAndHasBackgroundShift() throws {
        let g = ShapesGenerator(size: 48, seed: 1)
        let a = g.sample(split: "train", index: 3), b = g.sample(split: "train", index: 3)
        XCTAssertEqual(a.image, b.image)
        XCTAssertEqual(a.mask, b.mask)
        XCTAssertNotEqual(g.sample(split: "train", index: 4).image, a.image)
        XCTAssertNotEqual(ShapesGenerator(size: 48, seed: 2).sample(split: "train", index: 3).image, a.image)
        // Old objects (1-15) appear in images that hold new ones (16-20): the background shift.
        var newImages = 0, newWithOld = 0
        var seen = Set<UInt16>()
        for i in 0..<300 {
            let present = Set(g.sample(split: "train", index: i).mask.values)
            seen.formUnion(present)
            if present.contains(where: { $0 >= 16 }) {
                newImages += 1
                if present.contains(where: { $0 >= 1 && $0 <= 15 }) { newWithOld += 1 }
            }
        }
        XCTAssertEqual(seen, Set((0...20).map(UInt16.init)), "every class appears")
        XCTAssertGreaterThan(Double(newWithOld) / Double(newImages), 0.3)
    }

    func testVOCLayoutLoadsWithListsAndAugmentedLists() throws {
        let ds = try VOCDataset(root: Self.shapesRoot, split: "train", classNames: DatasetClasses.shapes)
        XCTAssertEqual(ds.count, 24)
        let s = try ds.sample(0)
        XCTAssertEqual(s.image.width, 32)
        XCTAssertEqual(s.name, "shapes_train_000000")
        // MiB's list format: "/JPEGImages/X.png /SegmentationClass/X.png".
        let list = temporaryDirectory().appendingPathComponent("train_aug.txt")
        try "/JPEGImages/shapes_val_000001.png /SegmentationClass/shapes_val_000001.png\n".write(
            to: list, atomically: true, encoding: .utf8)
        let aug = try VOCDataset(
            root: Self.shapesRoot, split: "train_aug", classNames: DatasetClasses.shapes, list: list)
        XCTAssertEqual(aug.count, 1)
        XCTAssertEqual(
            try aug.sample(0).labels,
            try VOCDataset(root: Self.shapesRoot, split: "val", classNames: DatasetClasses.shapes).sample(1).labels)
    }

    func testADEAndCityscapesLayoutsLoad() throws {
        let g = ShapesGenerator(size: 24, seed: 9)
        let ade = temporaryDirectory()
        for (split, folder) in [("train", "training"), ("val", "validation")] {
            for d in ["images/\(folder)", "annotations/\(folder)"] {
                try FileManager.default.createDirectory(
                    at: ade.appendingPathComponent(d), withIntermediateDirectories: true)
            }
            for i in 0..<2 {
                let (image, mask) = g.sample(split: split, index: i)
                try ImageIO.writePNG(image, to: ade.appendingPathComponent("images/\(folder)/ADE_\(i).png"))
                // ADE stores class ids as grey values 0-150.
                try ImageIO.writeGreyPNG(
                    IndexMask(width: 24, height: 24, values: mask.values.map { $0 * 7 }),
                    to: ade.appendingPathComponent("annotations/\(folder)/ADE_\(i).png"))
            }
        }
        let adeSet = try openDataset("ade", root: ade, split: "val")
        XCTAssertEqual(adeSet.count, 2)
        XCTAssertEqual(adeSet.classNames.count, 151)
        XCTAssertEqual(try adeSet.sample(1).labels.values, g.sample(split: "val", index: 1).mask.values.map { $0 * 7 })

        let cs = temporaryDirectory()
        let imgDir = cs.appendingPathComponent("leftImg8bit/val/aachen"),
            gtDir = cs.appendingPathComponent("gtFine/val/aachen")
        for d in [imgDir, gtDir] { try FileManager.default.createDirectory(at: d, withIntermediateDirectories: true) }
        let (image, _) = g.sample(split: "val", index: 0)
        try ImageIO.writePNG(image, to: imgDir.appendingPathComponent("aachen_000000_000019_leftImg8bit.png"))
        // Label ids 7 (road), 26 (car), 0 (unlabeled), 33 (bicycle).
        let ids: [UInt16] = (0..<(24 * 24)).map { [7, 26, 0, 33][$0 % 4] }
        try ImageIO.writeGreyPNG(
            IndexMask(width: 24, height: 24, values: ids),
            to: gtDir.appendingPathComponent("aachen_000000_000019_gtFine_labelIds.png"))
        let csSet = try openDataset("cityscapes", root: cs, split: "val")
        XCTAssertEqual(csSet.count, 1)
        XCTAssertEqual(Array(try csSet.sample(0).labels.values.prefix(4)), [0, 13, 255, 18], "mapped to train ids")
    }

    func testMalformedDatasetsNameTheFile() throws {
        let root = temporaryDirectory()
        try ShapesGenerator(size: 24, seed: 3).write(to: root, train: 3, val: 1)
        let list = root.appendingPathComponent("ImageSets/Segmentation/train.txt")
        // A missing file in the list.
        try "shapes_train_000000\nshapes_train_000099\n".write(to: list, atomically: true, encoding: .utf8)
        XCTAssertThrowsError(try VOCDataset(root: root, split: "train", classNames: DatasetClasses.shapes)) { e in
            XCTAssertTrue("\(e)".contains("shapes_train_000099") && "\(e)".contains("missing"), "\(e)")
        }
        // A mask whose size differs from its image.
        try "shapes_train_000000\nshapes_train_000001\n".write(to: list, atomically: true, encoding: .utf8)
        let bad = root.appendingPathComponent("SegmentationClass/shapes_train_000001.png")
        try ImageIO.writePalettePNG(IndexMask(width: 10, height: 24, values: .init(repeating: 1, count: 240)), to: bad)
        let ds = try VOCDataset(root: root, split: "train", classNames: DatasetClasses.shapes)
        XCTAssertThrowsError(try ds.sample(1)) { e in
            XCTAssertTrue("\(e)".contains(bad.path) && "\(e)".contains("10x24 but its image is 24x24"), "\(e)")
        }
        // A label outside the class range.
        try ImageIO.writePalettePNG(IndexMask(width: 24, height: 24, values: .init(repeating: 40, count: 576)), to: bad)
        XCTAssertThrowsError(try ds.sample(1)) { e in
            XCTAssertTrue("\(e)".contains(bad.path) && "\(e)".contains("label 40 is outside the 21 classes"), "\(e)")
        }
    }

    func testListNamesThatCouldLeaveTheirFolderAreRefusedWithTheLine() throws {
        let root = temporaryDirectory()
        try ShapesGenerator(size: 24, seed: 3).write(to: root, train: 2, val: 1)
        let list = root.appendingPathComponent("ImageSets/Segmentation/train.txt")
        let cases: [(String, String)] = [
            ("../../x/pwn", "name \"../../x/pwn\" holds a /"), ("a/b", "name \"a/b\" holds a /"), ("..", "is . or .."),
            ("x\u{0}y", "holds NUL or control characters"), ("\u{1B}[31mred", "holds NUL or control characters"),
            ("/JPEGImages/../../etc/x.jpg /SegmentationClassAug/x.png", "has a component that is . or .."),
            ("JPEGImages//x.jpg /SegmentationClassAug/x.png", "has a component that is empty"),
            ("/JPEGImages/x.jpg /SegmentationClassAug/../../../x.png", "has a component that is . or .."),
        ]
        for (bad, reason) in cases {
            try "shapes_train_000000\r\n\r\n\(bad)\r\n".write(to: list, atomically: true, encoding: .utf8)
            XCTAssertThrowsError(try VOCDataset(root: root, split: "train", classNames: DatasetClasses.shapes), bad) {
                let text = "\($0)"
                XCTAssertTrue($0 is DatasetError, text)
                XCTAssertTrue(text.hasPrefix("\(list.path): line 3: ") && text.contains(reason), text)
            }
        }
        let out = root.appendingPathComponent("predictions")
        XCTAssertEqual(try outputURL(in: out, name: "2007_000032", suffix: ".png").path, out.path + "/2007_000032.png")
        XCTAssertThrowsError(try outputURL(in: out, name: "../../x/pwn", suffix: ".png")) { e in
            XCTAssertEqual("\(e)", "\(out.path): the output name \"../../x/pwn\" holds a /")
        }
    }

    func testEvalRefusesAListNameThatWouldWriteOutsideItsFolder() throws {
        let root = temporaryDirectory()
        try ShapesGenerator(size: 24, seed: 3).write(to: root, train: 1, val: 2)
        let list = root.appendingPathComponent("ImageSets/Segmentation/val.txt")
        try "shapes_val_000000\n../../x/pwn\n".write(to: list, atomically: true, encoding: .utf8)
        let (model, _, _) = try SynthesisTests.tinyTeacher()
        let out = root.appendingPathComponent("deep/predictions")
        let r = try runTool(
            "hrhf-eval",
            [
                "--model", model.path, "--data", root.path, "--task", "3-2",
                "--save-predictions", out.path, "--threads", "1",
            ])
        XCTAssertEqual(r.status, 1, r.stderr)
        XCTAssertTrue(r.stderr.contains("\(list.path): line 2: name \"../../x/pwn\" holds a /"), r.stderr)
        XCTAssertFalse(FileManager.default.fileExists(atPath: out.path))
        XCTAssertFalse(FileManager.default.fileExists(atPath: root.appendingPathComponent("x/pwn.png").path))
    }

    func testTasksMatchMiBsTable() throws {
        let t155 = try IncrementalTask.named("15-5", foreground: 20)
        XCTAssertEqual(t155.steps, [Array(0...15), Array(16...20)])
        let t151 = try IncrementalTask.named("15-1", foreground: 20)
        XCTAssertEqual(t151.steps.count, 6)
        XCTAssertEqual(t151.steps[5], [20])
        XCTAssertEqual(try IncrementalTask.named("10-5-5", foreground: 20).steps.map(\.count), [11, 5, 5])
        XCTAssertEqual(try IncrementalTask.named("19-1", foreground: 20).steps.map(\.count), [20, 1])
        XCTAssertEqual(try IncrementalTask.named("10-1", foreground: 20).steps.count, 11)
        XCTAssertEqual(
            try IncrementalTask.named("100-10", foreground: 150).steps.map(\.count), [101, 10, 10, 10, 10, 10])
        XCTAssertEqual(try IncrementalTask.named("100-5", foreground: 150).steps.count, 11)
        XCTAssertEqual(try IncrementalTask.named("50-50", foreground: 150).steps.map(\.count), [51, 50, 50])
        XCTAssertEqual(
            try IncrementalTask.named("1-15,16-20", foreground: 20),
            IncrementalTask(name: "1-15,16-20", steps: t155.steps))
        XCTAssertEqual(try IncrementalTask.named("1-15", foreground: 20).steps, [Array(0...15)])
        XCTAssertThrowsError(try IncrementalTask.named("1-15,10-20", foreground: 20))
        XCTAssertThrowsError(try IncrementalTask.named("100-50", foreground: 20))
    }

    func testOverlapAndDisjointSelectionAndLabelRemapping() throws {
        let task = try IncrementalTask.named("15-5", foreground: 20)
        let overlap = StepProtocol(task: task, step: 1, setting: .overlap)
        let disjoint = StepProtocol(task: task, step: 0, setting: .disjoint)
        let step0 = StepProtocol(task: task, step: 0, setting: .overlap)
        XCTAssertTrue(overlap.usesForTraining([0, 3, 17]))
        XCTAssertFalse(overlap.usesForTraining([0, 3]), "no class of the step")
        XCTAssertFalse(overlap.usesForTraining([0, 255]), "background alone is no reason")
        XCTAssertTrue(step0.usesForTraining([0, 3, 17]), "overlap keeps images with future classes")
        XCTAssertFalse(disjoint.usesForTraining([0, 3, 17]), "disjoint drops images with future classes")
        XCTAssertTrue(disjoint.usesForTraining([0, 3, 255]))
        let mask = IndexMask(width: 5, height: 1, values: [0, 3, 17, 255, 20])
        XCTAssertEqual(overlap.trainingLabels(mask).values, [0, 0, 17, 255, 20], "old classes become background")
        XCTAssertEqual(step0.testLabels(mask).values, [0, 3, 255, 255, 255], "unseen classes are ignored")
        XCTAssertEqual(overlap.testLabels(mask).values, [0, 3, 17, 255, 20])
    }

    func testStepListsAreComputedThenReadFromTheirCacheFile() throws {
        let ds = try VOCDataset(root: Self.shapesRoot, split: "train", classNames: DatasetClasses.shapes)
        let task = try IncrementalTask.named("15-5", foreground: 20)
        let proto = StepProtocol(task: task, step: 1, setting: .overlap)
        let cache = temporaryDirectory()
        let first = try proto.trainingIndices(ds, cacheDirectory: cache)
        let expected = try (0..<ds.count).filter {
            proto.usesForTraining(Set(try ds.readLabels($0).values.map(Int.init)))
        }
        XCTAssertEqual(first, expected)
        let file = cache.appendingPathComponent("15-5-overlap-step1-train.txt")
        XCTAssertEqual(try String(contentsOf: file, encoding: .utf8).split(separator: "\n").count, first.count)
        // The cached list is what is used next time (edit it to prove it).
        try "shapes_train_000002\n".write(to: file, atomically: true, encoding: .utf8)
        XCTAssertEqual(try proto.trainingIndices(ds, cacheDirectory: cache), [2])
    }

    func testAugmentationKeepsImageAndLabelsAligned() {
        let g = ShapesGenerator(size: 40, seed: 4)
        let (image, mask) = g.sample(split: "train", index: 0)
        var rng = SeededGenerator(seed: 1)
        for _ in 0..<10 {
            let (i2, m2) = Augmentation(cropSize: 32).apply(image, mask, rng: &rng)
            XCTAssertEqual(i2.width, 32)
            XCTAssertEqual(m2.values.count, 32 * 32)
        }
        // Scale 1, crop = size: the identity or an exact mirror.
        let aug = Augmentation(cropSize: 40, scaleRange: 1...1, flip: true)
        var mirrored = 0
        for seed in 0..<8 {
            var r = SeededGenerator(seed: UInt64(seed))
            let (i2, m2) = aug.apply(image, mask, rng: &r)
            if m2 == mask {
                XCTAssertEqual(i2, image)
            } else {
                mirrored += 1
                for y in 0..<40 {
                    for x in 0..<40 { XCTAssertEqual(m2.values[y * 40 + x], mask.values[y * 40 + 39 - x]) }
                }
            }
        }
        XCTAssertGreaterThan(mirrored, 0)
        XCTAssertEqual(
            resizeMask(IndexMask(width: 2, height: 1, values: [3, 9]), width: 4, height: 1).values, [3, 3, 9, 9])
    }

    /// A window of a resize is bitwise the same pixels as the whole resize cropped: the
    /// augmentation computes only its crop's window.
    func testResizeWindowIsTheCropOfTheWholeResize() {
        var rng = SeededGenerator(seed: 5)
        let (w, h) = (23, 17)
        let image = RGBImage(width: w, height: h, pixels: (0..<(w * h * 3)).map { _ in UInt8(rng.next() % 256) })
        let mask = IndexMask(width: w, height: h, values: (0..<(w * h)).map { _ in UInt16(rng.next() % 21) })
        for (width, height) in [(41, 30), (12, 9), (23, 17)] {
            let whole = resizeImage(image, width: width, height: height)
            let wholeMask = resizeMask(mask, width: width, height: height)
            let (columns, rows) = (3..<(width - 2), 1..<(height - 4))
            let window = resizeImage(image, width: width, height: height, columns: columns, rows: rows)
            let windowMask = resizeMask(mask, width: width, height: height, columns: columns, rows: rows)
            XCTAssertEqual(
                [window.width, window.height, windowMask.width, windowMask.height],
                [
                    columns.count, rows.count, columns.count, rows.count,
                ])
            for (j, y) in rows.enumerated() {
                for (i, x) in columns.enumerated() {
                    XCTAssertEqual(windowMask.values[j * columns.count + i], wholeMask.values[y * width + x])
                    for c in 0..<3 {
                        XCTAssertEqual(
                            window.pixels[(j * columns.count + i) * 3 + c], whole.pixels[(y * width + x) * 3 + c])
                    }
                }
            }
        }
        // The same size through the formula is the image itself (weights 1 and 0).
        XCTAssertEqual(resizeImage(image, width: w, height: h, columns: 0..<w, rows: 0..<h), image)
    }

    func testBatchesAreDeterministicAndPrefetchingChangesNothing() throws {
        let ds = try VOCDataset(root: Self.shapesRoot, split: "train", classNames: DatasetClasses.shapes)
        func loader() -> BatchLoader {
            BatchLoader(
                dataset: ds, indices: Array(0..<ds.count), batchSize: 4, augmentation: Augmentation(cropSize: 24),
                normalization: .imagenet, seed: 7, labelTransform: { $0 })
        }
        let a = loader(), b = loader()
        for it in [0, 1, 2, 7, 8] {
            let x = try a.batch(it), y = try b.makeBatch(it)
            XCTAssertEqual(x.images.array, y.images.array, "iteration \(it)")
            XCTAssertEqual(x.labels, y.labels)
            XCTAssertEqual(x.images.shape, [4, 3, 24, 24])
        }
        XCTAssertNotEqual(try a.makeBatch(0).names, try a.makeBatch(6).names, "epochs are reshuffled")
    }

    func testConfusionMatrixAndReport() throws {
        var m = ConfusionMatrix(classes: 3)
        m.add(
            prediction: IndexMask(width: 6, height: 1, values: [0, 0, 1, 1, 2, 1]),
            label: IndexMask(width: 6, height: 1, values: [0, 1, 1, 1, 2, 255]))
        // class 0: TP 1, FN 0, FP 1 -> 1/2; class 1: TP 2, FN 1, FP 0 -> 2/3; class 2: 1.
        XCTAssertEqual(m.iou(0)!, 0.5, accuracy: 1e-12)
        XCTAssertEqual(m.iou(1)!, 2.0 / 3, accuracy: 1e-12)
        XCTAssertEqual(m.iou(2)!, 1, accuracy: 1e-12)
        XCTAssertEqual(m.pixelAccuracy, 4.0 / 5, accuracy: 1e-12)
        let task = IncrementalTask(name: "1-1,2-2", steps: [[0, 1], [2]])
        let r = IoUReport(matrix: m, task: task, step: 1, classNames: ["bg", "a", "b"], images: 1)
        XCTAssertEqual(r.old!, 2.0 / 3, accuracy: 1e-12, "old excludes background")
        XCTAssertEqual(r.new!, 1, accuracy: 1e-12)
        XCTAssertEqual(r.all!, (0.5 + 2.0 / 3 + 1) / 3, accuracy: 1e-12)
        XCTAssertTrue(r.table().contains(IoUReport.convention))
        XCTAssertEqual(r.plopCSVLine(classCount: 4), "1,0.5,\(2.0 / 3),1.0,x,\(r.all!)")
        let step0 = IoUReport(matrix: m, task: task, step: 0, classNames: ["bg", "a", "b"], images: 1)
        XCTAssertNil(step0.new)
    }

    func testInterruptedTrainingResumesToTheSameWeights() throws {
        let arch = ArchitectureDescription(
            name: "tiny", flavor: .torchvision, block: .basic, layers: [1, 1, 1, 1], baseWidth: 4,
            outputStride: 8, headChannels: 8, classesPerStep: [16])
        let train = try VOCDataset(root: Self.shapesRoot, split: "train", classNames: DatasetClasses.shapes)
        let task = try IncrementalTask.named("15-5", foreground: 20)
        let config = TrainingConfig(
            iterations: 6, batchSize: 2, cropSize: 24, learningRate: 0.01, seed: 3, checkpointEvery: 3)
        let job = StepZeroJob(architecture: arch, train: train, val: nil, task: task, setting: .overlap, config: config)
        func run(interrupt: Bool) throws -> [Float] {
            let ckpt = temporaryDirectory().appendingPathComponent("run.ckpt")
            let model = try job.makeModel()
            let (trainer, loader) = try job.makeTrainer(model: model, checkpoint: ckpt)
            if interrupt {
                try trainer.run(stopAfter: 3, loss: { supervisedLoss(model, try loader.batch($0)) })
                XCTAssertTrue(FileManager.default.fileExists(atPath: ckpt.path))
                // A new process: fresh model, fresh loader, state from the checkpoint.
                let model2 = try job.makeModel()
                let (trainer2, loader2) = try job.makeTrainer(model: model2, checkpoint: ckpt)
                XCTAssertTrue(try trainer2.resume())
                XCTAssertEqual(trainer2.iteration, 3)
                try trainer2.run(loss: { supervisedLoss(model2, try loader2.batch($0)) })
                return model2.stateDict().flatMap { $0.tensor.array }
            }
            try trainer.run(loss: { supervisedLoss(model, try loader.batch($0)) })
            return model.stateDict().flatMap { $0.tensor.array }
        }
        let straight = try run(interrupt: false), resumed = try run(interrupt: true)
        XCTAssertEqual(straight.count, resumed.count)
        XCTAssertEqual(straight, resumed, "bitwise the same weights, buffers and batch counts")
        let initial = try job.makeModel().stateDict().flatMap { $0.tensor.array }
        XCTAssertNotEqual(initial, straight, "training changed the weights")
    }

    /// The real images' loader and the pack sampler draw from one schedule: an epoch visits each
    /// item once (the last partial batch dropped), and a synthetic slot's generator is the one of
    /// its place after the real slots.
    func testLoaderAndPackSamplerShareOneEpochSchedule() {
        let schedule = EpochSchedule(count: 10, batchSize: 3, seed: 7)
        XCTAssertEqual(schedule.batchesPerEpoch, 3)
        let epoch0 = (0..<3).flatMap { schedule.picks($0, slots: nil).map(\.item) }
        XCTAssertEqual(Set(epoch0).count, 9, "nine distinct items in epoch 0")
        XCTAssertEqual(epoch0, Array(schedule.order(epoch: 0).prefix(9)))
        XCTAssertNotEqual(schedule.order(epoch: 1), schedule.order(epoch: 0), "each epoch reshuffles")
        XCTAssertEqual(schedule.picks(4, slots: 1..<3).map(\.slot), [1, 2], "a rank's share of the slots")
        var fake = EpochSchedule(count: 10, batchSize: 3, seed: 7, firstSlot: 8).augmentationGenerator(
            iteration: 5, slot: 0)
        var real = schedule.augmentationGenerator(iteration: 5, slot: 8)
        XCTAssertEqual(fake.next(), real.next())
        var first = schedule.augmentationGenerator(iteration: 5, slot: 0)
        var fakeFirst = EpochSchedule(count: 10, batchSize: 3, seed: 7, firstSlot: 8).augmentationGenerator(
            iteration: 5, slot: 0)
        XCTAssertNotEqual(first.next(), fakeFirst.next(), "real slot 0 and fake slot 0 differ")
    }
}
