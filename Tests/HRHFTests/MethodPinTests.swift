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
                ["ce": 7.360281, "total": 7.360281],
                ["ce": 5.9072657, "total": 5.9072657],
            ],
            weights: "3d79f58f1cf08c62542d04c096f3e82e709e08d007b21e0bcb016692e78456b4"),
        "lwf": Pin(
            losses: [
                ["ce": 7.360281, "lwf_kd": 0.48117673, "total": 12.172049],
                ["ce": 6.8146067, "lwf_kd": 0.44543993, "total": 11.269006],
            ],
            weights: "0510d688c4a8886aea3fd9e28a80eb251f186c88d138d78993c897b8fc5a3a32"),
        "mib": Pin(
            losses: [
                ["ce": 0.9321858, "kd": 0.49254447, "total": 5.8576303],
                ["ce": 0.6629534, "kd": 0.4857133, "total": 5.5200863],
            ],
            weights: "2fb5f6b2b95829ee93622f7a70cce3c0817683c662a8391b9826d933d8be0dc6"),
        "plop": Pin(
            losses: [
                ["ce": 5.0905952, "lwf_kd": 0.48117673, "total": 9.902363],
                ["ce": 5.967899, "lwf_kd": 0.45430464, "total": 10.510945],
            ],
            weights: "80e289131e7ea30e067e8f685db322b870c17436e090564f4e3d3585f9f96e14"),
        "gsc": Pin(
            losses: [
                [
                    "ce": 5.012458, "kd": 0.49254447, "rel": 0.072580844, "sharp": 0.0, "soft": 5.051034,
                    "total": 11.218806,
                ],
                [
                    "ce": 5.083302, "kd": 0.44680348, "rel": 0.06019283, "sharp": 0.0, "soft": 4.1384106,
                    "total": 10.600987,
                ],
            ],
            weights: "4efc087737a58a89825700d12cf4815084ba0b50a0beec610bd760b385e4cc20"),
        "hrhf": Pin(
            losses: [
                ["ce": 0.87985265, "fake_ce": 0.1378115, "fake_kd": 0.4391546, "kd": 0.39957422, "total": 9.404953],
                ["ce": 0.37493905, "fake_ce": 0.7608438, "fake_kd": 0.3214666, "kd": 0.4825494, "total": 9.175942],
            ],
            weights: "3e45349a70433a580215a5a99f15ff29a4d12cd9fe1a52c8c9d0e18cae8b70e3"),
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
            ],
            weights: "a7e5beafcb815e5468f6ce702bac02d5df7d7276d5c0a4079aa21f484e45fd0d"),
        "joint": Pin(
            losses: [
                ["ce": 7.704019, "total": 7.704019],
                ["ce": 5.125745, "total": 5.125745],
            ],
            weights: "dadbfe3180424a13ca7d210a0e7fd6f243f9dd60312676d8ee77f43cc76a15a2"),
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
            ],
            weights: "6983b6e60f9b8a240979ca9f72c7a55a947c62a11692e4412f3c030226c227cb"),
        "hrhf pseudo, plain KD": Pin(
            losses: [
                [
                    "ce": 4.876656, "fake_ce": 0.1378115, "fake_kd": 0.4391546, "kd": 0.39957422, "lwf_kd": 0.39429832,
                    "total": 14.190353,
                ],
                [
                    "ce": 4.0610924, "fake_ce": 0.4247643, "fake_kd": 0.3593406, "kd": 0.43373412, "lwf_kd": 0.41504794,
                    "total": 13.2467,
                ],
            ],
            weights: "abc062a84118fb2e7c072697e41b25a62f20b644ac9ecc4cc4236ebd14fd193e"),
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
