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

    /// The methods' presets, the pack-for-prototypes-only ablation and two variants that reach the
    /// remaining loss branches.
    static func configurations() throws -> [(name: String, options: DistillationOptions)] {
        var featurePlain = try DistillationOptions.preset("hrhf+gsc")
        featurePlain.method.setWeight(.feat, on: .fake, 0.5)
        featurePlain.fakeFoldsNewClasses = false
        featurePlain.sharpConfidence = 0.4
        var pseudoKD = try DistillationOptions.preset("hrhf")
        pseudoKD.method.background = .pseudo
        pseudoKD.method.setWeight(.lwfKD, on: .real, 2)
        let presets = try ["ft", "lwf", "mib", "plop", "gsc", "hrhf", "hrhf+gsc", "joint", "hrhf+gsc-no-fake"].map {
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
            weights: "efdddddfec6f0f3a69bc1a52357b0aa1503711b8bd59472e8aaa9394e02ae772"),
        "lwf": Pin(
            losses: [
                ["ce": 6.646457, "lwf_kd": 0.49254447, "total": 55.900906],
                ["ce": 4.4885726, "lwf_kd": 0.32080457, "total": 36.569027],
            ], weights: "33e929984d4a5fb6a68f669cebd19c7fc72920ad36abd135e4e8dc23b3f79977"),
        "mib": Pin(
            losses: [
                ["ce": 0.9321858, "kd": 0.49254447, "total": 5.8576303],
                ["ce": 0.66295356, "kd": 0.4857133, "total": 5.5200863],
            ], weights: "5e92a3b75793fc059c264e9aa6f646e3abc1fddcb73fd0bf2f3531e002ce9734"),
        "plop": Pin(
            losses: [
                ["ce": 0.40026346, "pod": 66.18652, "total": 1.0621287],
                ["ce": 0.14300914, "pod": 68.73339, "total": 0.830343],
            ], weights: "3b45fceb8cf34646213b7905b28814735d9c095ea12969e2926bbd44799a5060"),
        "gsc": Pin(
            losses: [
                ["ce": 5.012458, "rel": 0.072580844, "sharp": 0.0, "soft": 5.051034, "total": 6.293361],
                ["ce": 3.4867156, "rel": 0.06156827, "sharp": 0.0, "soft": 4.4765325, "total": 4.621241],
            ], weights: "dd7036abf649bc4b0016ecdef795d431acfeb1a8a19ae473459a83efea27e632"),
        "hrhf": Pin(
            losses: [
                ["ce": 0.78900427, "fake_ce": 0.56710994, "fake_kd": 0.47695485, "kd": 0.4130956, "total": 10.2566185],
                ["ce": 0.34664342, "fake_ce": 0.43990812, "fake_kd": 0.43931368, "kd": 0.33598572, "total": 8.539545],
            ], weights: "b74495fff40ad96d41cc1b783c89bc0989f02592f9b0685012fce49660fd5e0d"),
        "hrhf+gsc": Pin(
            losses: [
                [
                    "ce": 4.254595, "fake_ce": 0.6942531, "fake_kd": 0.47695485, "kd": 0.4130956, "rel": 0.07018101,
                    "sharp": 0.0, "soft": 4.5490556, "total": 15.004162,
                ],
                [
                    "ce": 4.3692718, "fake_ce": 1.7460927, "fake_kd": 0.40216658, "kd": 0.49191284, "rel": 0.048350543,
                    "sharp": 0.0, "soft": 4.157106, "total": 16.107523,
                ],
            ], weights: "aaa3105e2d8ae7c370b88186d26188212fc3a36a5150fc4e1fcd286499d575ca"),
        "joint": Pin(
            losses: [["ce": 6.6249657, "total": 6.6249657], ["ce": 3.7512906, "total": 3.7512906]],
            weights: "4f0c8e79348f996b7ef416a1b99185dcd2fe25f428483ad3daf28e87540bb351"),
        "hrhf+gsc feature, plain fake background, sharp 0.4": Pin(
            losses: [
                [
                    "ce": 4.254595, "fake_ce": 0.6942531, "fake_feat": 0.6856124, "fake_kd": 0.47695485,
                    "kd": 0.4130956, "rel": 0.07018101, "sharp": 0.30640683, "soft": 4.5490556, "total": 15.353096,
                ],
                [
                    "ce": 5.0872083, "fake_ce": 1.840018, "fake_feat": 0.38275325, "fake_kd": 0.3837994,
                    "kd": 0.5146669, "rel": 0.044398665, "sharp": 0.52553815, "soft": 4.2027216, "total": 17.175556,
                ],
            ], weights: "87e0a027e85f92a88552e6efeaeb42067d4ebec4e7ea9e52c38586708b67fc2a"),
        // Without fake images the real half is the whole batch: its cross-entropy, KD and GSC
        // terms all read one logits tensor (pinned before they were fused, at 91dbc29).
        "hrhf+gsc-no-fake": Pin(
            losses: [
                [
                    "ce": 5.012458, "kd": 0.49254447, "rel": 0.072580844, "sharp": 0.0, "soft": 5.051034,
                    "total": 11.218806,
                ],
                [
                    "ce": 5.083296, "kd": 0.44680348, "rel": 0.060192794, "sharp": 0.0, "soft": 4.1384106,
                    "total": 10.600982,
                ],
            ], weights: "c37a2b035afe36a586462fa90775d41febfc2c568dcc3ec0389dd14bf9743ea0"),
        "hrhf pseudo, plain KD": Pin(
            losses: [
                [
                    "ce": 0.33246282, "fake_ce": 0.56710994, "fake_kd": 0.47695485, "kd": 0.4130956,
                    "lwf_kd": 0.40496308, "total": 10.6100025,
                ],
                [
                    "ce": 0.10753866, "fake_ce": 0.43836784, "fake_kd": 0.4497511, "kd": 0.30838045,
                    "lwf_kd": 0.31168142, "total": 8.750585,
                ],
            ], weights: "f2b3ca97eca65b041939b160208432fe1d5cb4eb45702de96ba6170606042524"),
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
