import XCTest

@testable import HRHF

/// The tools under `mpirun -np 2` against one process: the same losses, weights, evaluation and
/// pack. CI installs Open MPI (tools/install-deps.sh), so these run there; without mpirun they skip.
final class DistributedTests: XCTestCase {
    /// A 16-class version of the tiny test network, and a Shapes set of 16 training and 5
    /// validation images (an odd count, so the ranks' shares differ).
    static let arch = ArchitectureDescription(
        name: "tiny", flavor: .torchvision, block: .basic, layers: [1, 1, 1, 1],
        baseWidth: 4, outputStride: 8, headChannels: 8, classesPerStep: [16])
    static let root: URL = {
        let dir = temporaryDirectory()
        try! ShapesGenerator(size: 32, seed: 5).write(to: dir, train: 16, val: 5)
        try! JSONEncoder().encode(arch).write(to: dir.appendingPathComponent("tiny.json"))
        return dir
    }()

    /// Runs `tool` on `ranks` MPI ranks (as root, oversubscribed: CI machines have two cores).
    func mpirun(
        _ ranks: Int, _ tool: String,
        _ arguments: [String]
    ) throws -> (status: Int32, stdout: String, stderr: String) {
        let path = (ProcessInfo.processInfo.environment["PATH"] ?? "/usr/bin").split(separator: ":")
            .map { URL(fileURLWithPath: String($0)).appendingPathComponent("mpirun") }
        guard let launcher = path.first(where: { FileManager.default.isExecutableFile(atPath: $0.path) }) else {
            print("DistributedTests skipped: mpirun is not installed (Debian: apt-get install openmpi-bin)")
            throw XCTSkip("mpirun is not installed")
        }
        return try runProcess(
            launcher, ["-np", "\(ranks)", "--oversubscribe", try toolURL(tool).path] + arguments,
            environment: Self.mpiEnvironment)
    }

    static let mpiEnvironment = [
        "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
        "OMPI_MCA_rmaps_base_oversubscribe": "1",
        // Containers often forbid the cross-memory attach vader uses by default.
        "OMPI_MCA_btl_vader_single_copy_mechanism": "none",
    ]

