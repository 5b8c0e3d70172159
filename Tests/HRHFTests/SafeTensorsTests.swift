import XCTest

@testable import HRHF

final class SafeTensorsTests: XCTestCase {
    /// Builds a safetensors file by hand from a header dictionary and raw data bytes.
    func handMade(_ header: [String: Any], _ payload: [UInt8]) -> Data {
        let json = try! JSONSerialization.data(withJSONObject: header, options: [.sortedKeys])
        var data = Data()
        withUnsafeBytes(of: UInt64(json.count).littleEndian) { data.append(contentsOf: $0) }
        data.append(json)
        data.append(contentsOf: payload)
        return data
    }

    func testRoundTripIsExactAndDeterministic() throws {
        let dir = temporaryDirectory()
        let a = randn([2, 3], seed: 1), b = randn([4], seed: 2)
        let file = SafeTensorsFile(
            tensors: [("a.weight", a), ("b", b), ("scalar", Tensor(scalar: 7))],
            metadata: ["card": "{\"x\":1}"])
        let url = dir.appendingPathComponent("m.safetensors")
        try file.write(to: url)
        XCTAssertFalse(FileManager.default.fileExists(atPath: url.path + ".partial"))
        let back = try SafeTensorsFile.read(url)
        XCTAssertEqual(back["a.weight"]?.array, a.array)
        XCTAssertEqual(back["a.weight"]?.shape, [2, 3])
        XCTAssertEqual(back["b"]?.array, b.array)
        XCTAssertEqual(back["scalar"]?.shape, [])
        XCTAssertEqual(back.metadata["card"], "{\"x\":1}")
        XCTAssertEqual(try file.serialized(), try back.serialized())
        let bytes = try Data(contentsOf: url)
        let headerLength = bytes.withUnsafeBytes { $0.loadUnaligned(as: UInt64.self) }
        XCTAssertEqual(headerLength % 8, 0, "header padded to 8 bytes")
    }

    func testConvertsOtherDTypesToFloat32() throws {
        // F16 1.5 = 0x3E00, -2 = 0xC000; BF16 3.0 = 0x4040; F64 0.25; I64 5.
        let payload: [UInt8] =
            [0x00, 0x3E, 0x00, 0xC0, 0x40, 0x40]
            + Array(withUnsafeBytes(of: Double(0.25).bitPattern.littleEndian) { Array($0) })
            + Array(withUnsafeBytes(of: Int64(5).littleEndian) { Array($0) })
        let data = handMade(
            [
                "h": ["dtype": "F16", "shape": [2], "data_offsets": [0, 4]],
                "b": ["dtype": "BF16", "shape": [1], "data_offsets": [4, 6]],
                "d": ["dtype": "F64", "shape": [], "data_offsets": [6, 14]],
                "n": ["dtype": "I64", "shape": [], "data_offsets": [14, 22]],
            ], payload)
        let f = try SafeTensorsFile.parse(data, file: "x.safetensors")
        XCTAssertEqual(f["h"]?.array, [1.5, -2])
        XCTAssertEqual(f["b"]?.array, [3])
        XCTAssertEqual(f["d"]?.array, [0.25])
        XCTAssertEqual(f["n"]?.array, [5])
        XCTAssertEqual(Float(halfBits: 0x0001), Float(sign: .plus, exponent: -24, significand: 1), "subnormal")
        XCTAssertEqual(Float(halfBits: 0x7C00), .infinity)
    }

    func assertRejected(_ data: Data, _ expected: String, file: StaticString = #filePath, line: UInt = #line) {
        XCTAssertThrowsError(try SafeTensorsFile.parse(data, file: "bad.safetensors"), file: file, line: line) {
            error in
            let text = "\(error)"
            XCTAssertTrue(text.hasPrefix("bad.safetensors") && text.contains(expected), text, file: file, line: line)
        }
    }

    func testRejectsMalformedFiles() {
        assertRejected(Data([1, 2, 3]), "too short")
        var huge = Data()
        withUnsafeBytes(of: UInt64(1 << 40).littleEndian) { huge.append(contentsOf: $0) }
        assertRejected(huge, "exceeds the file")
        assertRejected(
            handMade(["w": ["dtype": "F32", "shape": [2], "data_offsets": [0, 8]]], [0, 0, 0, 0]),
            "outside the data section")
        assertRejected(
            handMade(["w": ["dtype": "F32", "shape": [3], "data_offsets": [0, 8]]], Array(repeating: 0, count: 8)),
            "w: holds 8 bytes")
        assertRejected(
            handMade(["w": ["dtype": "C64", "shape": [1], "data_offsets": [0, 8]]], Array(repeating: 0, count: 8)),
            "w: unsupported dtype C64")
        assertRejected(
            handMade(
                [
                    "a": ["dtype": "F32", "shape": [2], "data_offsets": [0, 8]],
                    "b": ["dtype": "F32", "shape": [1], "data_offsets": [4, 8]],
                ], Array(repeating: 0, count: 8)),
            "b: data overlaps that of a")
        assertRejected(
            handMade(["w": ["dtype": "F32", "shape": [-1], "data_offsets": [0, 4]]], [0, 0, 0, 0]),
            "non-negative")
        var notJSON = Data()
        withUnsafeBytes(of: UInt64(3).littleEndian) { notJSON.append(contentsOf: $0) }
        notJSON.append(contentsOf: Array("abc".utf8))
        assertRejected(notJSON, "not a JSON object")
    }
}
