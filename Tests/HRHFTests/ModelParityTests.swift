import XCTest

@testable import HRHF

/// Small DeepLabV3 models of both flavours against PyTorch's logits
/// (Fixtures/models, written by tools/gen_model_fixtures.py). The networks are built from
/// their descriptions and loaded from the fixtures' state dicts by key, unchanged: module
/// names equal the PyTorch state-dict keys. Tolerance: relative error 1e-4.
final class ModelParityTests: XCTestCase {
    static let tvSmall = ArchitectureDescription(
        name: "tv-small", flavor: .torchvision, block: .bottleneck,
        layers: [1, 1, 1, 1], baseWidth: 4, outputStride: 8, headChannels: 8,
        auxHead: true, classesPerStep: [5])
    static let tvBasic = ArchitectureDescription(
        name: "tv-basic", flavor: .torchvision, block: .basic,
        layers: [1, 1, 1, 1], baseWidth: 8, outputStride: 8, headChannels: 8,
        classesPerStep: [4])
    static let mibSmall = ArchitectureDescription(
        name: "mib-small", flavor: .mib, block: .bottleneck,
        layers: [1, 1, 2, 1], baseWidth: 4, outputStride: 16, headChannels: 8,
        classesPerStep: [4, 2])

    func check(_ name: String, _ arch: ArchitectureDescription) throws {
        let model = try DeepLabV3(arch)
        let weights = try Fixtures.file("models/\(name).safetensors")
        try model.loadStateDict(
            Dictionary(uniqueKeysWithValues: weights.tensors.map { ($0.name, $0.tensor) }),
            source: name)
        model.eval()
        let reference = try Fixtures.file("models/\(name)_logits.safetensors")
        let out = withNoGrad { model.run(reference["input"]!) }
        XCTAssertEqual(out.logits.shape, reference["logits"]!.shape)
        assertClose(out.logits, reference["logits"]!, "\(name) logits")
        if let aux = reference["aux"] { assertClose(out.auxLogits, aux, "\(name) aux logits") }
        XCTAssertEqual(out.features.shape[1], arch.headChannels)
        // Evaluation folds each batch norm into the convolution before it (conv2dAffine); with a
        // statistics recorder attached the layers run one by one. Both match PyTorch, and the
        // input gradients of the two paths (frozen weights, as in inversion) agree.
        model.setRequiresGrad(false)
        var inputGradients: [Tensor] = []
        for unfused in [false, true] {
            let recorder = unfused ? BatchNormStatisticsRecorder(attachingTo: model) : nil
            let x = reference["input"]!.detached()
            x.requiresGrad = true
            let logits = model.run(x).logits
            assertClose(logits, reference["logits"]!, "\(name) logits, \(unfused ? "layers in turn" : "fused")")
            sum(logits * logits).backward()
            inputGradients.append(x.grad!)
            recorder?.detach()
        }
        assertClose(inputGradients[0], inputGradients[1], "\(name) input gradient, fused vs layers in turn")
    }

    func testTorchvisionBottleneckWithAuxHead() throws { try check("tv_small", Self.tvSmall) }
    func testTorchvisionBasicBlockSmallVariant() throws { try check("tv_basic", Self.tvBasic) }
    func testMiBFlavourWithTwoClassifierSteps() throws { try check("mib_small", Self.mibSmall) }
}