    static let clusterScripts = URL(fileURLWithPath: #filePath).deletingLastPathComponent()
        .deletingLastPathComponent().deletingLastPathComponent().appendingPathComponent("tools/cluster")

    func value(after label: String, in output: String) -> String? {
        output.split(separator: "\n").first { $0.hasPrefix(label) }
            .map { $0.dropFirst(label.count).trimmingCharacters(in: .whitespaces) }
    }

    func weights(_ url: URL) throws -> [String: Tensor] {
        Dictionary(uniqueKeysWithValues: try ModelFile.load(url).0.stateDict().map { ($0.name, $0.tensor) })
    }

    func testTrainingWithSyncBatchNormOnTwoRanksMatchesOneProcess() throws {
        let dir = temporaryDirectory()
        func arguments(_ out: String, batch: Int = 4, syncBN: Bool = true) -> [String] {
            [
                "--data", Self.root.path, "--arch", Self.root.appendingPathComponent("tiny.json").path,
                "--iterations", "3", "--batch", "\(batch)", "--crop", "24", "--seed", "3", "--threads", "1",
                "--eval-limit", "5",
                "--out", dir.appendingPathComponent(out).path,
            ] + (syncBN ? ["--sync-bn"] : [])
        }
        let one = try runTool("hrhf-train", arguments("one.safetensors"))
        XCTAssertEqual(one.status, 0, one.stderr)
        let two = try mpirun(2, "hrhf-train", arguments("two.safetensors"))
        XCTAssertEqual(two.status, 0, two.stderr + two.stdout)
        // Rank 1 prints nothing: one report, one model, no checkpoint left behind.
        XCTAssertEqual(two.stdout.components(separatedBy: "final loss (smoothed)").count, 2, two.stdout)
        XCTAssertFalse(FileManager.default.fileExists(atPath: dir.appendingPathComponent("two.safetensors.ckpt").path))
        let loss = "final loss (smoothed)", miou = "val mIoU all (classes 0-15)"
        XCTAssertNotNil(value(after: loss, in: one.stdout), one.stdout)
        XCTAssertEqual(value(after: loss, in: two.stdout), value(after: loss, in: one.stdout))
        XCTAssertEqual(value(after: miou, in: two.stdout), value(after: miou, in: one.stdout))
        // Sums over two ranks add in another order than over one batch: float rounding, which three
        // SGD steps amplify most in the ASPP branches, whose batch norms see 3x3 maps. Bound per
        // tensor: 1e-5 absolute (tensors near 0, such as batch-norm biases) + 3e-3 of the tensor's
        // largest value. Measured with OpenBLAS's AVX-512 kernels: 1.5e-4 on
        // classifier.0.convs.1.0.weight (largest 0.061), 6.2e-6 on its batch norm's bias (largest
        // 2e-4); one process with OpenBLAS's SSE3 kernels differs from one with its AVX-512 ones by
        // as much. The losses and mIoU above must match to the printed digit.
        let single = try weights(dir.appendingPathComponent("one.safetensors"))
        let parallel = try weights(dir.appendingPathComponent("two.safetensors"))
        XCTAssertEqual(Set(single.keys), Set(parallel.keys))
        for (name, t) in single {
            let p = try XCTUnwrap(parallel[name], name)
            let scale = t.array.map { Swift.abs($0) }.max() ?? 0
            let worst = zip(p.array, t.array).map { Swift.abs($0 - $1) }.max() ?? 0
            XCTAssertLessThanOrEqual(worst, 1e-5 + 3e-3 * scale, "\(name): largest difference \(worst)")
        }

        // Without --sync-bn each rank normalises with its own two images' statistics (as DDP):
        // the running statistics then differ, which shows the test above can fail.
        let local = try mpirun(2, "hrhf-train", arguments("local.safetensors", syncBN: false))
        XCTAssertEqual(local.status, 0, local.stderr)
        let perRank = try weights(dir.appendingPathComponent("local.safetensors"))
        let name = "backbone.bn1.running_var"
        XCTAssertGreaterThan(relativeError(perRank[name]!, single[name]!), 1e-3)

        // One image per rank: the ASPP pooling branch's batch norm sees one value per channel on
        // each rank, which only synchronised statistics make valid (two values over both ranks).
        // Its input gradient is then a difference of nearly equal terms (x-hat is +-1 up to eps),
        // so rounding differences of order 1e-7 grow to about 1e-2: the weights are not compared
        // (measured: up to 6e-4 apart after two iterations), the losses are.
        let one2 = try runTool("hrhf-train", arguments("one2.safetensors", batch: 2))
        XCTAssertEqual(one2.status, 0, one2.stderr)
        let two2 = try mpirun(2, "hrhf-train", arguments("two2.safetensors", batch: 2))
        XCTAssertEqual(two2.status, 0, two2.stderr)
        XCTAssertNotNil(value(after: loss, in: one2.stdout), one2.stdout)
        XCTAssertEqual(value(after: loss, in: two2.stdout), value(after: loss, in: one2.stdout))
    }

    /// The numbers of hrhf-distill's "step 1 last iteration:" line (the loss, then its terms).
    func lastIteration(_ output: String) -> [Double] {
        guard let line = value(after: "step 1 last iteration:", in: output) else { return [] }
        return line.split(whereSeparator: { $0 == " " || $0 == "," }).compactMap { Double($0) }
    }

    /// Three iterations of distillation at a global batch of 4 real images (and 4 fake ones) on two
    /// ranks with --sync-bn: the same loss and terms as one process (within 1e-5, relative above 1;
    /// largest measured 2e-6, and 7e-6 on PLOP's POD term of 95.8), the same evaluation and the
    /// same weights (2e-5 relative: sums over two ranks add in another order, and three steps
    /// through batch norm on a teacher scaled by 20 carry that rounding on; largest measured 1.07e-5,
    /// GSC's layer1.0.bn1.bias, then 7.3e-6, PLOP's), for MiB, PLOP (its adaptive factor's pixel counts and Local POD over the whole
    /// batch) and HRHF+GSC with split batch norm and feature distillation, whose compensation
    /// groups, relation class means and sharpness mask read the whole batch. Then the cluster
    /// script, a two-step run, and the refusals.
    func testDistillationOnTwoRanksMatchesOneProcess() throws {
        let (_, model, card) = try SynthesisTests.tinyTeacher()
        let dir = temporaryDirectory()
        // A confident teacher (logits scaled by 20), so that the fake half's labels, the sharpness
        // mask and the re-labelling select pixels.
        for t in [model.classifiers[0].weight, model.classifiers[0].bias!] {
            for i in 0..<t.count { t.pointer[i] *= 20 }
        }
        let teacher = dir.appendingPathComponent("teacher.safetensors")
        try ModelFile.save(model, card: card, to: teacher)
        let pack = dir.appendingPathComponent("p.tar")
        let synthesis = try runTool(
            "hrhf-synth",
            [
                "--model", teacher.path, "--classes", "1-5", "--count", "4", "--synth-iterations", "3",
                "--synth-batch", "2", "--resolution", "24", "--seed", "1", "--threads", "1", "--out", pack.path,
            ])
        XCTAssertEqual(synthesis.status, 0, synthesis.stderr)
        func arguments(_ method: String, _ out: String, batch: Int = 4, syncBN: Bool = true) -> [String] {
            [
                "--old", teacher.path, "--pack", pack.path, "--data", DataTests.shapesRoot.path, "--dataset", "shapes",
                "--task", "1-5,6-8", "--step", "1", "--method", method, "--iterations", "3", "--batch", "\(batch)",
                "--crop", "24", "--seed", "3", "--threads", "1", "--eval-limit", "6",
                "--json", dir.appendingPathComponent(out + ".json").path,
                "--out", dir.appendingPathComponent(out + ".safetensors").path,
            ] + (method == "hrhf+gsc" ? ["--split-bn", "true", "--feature-weight", "1"] : [])
                + (syncBN ? ["--sync-bn"] : [])
        }
        // The loss and its terms: ce, kd (mib); ce, pod (plop, pseudo-labels); ce, fake_ce, fake_feat,
        // fake_kd, kd, rel, sharp, soft (hrhf+gsc, re-labelling); ce, lwf_kd (lwf, plain background,
        // random new rows); ce on every step's images (joint); and the other rows of the table.
        var mibLoss = 0.0
        let methods = [
            ("mib", 2), ("plop", 2), ("hrhf+gsc", 8), ("lwf", 2), ("joint", 1), ("ft", 1), ("gsc", 4), ("hrhf", 4),
        ]
        for (method, terms) in methods {
            let one = try runTool("hrhf-distill", arguments(method, method + "-one"))
            XCTAssertEqual(one.status, 0, one.stderr)
            let two = try mpirun(2, "hrhf-distill", arguments(method, method + "-two"))
            XCTAssertEqual(two.status, 0, two.stderr + two.stdout)
            let single = lastIteration(one.stdout), parallel = lastIteration(two.stdout)
            XCTAssertEqual(single.count, 1 + terms, one.stdout)
            if method == "mib" { mibLoss = single[0] }
            XCTAssertEqual(parallel.count, single.count, two.stdout)
            for (a, b) in zip(parallel, single) { XCTAssertEqual(a, b, accuracy: 1e-5 * max(abs(b), 1), method) }
            XCTAssertTrue(two.stdout.contains("ranks x threads 2 x 1"), two.stdout)
            let json = try Data(contentsOf: dir.appendingPathComponent(method + "-one.json"))
            XCTAssertEqual(try Data(contentsOf: dir.appendingPathComponent(method + "-two.json")), json, method)
            let a = try weights(dir.appendingPathComponent(method + "-one.safetensors"))
            let b = try weights(dir.appendingPathComponent(method + "-two.safetensors"))
            XCTAssertEqual(Set(a.keys), Set(b.keys))
            for (name, t) in a { assertClose(b[name], t, tolerance: 2e-5, "\(method) \(name)") }
            let worst = a.map { name, t in (relativeError(b[name] ?? t, t), name) }.max { $0.0 < $1.0 }
            print("\(method): last iteration \(single) one process, \(parallel) two ranks; weights \(worst!)")
        }
        // Without --sync-bn each rank normalises its own images (as DDP): the comparison above fails.
        let local = try mpirun(2, "hrhf-distill", arguments("mib", "local", syncBN: false))
        XCTAssertEqual(local.status, 0, local.stderr)
        let perRank = lastIteration(local.stdout).first ?? 0
        print("mib without --sync-bn: loss \(perRank) on two ranks, \(mibLoss) in one process")
        XCTAssertGreaterThan(abs(perRank - mibLoss), 1e-3 * mibLoss)
        // A batch must give each rank a real image.
        let small = try mpirun(2, "hrhf-distill", arguments("mib", "small", batch: 1))
        XCTAssertNotEqual(small.status, 0)
        XCTAssertTrue(
            small.stderr.contains(
                "--batch: a batch of 1 real and 0 fake images cannot be shared by 2 ranks: "
                    + "each rank needs at least one real image"),
            small.stderr)
        XCTAssertFalse(FileManager.default.fileExists(atPath: dir.appendingPathComponent("small.safetensors").path))

        // tools/cluster/distill-steps.sbatch, its `srun` starting two local ranks: the 2-rank MiB run.
        let bin = dir.appendingPathComponent("bin")
        try FileManager.default.createDirectory(at: bin, withIntermediateDirectories: true)
        let srun = bin.appendingPathComponent("srun")
        try "#!/bin/sh\nshift\nexec mpirun -np 2 --oversubscribe \"$@\"\n".write(
            to: srun, atomically: true, encoding: .utf8)
        try FileManager.default.setAttributes([.posixPermissions: 0o755], ofItemAtPath: srun.path)
        let tools = try toolURL("hrhf-distill").deletingLastPathComponent().path
        let sbatchOut = dir.appendingPathComponent("sbatch/m.safetensors")
        let script = try runProcess(
            URL(fileURLWithPath: "/bin/bash"),
            [Self.clusterScripts.appendingPathComponent("distill-steps.sbatch").path],
            environment: Self.mpiEnvironment.merging([
                "PATH": "\(bin.path):\(tools):" + (ProcessInfo.processInfo.environment["PATH"] ?? "/usr/bin:/bin"),
                "DATA": DataTests.shapesRoot.path, "DATASET": "shapes", "OLD": teacher.path, "PACK": pack.path,
                "OUT": sbatchOut.path, "TASK": "1-5,6-8", "LAST_STEP": "1", "METHOD": "mib", "ITERATIONS": "3",
                "BATCH": "4", "CROP": "24", "SLURM_CPUS_ON_NODE": "1", "EXTRA_ARGS": "--seed 3 --eval-limit 6",
            ]) { $1 })
        XCTAssertEqual(script.status, 0, script.stderr)
        XCTAssertTrue(script.stdout.contains("ranks x threads 2 x 1"), script.stdout)
        let scripted = try weights(sbatchOut), parallel = try weights(dir.appendingPathComponent("mib-two.safetensors"))
        for (name, t) in parallel { XCTAssertEqual(scripted[name]?.array, t.array, name) }
        XCTAssertEqual(
            try Data(contentsOf: dir.appendingPathComponent("sbatch/m-eval.json")),
            try Data(contentsOf: dir.appendingPathComponent("mib-one.json")))

        // Two steps on two ranks: the pack between them made by both ranks, each step's model and
        // the pack written once by rank 0, read by both.
        let steps = dir.appendingPathComponent("steps.safetensors")
        var twoSteps = arguments("hrhf", "unused")
        twoSteps.replaceSubrange(twoSteps.firstIndex(of: "--json")!..., with: ["--out", steps.path])
        twoSteps[twoSteps.firstIndex(of: "1-5,6-8")!] = "1-5,6,7"
        let multi = try mpirun(
            2, "hrhf-distill",
            twoSteps + [
                "--last-step", "2", "--synth-count", "2", "--synth-iterations", "2", "--synth-batch", "1",
                "--resolution", "24",
            ])
        XCTAssertEqual(multi.status, 0, multi.stderr + multi.stdout)
        XCTAssertTrue(
            multi.stdout.contains(
                "step 2 of 1-5,6,7 (overlap), method hrhf: classes 7, 1 real images, 2 packs, 3 iterations"),
            multi.stdout)
        XCTAssertEqual(
            try SyntheticPack(url: dir.appendingPathComponent("steps-step1-pack.tar")).manifest.classes.map(\.id), [6])
        XCTAssertEqual(try ModelFile.load(steps).0.numClasses, 8)
        let left = try FileManager.default.contentsOfDirectory(atPath: dir.path).filter { $0.hasPrefix("steps") }
            .sorted()
        XCTAssertEqual(
            left,
            ["steps-step1-pack.tar", "steps-step1.safetensors", "steps.safetensors"])
    }

    func testEvaluationOnTwoRanksMatchesOneProcess() throws {
        let dir = temporaryDirectory()
        let model = try DeepLabV3(Self.arch, seed: 21)
        var rng = SeededGenerator(seed: 22)
        for (name, t) in model.namedBuffers() where name.hasSuffix("running_var") {
            for i in 0..<t.count { t.pointer[i] = 0.5 + rng.nextUnitFloat() }
        }
        let modelURL = dir.appendingPathComponent("m.safetensors")
        let card = ModelCard(architecture: Self.arch, classNames: Array(DatasetClasses.shapes.prefix(16)))
        try ModelFile.save(model, card: card, to: modelURL)
        func arguments(_ json: String) -> [String] {
            [
                "--model", modelURL.path, "--data", Self.root.path, "--step", "0", "--threads", "1",
                "--json", dir.appendingPathComponent(json).path,
            ]
        }
        let one = try runTool("hrhf-eval", arguments("one.json"))
        XCTAssertEqual(one.status, 0, one.stderr)
        let two = try mpirun(2, "hrhf-eval", arguments("two.json"))
        XCTAssertEqual(two.status, 0, two.stderr)
        let report = try Data(contentsOf: dir.appendingPathComponent("one.json"))
        XCTAssertTrue(String(decoding: report, as: UTF8.self).contains("\"images\" : 5"))
        XCTAssertEqual(try Data(contentsOf: dir.appendingPathComponent("two.json")), report)
    }

    func testSynthesisOnTwoRanksWritesTheSamePack() throws {
        let (teacher, _, _) = try SynthesisTests.tinyTeacher()
        let dir = temporaryDirectory()
        // Three batches of two: rank 0 makes two of them, rank 1 one.
        func arguments(_ out: String) -> [String] {
            [
                "--model", teacher.path, "--classes", "1-5", "--count", "6", "--synth-batch", "2",
                "--synth-iterations", "2", "--resolution", "16", "--seed", "7", "--threads", "1",
                "--out", dir.appendingPathComponent(out).path,
            ]
        }
        let one = try runTool("hrhf-synth", arguments("one.tar"))
        XCTAssertEqual(one.status, 0, one.stderr)
        let two = try mpirun(2, "hrhf-synth", arguments("two.tar"))
        XCTAssertEqual(two.status, 0, two.stderr)
        let pack = try Data(contentsOf: dir.appendingPathComponent("one.tar"))
        XCTAssertGreaterThan(pack.count, 10_000)
        XCTAssertEqual(try Data(contentsOf: dir.appendingPathComponent("two.tar")), pack)
        XCTAssertFalse(FileManager.default.fileExists(atPath: dir.appendingPathComponent("two.tar.partial.d").path))
    }

    /// tools/cluster/synth-array.sbatch and synth-merge.sbatch run by hand with the variables Slurm
    /// sets: three array tasks and the merge give the single run's pack, byte for byte.
    func testSlurmArrayScriptsMakeTheSinglePack() throws {
        let (teacher, _, _) = try SynthesisTests.tinyTeacher()
        let dir = temporaryDirectory()
        let scripts = Self.clusterScripts
        let tools = try toolURL("hrhf-synth").deletingLastPathComponent().path
        let bash = URL(fileURLWithPath: "/bin/bash"), pack = dir.appendingPathComponent("packs/p.tar")
        let common = [
            "PATH": tools + ":" + (ProcessInfo.processInfo.environment["PATH"] ?? "/usr/bin:/bin"),
            "TEACHER": teacher.path, "CLASSES": "1-5", "COUNT": "6", "SEED": "7", "RESOLUTION": "16",
            "PACK": pack.path, "EXTRA_ARGS": "--synth-iterations 2 --synth-batch 2 --threads 1",
        ]
        for task in 3...5 {
            let slurm = ["SLURM_ARRAY_TASK_ID": "\(task)", "SLURM_ARRAY_TASK_MIN": "3", "SLURM_ARRAY_TASK_COUNT": "3"]
            let r = try runProcess(
                bash, [scripts.appendingPathComponent("synth-array.sbatch").path],
                environment: common.merging(slurm) { $1 })
            XCTAssertEqual(r.status, 0, r.stderr)
        }
        let merge = try runProcess(
            bash, [scripts.appendingPathComponent("synth-merge.sbatch").path],
            environment: common.merging(["PARTS": "3"]) { $1 })
        XCTAssertEqual(merge.status, 0, merge.stderr)
        XCTAssertTrue(merge.stdout.contains("merged 3 parts"), merge.stdout)
        let single = dir.appendingPathComponent("single.tar")
        let one = try runTool(
            "hrhf-synth",
            [
                "--model", teacher.path, "--classes", "1-5", "--count", "6", "--seed", "7",
                "--resolution", "16", "--synth-iterations", "2", "--synth-batch", "2",
                "--threads", "1", "--out", single.path,
            ])
        XCTAssertEqual(one.status, 0, one.stderr)
        XCTAssertEqual(try Data(contentsOf: pack), try Data(contentsOf: single))
        let left = try FileManager.default.contentsOfDirectory(atPath: pack.deletingLastPathComponent().path)
        XCTAssertEqual(left, ["p.tar"], "the merge removes the parts")
    }

    func testAFailingRankEndsTheJobWithItsRankAndError() throws {
        let out = temporaryDirectory().appendingPathComponent("m.safetensors")
        let r = try mpirun(
            2, "hrhf-train",
            [
                "--data", Self.root.path, "--arch", "deeplabv3-small", "--iterations", "1",
                "--batch", "1", "--threads", "1", "--out", out.path,
            ])
        XCTAssertNotEqual(r.status, 0)
        XCTAssertTrue(r.stderr.contains("error: rank 0 of 2: ") || r.stderr.contains("error: rank 1 of 2: "), r.stderr)
        XCTAssertTrue(r.stderr.contains("a batch of 1 cannot be shared by 2 ranks"), r.stderr)
        XCTAssertFalse(FileManager.default.fileExists(atPath: out.path))
    }

    func testBatchSharesAndLaunchDetection() throws {
        XCTAssertEqual((0..<3).map { DataParallel.share(of: 8, rank: $0, size: 3) }, [0..<3, 3..<6, 6..<8])
        XCTAssertEqual((0..<2).map { DataParallel.share(of: 5, rank: $0, size: 2) }, [0..<3, 3..<5])
        XCTAssertTrue(Communicator.launchedByMPI(["OMPI_COMM_WORLD_SIZE": "2"]))
        XCTAssertTrue(Communicator.launchedByMPI(["PMIX_RANK": "0"]))
        XCTAssertTrue(Communicator.launchedByMPI(["PMI_SIZE": "4"]))
        XCTAssertFalse(Communicator.launchedByMPI(["SLURM_PROCID": "0", "PATH": "/usr/bin"]))
        XCTAssertEqual(Communicator.single.size, 1)
        var counts = [3, 4]
        Communicator.single.allreduceSum(&counts)
        XCTAssertEqual(counts, [3, 4])
    }

    /// A rank's shares of a pack batch and of dropout's masks are the one-process batch's slots.
    func testSharesOfPackBatchesAndDropoutMasks() throws {
        let (teacher, model, card) = try SynthesisTests.tinyTeacher()
        let packURL = temporaryDirectory().appendingPathComponent("p.tar")
        _ = try SynthesisJob(
            teacherURL: teacher, model: model, card: card, classes: [1, 2], count: 3,
            options: SynthesisTests.smallOptions(), seed: 1, out: packURL
        ).run(resume: false)
        let sampler = try PackSampler(
            packs: [try SyntheticPack(url: packURL)], batchSize: 3, augmentation: Augmentation(cropSize: 12),
            normalization: .imagenet, seed: 4)
        let whole = try sampler.batch(5)
        sampler.share = 1..<3
        let part = try sampler.batch(5)
        XCTAssertEqual(part.shape, [2, 3, 12, 12])
        XCTAssertEqual(part.array, sliceBatch(whole, 1..<3).array)

        // Images 0-4 as one batch, against images 1 and 3-4 (a rank's real and fake shares).
        let dropout = Dropout(p: 0.5)
        let x = randn([5, 2, 3, 3], seed: 6)
        dropout.reseed(9)
        let all = dropout(x)
        dropout.globalSlots = [1..<2, 3..<5]
        dropout.reseed(9)
        let shares = dropout(concatBatch([sliceBatch(x, 1..<2), sliceBatch(x, 3..<5)]))
        XCTAssertEqual(shares.array, concatBatch([sliceBatch(all, 1..<2), sliceBatch(all, 3..<5)]).array)
        XCTAssertNotEqual(shares.array, sliceBatch(all, 0..<3).array)
        // The slots of a rank from the parts' sizes: rank 1 of 2 of batches of 3 and 2.
        let slots = [DataParallel.share(of: 3, rank: 1, size: 2), DataParallel.share(of: 2, rank: 1, size: 2)]
        XCTAssertEqual(slots, [2..<3, 1..<2])
    }

    /// The overlapped gradient sum's buckets follow the order gradients finish in and respect the
    /// caps; on one process it hands back every gradient unchanged and leaves an unreached
    /// parameter without one.
    func testOverlappedGradientSumBucketsAndHandsBackGradients() throws {
        let parameters = [[3], [5], [2, 2], [7]].map { Tensor(zeros: $0, requiresGrad: true) }
        let sum = OverlappedGradientSum(
            DataParallel(.single), parameters: parameters, firstBucketElements: 4, bucketElements: 8)
        let grads = parameters.map { randn($0.shape, seed: UInt64($0.count)) }
        for pass in 0..<2 {
            sum.begin()
            // Parameter 1 is never reached; the others finish last-registered first.
            for i in [3, 2, 0] {
                parameters[i].grad = grads[i]
                sum.gradientFinished(parameters[i])
            }
            sum.finish()
            XCTAssertNil(parameters[1].grad, "pass \(pass)")
            for i in [0, 2, 3] {
                XCTAssertEqual(parameters[i].grad?.array, grads[i].array, "pass \(pass)")
                if pass == 1 { XCTAssertFalse(parameters[i].grad === grads[i], "a copy from its bucket") }
                parameters[i].grad = nil
            }
        }
        // 7 alone (over the first cap of 4), then 4 + 3, then the unreached 5.
        XCTAssertEqual(sum.layout, [[3], [2, 0], [1]])
    }

    func testShardFromTheScheduler() throws {
        func shard(_ env: [String: String], count: Int? = nil) throws -> [Int] {
            let s = try shardFromEnvironment(env, count: count)
            return [s.index, s.count]
        }
        XCTAssertEqual(try shard(["SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_COUNT": "4"]), [1, 4])
        let slurm = ["SLURM_ARRAY_TASK_ID": "8", "SLURM_ARRAY_TASK_MIN": "5", "SLURM_ARRAY_TASK_COUNT": "4"]
        XCTAssertEqual(try shard(slurm), [4, 4])
        XCTAssertEqual(try shard(["JOB_COMPLETION_INDEX": "2"], count: 3), [3, 3])
        XCTAssertEqual(try shard(["JOB_COMPLETION_INDEX": "0", "HRHF_SHARD_COUNT": "2"]), [1, 2])
        func refusal(_ env: [String: String], count: Int? = nil) -> String {
            do {
                _ = try shardFromEnvironment(env, count: count)
                return "accepted"
            } catch { return "\(error)" }
        }
        XCTAssertTrue(refusal(["JOB_COMPLETION_INDEX": "3"], count: 3).contains("shard 4 of 3 is outside 1...3"))
        XCTAssertTrue(refusal(["JOB_COMPLETION_INDEX": "1"]).contains("give --shard-count or HRHF_SHARD_COUNT"))
        XCTAssertTrue(
            refusal(["SLURM_ARRAY_TASK_ID": "x1", "SLURM_ARRAY_TASK_COUNT": "2"])
                .contains("SLURM_ARRAY_TASK_ID: environment variable is \"x1\", not a whole number"))
        XCTAssertTrue(refusal([:]).contains("--shard auto: needs SLURM_ARRAY_TASK_ID or JOB_COMPLETION_INDEX"))
    }
}
