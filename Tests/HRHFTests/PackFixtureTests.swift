import Foundation
import XCTest

@testable import HRHF

/// The packs hrhf-synth wrote into Fixtures/packs, which tools/test_hrhf_pack.py reads with the Python
/// reader: they must stay what today's Swift writer makes, or the spec, the schema and the fixtures move together.
final class PackFixtureTests: XCTestCase {
    static let packs = Fixtures.directory.appendingPathComponent("packs")
    static let teacher = ZooTests.zoo.appendingPathComponent("shapes-15-5-step0.safetensors")

    struct Expected {
        var name: String
        var shard: PackManifest.Shard?
        var indices: [Int]
        /// SHA-256 of the decoded RGB pixels and label values; tools/test_hrhf_pack.py asserts the same digests.
        var digests: [(image: String, label: String)]
    }

    static let expected = [
        Expected(
            name: "shapes-32px-2.tar", shard: nil, indices: [0, 1],
            digests: [
                (
                    "f4903cfc78a28b77a67f8e08dd7a3929817acb983c1285cd1f70333dd507b2c0",
                    "22d1f0f59540682ed30d93b7dd77dd80d4a07523eb3d87966a9e23e41c7ef8ca"
                ),
                (
                    "ec88a61cfa4a0241fee301e6f2af66c650f1196bf0bea7721b35254f33fb23b5",
                    "951ae15e65ffa8f17ab17c907dc7b205a7ce421c9399be2297f266ed6448200f"
                ),
            ]),
        Expected(
            name: "shapes-32px-shard-2of2.tar", shard: .init(index: 2, count: 2), indices: [1, 3],
            digests: [
                (
                    "99572119cad916e3c2e1834f6b3840a45ebf01e067d878c123a0532a5f259d85",
                    "c3d0c71bc4225f92caafbc6e366b19e66a70df4a32dddcf76bcad97a41785494"
                ),
                (
                    "bf00fadd20c526bae3df590dc77217b30ac02641eee718fada8fb9c468b83da5",
                    "aa216a2845ae584ce09cfeb5bb1c024b9773f52cb4248af08f8527a37b143209"
                ),
            ]),
    ]

    func testFixturePacksAreReadAndTheirManifestsValidate() throws {
        let teacherSHA = try sha256Hex(file: Self.teacher)
        for expected in Self.expected {
            let url = Self.packs.appendingPathComponent(expected.name)
            let pack = try SyntheticPack(url: url)
            let m = pack.manifest
            XCTAssertEqual(m.format, PackManifest.formatName)
            XCTAssertEqual(m.formatVersion, PackManifest.currentVersion)
            try m.teacher.card.validate(file: expected.name)
            try m.generator.options.validate()
            XCTAssertEqual(m.teacher.sha256, teacherSHA)
            XCTAssertEqual(m.shard, expected.shard)
            XCTAssertEqual(m.generator.count, expected.shard == nil ? 2 : 4)
            XCTAssertEqual(m.images.map(\.index), expected.indices)
            XCTAssertEqual(m.images.map(\.image), expected.indices.map { String(format: "images/%06d.png", $0) })
            let names = ["manifest.json", "SHA256SUMS"] + m.images.flatMap { [$0.image, $0.label] }
            XCTAssertEqual(Set(pack.files.keys), Set(names))
            // A field added to (or renamed in) the Swift structs changes these bytes: docs/pack-format.md,
            // docs/pack-manifest.schema.json and these fixtures must then change with it.
            XCTAssertEqual(try m.encoded(), pack.files["manifest.json"], "\(expected.name): manifest encodes otherwise")
            let copy = temporaryDirectory().appendingPathComponent(expected.name)
            defer { try? FileManager.default.removeItem(at: copy.deletingLastPathComponent()) }
            try SyntheticPack.write(
                manifest: m,
                files: { name in
                    guard let data = pack.files[name] else { throw PackError(file: url.path, entry: name, "absent") }
                    return data
                }, to: copy)
            XCTAssertEqual(
                try Data(contentsOf: copy), try Data(contentsOf: url),
                "\(expected.name): the writer's bytes changed")
            for (record, digest) in zip(m.images, expected.digests) {
                let image = try pack.image(record), label = try pack.label(record)
                XCTAssertEqual([image.width, image.height, label.width, label.height], [32, 32, 32, 32])
                XCTAssertEqual(sha256Hex(Data(image.pixels)), digest.image, record.image)
                let values = Data(label.values.map { UInt8(truncatingIfNeeded: $0) })
                XCTAssertEqual(sha256Hex(values), digest.label, record.label)
                XCTAssertTrue(label.values.allSatisfy { $0 < m.teacher.card.classes.count || $0 == 255 }, record.label)
            }
        }
    }
}
