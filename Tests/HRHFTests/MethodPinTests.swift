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
                ["ce": 0.78900427, "fake_ce": 0.56710994, "fake_kd": 0.47695485, "kd": 0.4130956, "total": 10.2566185],
                ["ce": 0.34664354, "fake_ce": 0.4399082, "fake_kd": 0.43931362, "kd": 0.3359857, "total": 8.539545],
            ], weights: "48512ef4261b153d3231a24f052d87b3b2d8c9ae7cb56ce8894112dfe6071bd8"),
        "hrhf+gsc": Pin(
            losses: [
                [
                    "ce": 4.254595, "fake_ce": 0.6942531, "fake_kd": 0.47695485, "kd": 0.4130956, "rel": 0.07018101,
                    "sharp": 0.0, "soft": 4.5490556, "total": 15.004162,
                ],
                [
                    "ce": 4.3692718, "fake_ce": 1.7460927, "fake_kd": 0.4021667, "kd": 0.49191275, "rel": 0.048350513,
                    "sharp": 0.0, "soft": 4.157106, "total": 16.107521,
                ],
            ], weights: "4980f5e054a4cbb5580b53a2c1502156936d926e3259c0db68d6a1e069c2d277"),
        "joint": Pin(
            losses: [
                ["ce": 6.6249657, "total": 6.6249657], ["ce": 3.7512896, "total": 3.7512896],
            ], weights: "80f293f89da753612b61d4585c4230226b86d95d56efe6423bad89add70ba966"),
        "hrhf+gsc feature, plain fake background, sharp 0.4": Pin(
            losses: [
                [
                    "ce": 4.254595, "fake_ce": 0.6942531, "fake_feat": 0.6856124, "fake_kd": 0.47695485,
                    "kd": 0.4130956, "rel": 0.07018101, "sharp": 0.3064068, "soft": 4.5490556, "total": 15.353096,
                ],
                [
                    "ce": 5.087206, "fake_ce": 1.8400164, "fake_feat": 0.38275325, "fake_kd": 0.38379928,
                    "kd": 0.5146668, "rel": 0.044398677, "sharp": 0.52553797, "soft": 4.2027197, "total": 17.175549,
                ],
            ], weights: "b11be15e2b6497326645903d7b83634d523f3ad6f7c7424c4ae7b6a31fc58314"),
        "hrhf pseudo, plain KD": Pin(
            losses: [
                [
                    "ce": 0.33246282, "fake_ce": 0.56710994, "fake_kd": 0.47695485, "kd": 0.4130956,
                    "lwf_kd": 0.40496308, "total": 10.6100025,
                ],
                [
                    "ce": 0.10753869, "fake_ce": 0.4383675, "fake_kd": 0.44975105, "kd": 0.3083805, "lwf_kd": 0.3116815,
                    "total": 8.750585,
                ],
            ], weights: "c768743fe703e62aa1104122af9c91b37c663d4bbff3afd4386088f84f3473db"),
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
