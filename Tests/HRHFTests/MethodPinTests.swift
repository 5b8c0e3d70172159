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
                ["ce": 6.6464562, "total": 6.6464562], ["ce": 4.602085, "total": 4.602085],
            ], weights: "bf181d598bc45ca824ac59123c67289ac7d2e2986303d7182acc5a503b340202"),
        "lwf": Pin(
            losses: [
                ["ce": 6.6464562, "lwf_kd": 0.4925445, "total": 55.90091],
                ["ce": 4.4885545, "lwf_kd": 0.32080737, "total": 36.569294],
            ], weights: "f309a7cb00302635d479acc354ef5a511d5cd3706736f5282c1435dcbd091b6c"),
        "mib": Pin(
            losses: [
                ["ce": 0.93218523, "kd": 0.4925445, "total": 5.8576303],
                ["ce": 0.66295195, "kd": 0.4857132, "total": 5.520084],
            ],
            weights: "f30e83e44b8f8eb18967f92c691460ba383527a75bac7f9e31151d357aabb9ad"),
        "plop": Pin(
            losses: [
                ["ce": 0.40026328, "pod": 66.18653, "total": 1.0621285],
                ["ce": 0.1430099, "pod": 68.73341, "total": 0.830344],
            ], weights: "5a0aae0620d689cdec6048a8a91c58e2a8939834dde5218c98009f13a350659f"),
        "gsc": Pin(
            losses: [
                ["ce": 5.012454, "rel": 0.072580814, "sharp": 0.0, "soft": 5.0510335, "total": 6.2933574],
                ["ce": 3.486653, "rel": 0.061567914, "sharp": 0.0, "soft": 4.4765363, "total": 4.621179],
            ], weights: "5df4ae1b5a6d4f45137ed76770340306cc9cfefd8ddb009e78e6cb4baf5a81ea"),
        "hrhf": Pin(
            losses: [
                ["ce": 0.87985265, "fake_ce": 0.13781178, "fake_kd": 0.4391548, "kd": 0.39957416, "total": 9.404954],
                ["ce": 0.37493935, "fake_ce": 0.760847, "fake_kd": 0.32146662, "kd": 0.48254868, "total": 9.17594],
            ],
            weights: "d8c150e85b4df791fc6728dab1e4c8f685a309d4d0a7fa6182d6512a6674399e"),
        "hrhf+gsc": Pin(
            losses: [
                [
                    "ce": 4.827484, "fake_ce": 0.15848738, "fake_kd": 0.4391548, "kd": 0.39957416, "rel": 0.068862624,
                    "sharp": 0.0, "soft": 4.113217, "total": 14.418781,
                ],
                [
                    "ce": 4.108208, "fake_ce": 0.6640069, "fake_kd": 0.34313056, "kd": 0.40052044, "rel": 0.05638741,
                    "sharp": 0.0, "soft": 3.5563016, "total": 13.111898,
                ],
            ],
            weights: "340005d93bba552ed9b26a0d2d3afb684f93a36a00da1097493c2197d1dcf741"),
        "joint": Pin(
            losses: [
                ["ce": 6.6249666, "total": 6.6249666], ["ce": 3.751294, "total": 3.751294],
            ], weights: "14be42a6451d606852e6fa33360de022ab5505725549858f89372864c6d5077e"),
        "hrhf+gsc feature, plain fake background, sharp 0.4": Pin(
            losses: [
                [
                    "ce": 4.827484, "fake_ce": 0.15848738, "fake_feat": 0.6873218, "fake_kd": 0.4391548,
                    "kd": 0.39957416,
                    "rel": 0.068862624, "sharp": 0.3282175, "soft": 4.113217, "total": 14.769007,
                ],
                [
                    "ce": 4.352339, "fake_ce": 0.74420357, "fake_feat": 0.4540536, "fake_kd": 0.3463592, "kd": 0.40011,
                    "rel": 0.05887265, "sharp": 0.6084163, "soft": 3.536919, "total": 13.699378,
                ],
            ],
            weights: "02b436ba0bfcc87e6b251e5742d8879e5c0f5225c6c70dc12ca24dc80a601358"),
        "hrhf pseudo, plain KD": Pin(
            losses: [
                [
                    "ce": 0.41408387, "fake_ce": 0.13781178, "fake_kd": 0.4391548, "kd": 0.39957416,
                    "lwf_kd": 0.39429823, "total": 9.727781,
                ],
                [
                    "ce": 0.16305006, "fake_ce": 0.6818265, "fake_kd": 0.3472461, "kd": 0.46600056,
                    "lwf_kd": 0.45807153, "total": 9.893486,
                ],
            ], weights: "866ce46268143c0b659334fa5153c468ee34a26b4b5cdc8052583d43e974abff"),
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
