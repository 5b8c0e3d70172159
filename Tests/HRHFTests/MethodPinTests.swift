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
            losses: [["ce": 6.646457, "total": 6.646457], ["ce": 4.6020255, "total": 4.6020255]],
            weights: "1b9e68ca96ce025d29b886da2722194f871d997a2827d885a9c3c942ea1c210c"),
        "lwf": Pin(
            losses: [
                ["ce": 6.646457, "lwf_kd": 0.49254447, "total": 55.900906],
                ["ce": 4.488576, "lwf_kd": 0.32080442, "total": 36.569016],
            ], weights: "7249b83469acb32c5b0eac2a294761718cbf0c4aa5eec14921df1de8f3fc74ba"),
        "mib": Pin(
            losses: [
                ["ce": 0.9321858, "kd": 0.49254447, "total": 5.8576303],
                ["ce": 0.6629533, "kd": 0.48571324, "total": 5.520086],
            ], weights: "122680f63da1c13296656f4a43af53ca23398369e5499a518c87e27b9b13c967"),
        "plop": Pin(
            losses: [
                ["ce": 0.40026346, "pod": 66.18652, "total": 1.0621287],
                ["ce": 0.1430091, "pod": 68.73338, "total": 0.8303429],
            ], weights: "f436494793a117f81a074fd2049932327c481a8a7697a0f1c13857622790d23f"),
        "gsc": Pin(
            losses: [
                ["ce": 5.012458, "rel": 0.072580844, "sharp": 0.0, "soft": 5.051034, "total": 6.293361],
                ["ce": 3.4867146, "rel": 0.06156829, "sharp": 0.0, "soft": 4.476532, "total": 4.6212397],
            ], weights: "c54e1039d93a0daec642ab4064aca1188d8bf7914010fe0f492fbb660efed17b"),
        "hrhf": Pin(
            losses: [
                ["ce": 0.78900427, "fake_ce": 0.56710994, "fake_kd": 0.47695485, "kd": 0.4130956, "total": 10.2566185],
                ["ce": 0.34664324, "fake_ce": 0.43990764, "fake_kd": 0.43931353, "kd": 0.3359858, "total": 8.539544],
            ], weights: "75e9183434054cfbc75cad82369ff7615f2e4a6c0f2e4900a96c07cc308f1b8b"),
        "hrhf+gsc": Pin(
            losses: [
                [
                    "ce": 4.254595, "fake_ce": 0.6942531, "fake_kd": 0.47695485, "kd": 0.4130956, "rel": 0.07018101,
                    "sharp": 0.0, "soft": 4.5490556, "total": 15.004162,
                ],
                [
                    "ce": 4.369274, "fake_ce": 1.7460934, "fake_kd": 0.40216655, "kd": 0.49191296, "rel": 0.048350506,
                    "sharp": 0.0, "soft": 4.157107, "total": 16.107527,
                ],
            ], weights: "9e613ff7afa3cf6e86f93f76900fdeb753e11a24030cbe2116004615b02373af"),
        "joint": Pin(
            losses: [["ce": 6.6249657, "total": 6.6249657], ["ce": 3.7512908, "total": 3.7512908]],
            weights: "cd2bbbd5f956d21a769e8e0f9530efb64e439404d8a2a0298cdaa83ed4120c40"),
        "hrhf+gsc feature, plain fake background, sharp 0.4": Pin(
            losses: [
                [
                    "ce": 4.254595, "fake_ce": 0.6942531, "fake_feat": 0.6856124, "fake_kd": 0.47695485,
                    "kd": 0.4130956, "rel": 0.07018101, "sharp": 0.30640683, "soft": 4.5490556, "total": 15.353096,
                ],
                [
                    "ce": 5.0872045, "fake_ce": 1.8400176, "fake_feat": 0.38275304, "fake_kd": 0.38379917,
                    "kd": 0.51466686, "rel": 0.044398613, "sharp": 0.5255385, "soft": 4.2027197, "total": 17.175549,
                ],
            ], weights: "bcfafaf8f5127c8b8808dae90495ad754b3fdc81d26c0c3b07d84f3891fabb85"),
        "hrhf pseudo, plain KD": Pin(
            losses: [
                [
                    "ce": 0.33246282, "fake_ce": 0.56710994, "fake_kd": 0.47695485, "kd": 0.4130956,
                    "lwf_kd": 0.40496308, "total": 10.6100025,
                ],
                [
                    "ce": 0.10753873, "fake_ce": 0.43836826, "fake_kd": 0.44975108, "kd": 0.3083805,
                    "lwf_kd": 0.3116815, "total": 8.750586,
                ],
            ], weights: "dc551256c260cc1a8569d89128d764a27943a93bdc2f30fe47749e581d355454"),
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
