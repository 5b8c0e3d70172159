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
            losses: [["ce": 6.646457, "total": 6.646457], ["ce": 4.6020274, "total": 4.6020274]],
            weights: "c4a0a8789eebd50b5b849bcd75ba38b083bb26523b0e83a59d6fe3627bd7e402"),
        "lwf": Pin(
            losses: [
                ["ce": 6.646457, "lwf_kd": 0.49254447, "total": 55.900906],
                ["ce": 4.4885726, "lwf_kd": 0.32080457, "total": 36.569027],
            ], weights: "33e929984d4a5fb6a68f669cebd19c7fc72920ad36abd135e4e8dc23b3f79977"),
        "mib": Pin(
            losses: [
                ["ce": 0.9321858, "kd": 0.49254447, "total": 5.8576303],
                ["ce": 0.6629532, "kd": 0.48571333, "total": 5.520087],
            ], weights: "77200e2895b03aa43ffcc55be8df9d025038137164664e7ff4d8e8937f7024c1"),
        "plop": Pin(
            losses: [
                ["ce": 0.40026346, "pod": 66.18652, "total": 1.0621287],
                ["ce": 0.14300914, "pod": 68.73339, "total": 0.830343],
            ], weights: "3b45fceb8cf34646213b7905b28814735d9c095ea12969e2926bbd44799a5060"),
        "gsc": Pin(
            losses: [
                ["ce": 5.012458, "rel": 0.072580844, "sharp": 0.0, "soft": 5.051034, "total": 6.293361],
                ["ce": 3.4867146, "rel": 0.061568283, "sharp": 0.0, "soft": 4.4765325, "total": 4.62124],
            ], weights: "e96bcde117cf39a69c62d32014e344aa1589a54f7a239b36f3b2eb2fbede8e90"),
        "hrhf": Pin(
            losses: [
                ["ce": 0.78900427, "fake_ce": 0.56710994, "fake_kd": 0.47695485, "kd": 0.4130956, "total": 10.2566185],
                ["ce": 0.34664327, "fake_ce": 0.4399081, "fake_kd": 0.43931356, "kd": 0.3359857, "total": 8.539543],
            ], weights: "9d2a8b7f48f7f60a8c0d4ccff693ea8417ebf79501dbd1f060531a6e0b186d00"),
        "hrhf+gsc": Pin(
            losses: [
                [
                    "ce": 4.254595, "fake_ce": 0.6942531, "fake_kd": 0.47695485, "kd": 0.4130956, "rel": 0.07018101,
                    "sharp": 0.0, "soft": 4.5490556, "total": 15.004162,
                ],
                [
                    "ce": 4.369272, "fake_ce": 1.7460946, "fake_kd": 0.40216666, "kd": 0.4919129, "rel": 0.04835048,
                    "sharp": 0.0, "soft": 4.157107, "total": 16.107525,
                ],
            ], weights: "8396de682466e3e7133fb6a8b0804bde43192de00ceb298156771e969932907b"),
        "joint": Pin(
            losses: [["ce": 6.6249657, "total": 6.6249657], ["ce": 3.7512906, "total": 3.7512906]],
            weights: "8fe7ea3eec2d533016ff1dcb748f8c1f4358cf0f84aeddb773d6180a887a1e92"),
        "hrhf+gsc feature, plain fake background, sharp 0.4": Pin(
            losses: [
                [
                    "ce": 4.254595, "fake_ce": 0.6942531, "fake_feat": 0.6856124, "fake_kd": 0.47695485,
                    "kd": 0.4130956, "rel": 0.07018101, "sharp": 0.3064068, "soft": 4.5490556, "total": 15.353096,
                ],
                [
                    "ce": 5.0872145, "fake_ce": 1.8400217, "fake_feat": 0.38275284, "fake_kd": 0.38379928,
                    "kd": 0.5146672, "rel": 0.044398557, "sharp": 0.5255387, "soft": 4.2027225, "total": 17.175568,
                ],
            ], weights: "948d75856ffd1a16313bbedd945accc0a2ca8dc7c6b044653e66946cb2dc70a1"),
        "hrhf pseudo, plain KD": Pin(
            losses: [
                [
                    "ce": 0.33246282, "fake_ce": 0.56710994, "fake_kd": 0.47695485, "kd": 0.4130956,
                    "lwf_kd": 0.40496308, "total": 10.6100025,
                ],
                [
                    "ce": 0.1075387, "fake_ce": 0.43836808, "fake_kd": 0.4497511, "kd": 0.30838045,
                    "lwf_kd": 0.31168142, "total": 8.750586,
                ],
            ], weights: "eae5d609119e66feffe90c26890218e2e6458f48ce4656aaecb5e579600e6e65"),
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
