import Foundation
import XCTest

@testable import HRHF

/// Pins every method's distillation bitwise on this machine: the loss and each of its parts at
/// every iteration, and a SHA-256 of the weights after them. A restructuring of the incremental
/// layer must keep the order of every floating-point operation, so these values stay exact.
final class MethodPinTests: XCTestCase {
    struct Pin: Equatable, CustomStringConvertible {
        /// Per iteration: "total" and the step's parts.
        var losses: [[String: Float]]
        /// SHA-256 of the state dict's names and float bits, in state-dict order.
        var weights: String

        var description: String {
            let its = losses.map { parts in
                "[" + parts.keys.sorted().map { "\"\($0)\": \(parts[$0]!)" }.joined(separator: ", ") + "]"
            }
            return "Pin(losses: [\(its.joined(separator: ", "))], weights: \"\(weights)\")"
        }
    }

    /// The methods' presets and two ablations that reach the remaining loss branches.
    static func configurations() throws -> [(name: String, options: DistillationOptions)] {
        var featurePlain = try DistillationOptions.preset("hrhf+gsc")
        featurePlain.method.setWeight(.feat, on: .fake, 0.5)
        featurePlain.fakeFoldsNewClasses = false
        featurePlain.sharpConfidence = 0.4
        var pseudoKD = try DistillationOptions.preset("hrhf")
        pseudoKD.method.background = .pseudo
        pseudoKD.method.setWeight(.lwfKD, on: .real, 2)
        let presets = try ["ft", "lwf", "mib", "plop", "gsc", "hrhf", "hrhf+gsc", "joint"].map {
            ($0, try DistillationOptions.preset($0))
        }
        return presets + [
            ("hrhf+gsc feature, plain fake background, sharp 0.4", featurePlain),
            ("hrhf pseudo, plain KD", pseudoKD),
        ]
    }

    /// Two training iterations of step 1 of 1-5,6-8 on Shapes from the tiny teacher, 2 real
    /// images a batch (and 2 fake for the pack methods).
    static func pin(_ options: DistillationOptions, teacher: URL, pack: URL) throws -> Pin {
        let (old, card) = try ModelFile.load(teacher)
        let train = try VOCDataset(root: DataTests.shapesRoot, split: "train", classNames: DatasetClasses.shapes)
        let task = try IncrementalTask.named("1-5,6-8", foreground: 20)
        let config = TrainingConfig(
            iterations: 2, batchSize: 2, cropSize: 24, learningRate: 0.01, seed: 5,
            checkpointEvery: 2)
        let step = try DistillationStep(
            old: old, oldCard: card, train: train, task: task, step: 1, setting: .overlap,
            packs: [try SyntheticPack(url: pack)], options: options, config: config)
        var losses: [[String: Float]] = []
        try step.makeTrainer(checkpoint: nil).run(loss: { it in
            let (total, parts) = try step.loss(it)
            losses.append(parts.merging(["total": total.item]) { a, _ in a })
            return total
        })
        var bytes = Data()
        for (name, tensor) in step.model.stateDict() {
            bytes.append(contentsOf: Array(name.utf8))
            for v in tensor.array { withUnsafeBytes(of: v.bitPattern.littleEndian) { bytes.append(contentsOf: $0) } }
        }
        return Pin(losses: losses, weights: sha256Hex(bytes))
    }

