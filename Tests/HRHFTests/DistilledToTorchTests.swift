import Foundation
import XCTest

@testable import HRHF

/// A model distilled by hrhf-distill (16 classes grown to 21), loaded by PyTorch with
/// `load_state_dict(strict=True)`: the Swift forward pass gives PyTorch's logits. The fixtures are
/// written by tools/check_models_to_torch.py --fixture.
final class DistilledToTorchTests: XCTestCase {
    func testDistilledModelGivesTorchsLogits() throws {
        let url = Fixtures.directory.appendingPathComponent("models/distilled_small.safetensors")
        let (model, card) = try ModelFile.load(url)
        XCTAssertEqual(card.architecture.classesPerStep, [16, 5])
        XCTAssertEqual(card.history.map(\.classes), [Array(0..<16), Array(16..<21)])
        XCTAssertEqual(try SafeTensorsFile.read(url)["classifier.4.weight"]?.shape, [21, 8, 1, 1])
        let reference = try Fixtures.file("models/distilled_small_logits.safetensors")
        let logits = withNoGrad { model.run(reference["input"]!).logits }
        XCTAssertEqual(logits.shape, [1, 21, 24, 32])
        assertClose(logits, reference["logits"]!, "distilled model's logits against PyTorch's")
    }
}
