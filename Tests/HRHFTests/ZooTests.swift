import XCTest

@testable import HRHF

final class ZooTests: XCTestCase {
    static let zoo = Fixtures.directory.deletingLastPathComponent().deletingLastPathComponent()
        .deletingLastPathComponent()
        .appendingPathComponent("zoo")

    func testCommittedCardsEqualTheBuiltInPresets() throws {
        for (path, data) in try zooCards() {
            let committed = try Data(contentsOf: Self.zoo.appendingPathComponent(path))
            XCTAssertEqual(committed, data, "zoo/\(path) is stale: run hrhf-convert --write-cards zoo")
        }
    }

    func testArchitectureCardsResolveAsArchOptions() throws {
        let card = Self.zoo.appendingPathComponent("archs/deeplabv3-resnet101-mib.json").path
        let arch = try ArchitectureDescription.resolve(card)
        XCTAssertEqual(arch, ArchitectureDescription.preset("deeplabv3-resnet101-mib"))
        XCTAssertEqual(arch.asppRates, [6, 12, 18])
        XCTAssertEqual(ArchitectureDescription.preset("deeplabv3-resnet101-mib-os8")?.asppRates, [12, 24, 32])
        XCTAssertEqual(ArchitectureDescription.preset("deeplabv3-resnet50")?.asppRates, [12, 24, 36])
        XCTAssertThrowsError(try ArchitectureDescription.resolve("no-such-arch")) { e in
            XCTAssertTrue("\(e)".contains("--list-archs"), "\(e)")
        }
    }

    func testClassListsHaveTheDatasetsSizes() {
        XCTAssertEqual(DatasetClasses.voc.count, 21)
        XCTAssertEqual(DatasetClasses.ade.count, 151)
        XCTAssertEqual(Set(DatasetClasses.ade).count, 151, "150 distinct names plus background")
        XCTAssertEqual(DatasetClasses.cityscapes.count, 19)
        XCTAssertEqual(DatasetClasses.shapes.count, 21)
        XCTAssertEqual(DatasetClasses.resolve("cat, dog ,bird"), ["cat", "dog", "bird"])
    }

    func testFullSizeArchitecturesHaveTorchvisionsParameterCounts() throws {
        // torchvision's deeplabv3_resnet50(num_classes=21, aux_loss=False) has 39,638,869
        // parameters; deeplabv3_resnet101: 58,630,997 (counted with torchvision 0.29).
        var r50 = ArchitectureDescription.preset("deeplabv3-resnet50")!
        r50.classesPerStep = [21]
        XCTAssertEqual(try DeepLabV3(r50).parameterCount, 39_638_869)
        var r101 = ArchitectureDescription.preset("deeplabv3-resnet101")!
        r101.classesPerStep = [21]
        XCTAssertEqual(try DeepLabV3(r101).parameterCount, 58_630_997)
    }
}