    static let expected: [String: Pin] = [
        "ft": Pin(
            losses: [
                ["ce": 6.646457, "total": 6.646457], ["ce": 4.602027, "total": 4.602027],
            ], weights: "ecdfb99adf6326747e2ed62990bd697250c182d4af604281eaea45e01b2a936d"),
        "lwf": Pin(
            losses: [
                ["ce": 6.646457, "lwf_kd": 0.49254447, "total": 55.900906],
                ["ce": 4.488576, "lwf_kd": 0.32080442, "total": 36.569016],
            ], weights: "7249b83469acb32c5b0eac2a294761718cbf0c4aa5eec14921df1de8f3fc74ba"),
        "mib": Pin(
            losses: [
                ["ce": 0.9321858, "kd": 0.49254447, "total": 5.8576303],
                ["ce": 0.6629534, "kd": 0.4857133, "total": 5.5200863],
            ], weights: "2fb5f6b2b95829ee93622f7a70cce3c0817683c662a8391b9826d933d8be0dc6"),
        "plop": Pin(
            losses: [
                ["ce": 0.40026346, "pod": 66.18652, "total": 1.0621287],
                ["ce": 0.1430091, "pod": 68.73338, "total": 0.8303429],
            ], weights: "f436494793a117f81a074fd2049932327c481a8a7697a0f1c13857622790d23f"),
        "gsc": Pin(
            losses: [
                ["ce": 5.012458, "rel": 0.072580844, "sharp": 0.0, "soft": 5.051034, "total": 6.293361],
                ["ce": 3.4867153, "rel": 0.061568283, "sharp": 0.0, "soft": 4.476532, "total": 4.6212406],
            ], weights: "b103b16e1c26901730798b42510fddb3f34b2f83dd3e01e55c1431e624e6c1de"),
        "hrhf": Pin(
            losses: [
                ["ce": 0.87985265, "fake_ce": 0.1378115, "fake_kd": 0.4391546, "kd": 0.39957422, "total": 9.404953],
                ["ce": 0.37493905, "fake_ce": 0.7608438, "fake_kd": 0.3214666, "kd": 0.4825494, "total": 9.175942],
            ], weights: "3e45349a70433a580215a5a99f15ff29a4d12cd9fe1a52c8c9d0e18cae8b70e3"),
        "hrhf+gsc": Pin(
            losses: [
                [
                    "ce": 4.8274846, "fake_ce": 0.15848704, "fake_kd": 0.4391546, "kd": 0.39957422, "rel": 0.06886264,
                    "sharp": 0.0, "soft": 4.1132164, "total": 14.41878,
                ],
                [
                    "ce": 4.108199, "fake_ce": 0.6640134, "fake_kd": 0.34313014, "kd": 0.40052068, "rel": 0.0563872,
                    "sharp": 0.0, "soft": 3.5562994, "total": 13.111894,
                ],
            ], weights: "a7e5beafcb815e5468f6ce702bac02d5df7d7276d5c0a4079aa21f484e45fd0d"),
        "joint": Pin(
            losses: [
                ["ce": 6.6249657, "total": 6.6249657], ["ce": 3.7512896, "total": 3.7512896],
            ], weights: "80f293f89da753612b61d4585c4230226b86d95d56efe6423bad89add70ba966"),
        "hrhf+gsc feature, plain fake background, sharp 0.4": Pin(
            losses: [
                [
                    "ce": 4.8274846, "fake_ce": 0.15848704, "fake_feat": 0.68732196, "fake_kd": 0.4391546,
                    "kd": 0.39957422, "rel": 0.06886264, "sharp": 0.32821745, "soft": 4.1132164, "total": 14.769006,
                ],
                [
                    "ce": 4.3523474, "fake_ce": 0.74420863, "fake_feat": 0.45405257, "fake_kd": 0.34635887,
                    "kd": 0.4001103, "rel": 0.058872532, "sharp": 0.6084166, "soft": 3.5369184, "total": 13.699389,
                ],
            ], weights: "6983b6e60f9b8a240979ca9f72c7a55a947c62a11692e4412f3c030226c227cb"),
        "hrhf pseudo, plain KD": Pin(
            losses: [
                [
                    "ce": 0.41408393, "fake_ce": 0.1378115, "fake_kd": 0.4391546, "kd": 0.39957422,
                    "lwf_kd": 0.39429832, "total": 9.72778,
                ],
                [
                    "ce": 0.16304977, "fake_ce": 0.681834, "fake_kd": 0.34724602, "kd": 0.46600166,
                    "lwf_kd": 0.45807272, "total": 9.893505,
                ],
            ], weights: "f46f281ba49a62b9a136bece53e3e7ff321ed48081dd37fbaf689bef88340c3d"),
    ]

    func testEveryMethodIsPinnedBitwise() throws {
        // The tiny teacher's classifier scaled up, so that it is confident on some pixels and the
        // thresholded terms (pseudo-labels, re-labelling, confident fake labels, sharpness) act.
        let (_, model, card) = try SynthesisTests.tinyTeacher()
        for t in [model.classifiers[0].weight, model.classifiers[0].bias!] {
            for i in 0..<t.count { t.pointer[i] *= 12 }
        }
        let teacher = temporaryDirectory().appendingPathComponent("confident-teacher.safetensors")
        try ModelFile.save(model, card: card, to: teacher)
        let pack = temporaryDirectory().appendingPathComponent("p.tar")
        var o = SynthesisTests.smallOptions()
        o.resolution = 24
        _ = try SynthesisJob(
            teacherURL: teacher, model: model, card: card, classes: [1, 2, 3, 4, 5], count: 4,
            options: o, seed: 1, out: pack
        ).run(resume: false)
        for (name, options) in try Self.configurations() {
            let pin = try Self.pin(options, teacher: teacher, pack: pack)
            XCTAssertEqual(pin.losses.count, 2, name)
            XCTAssertEqual(pin, Self.expected[name], "\"\(name)\": \(pin),")
        }
    }
}
