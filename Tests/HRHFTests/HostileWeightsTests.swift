import CArchive
import XCTest

@testable import HRHF

/// Builds the pickles of PyTorch checkpoints opcode by opcode (protocol 2), so tests can write
/// hostile ones that torch itself would never produce.
struct PickleWriter {
    var bytes: [UInt8] = [0x80, 0x02]

    mutating func op(_ code: UInt8) { bytes.append(code) }

    mutating func littleEndian(_ value: UInt64, _ width: Int) {
        for i in 0..<width { bytes.append(UInt8(truncatingIfNeeded: value >> (8 * UInt64(i)))) }
    }

    mutating func string(_ s: String) {
        op(0x58) // BINUNICODE
        littleEndian(UInt64(s.utf8.count), 4)
        bytes += Array(s.utf8)
    }

    /// LONG1 with 8 bytes: any Int, negative ones included.
    mutating func int(_ v: Int) {
        op(0x8A)
        op(8)
        littleEndian(UInt64(bitPattern: Int64(v)), 8)
    }

    mutating func global(_ module: String, _ name: String) {
        op(0x63)
        bytes += Array("\(module)\n\(name)\n".utf8)
    }

    mutating func tuple(_ items: [Int]) {
        op(0x28)
        for item in items { int(item) }
        op(0x74)
    }

    /// A `_rebuild_tensor_v2` call on a float storage; `view` (offset, size) makes a legacy view.
    mutating func tensor(_ t: TensorSpec, legacy: Bool) {
        global("torch._utils", "_rebuild_tensor_v2")
        op(0x28)
        op(0x28) // the persistent id
        string("storage")
        global("torch", "FloatStorage")
        string(t.storage)
        string("cpu")
        int(t.storageCount)
        if legacy {
            if let (offset, size) = t.view {
                op(0x28)
                string(t.storage + "v")
                int(offset)
                int(size)
                op(0x74)
            } else {
                op(0x4E)
            }
        }
        op(0x74)
        op(0x51) // BINPERSID
        int(t.offset)
        tuple(t.shape)
        tuple(t.strides)
        op(0x89) // requires_grad False
        op(0x74)
        op(0x52) // REDUCE
    }

    mutating func stop() -> [UInt8] {
        op(0x2E)
        return bytes
    }

    /// `{key: tensor, ...}` as a state dict pickle.
    static func stateDict(_ tensors: [(String, TensorSpec)], legacy: Bool = false) -> [UInt8] {
        var w = PickleWriter()
        w.op(0x7D)
        w.op(0x28)
        for (key, t) in tensors {
            w.string(key)
            w.tensor(t, legacy: legacy)
        }
        w.op(0x75)
        return w.stop()
    }
}

struct TensorSpec {
    var storage = "0"
    var storageCount = 4
    var offset = 0
    var shape = [4]
    var strides = [1]
    var view: (Int, Int)?
}

/// Every kind of hostile weight file (pickles, zip and legacy `.pth`, safetensors, model cards,
/// `.npy`) is refused with a `WeightFileError` naming the file, the field and the reason: no
/// crash, no read outside a buffer, no allocation beyond a budget, nothing written.
final class HostileWeightsTests: XCTestCase {
    lazy var dir = temporaryDirectory()

    func assertRefused(
        _ body: @autoclosure () throws -> Any, file name: String, key: String?, _ reasons: [String],
        file: StaticString = #filePath, line: UInt = #line
    ) {
        XCTAssertThrowsError(try body(), file: file, line: line) { error in
            guard let e = error as? WeightFileError else {
                return XCTFail("not a WeightFileError: \(error)", file: file, line: line)
            }
            XCTAssertEqual(e.file, name, "\(e)", file: file, line: line)
            if let key {
                XCTAssertTrue(e.key?.contains(key) == true, "key \(key) expected: \(e)", file: file, line: line)
            }
            for r in reasons {
                XCTAssertTrue(e.problem.contains(r), "expected \"\(r)\" in: \(e)", file: file, line: line)
            }
        }
    }

    func unpickle(_ bytes: [UInt8]) throws -> PickleValue {
        var u = RestrictedUnpickler(data: bytes, file: "x.pkl") { _ in .none }
        return try u.load()
    }

    func pickle(_ body: [UInt8]) -> [UInt8] { [0x80, 0x02] + body + [0x2E] }

    // MARK: pickles

    func testLengthsBeyondTheDataAreRefused() {
        let huge: [UInt8] = [0xF0, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF]
        for op: UInt8 in [0x8E, 0x8D, 0x95] { // BINBYTES8, BINUNICODE8, FRAME
            assertRefused(
                try unpickle(pickle([op] + huge + [0, 0])), file: "x.pkl", key: "pickle at byte 11",
                ["a length of \(UInt64(0xFFFF_FFFF_FFFF_FFF0)) bytes runs past the end"])
        }
        for op: UInt8 in [0x58, 0x42, 0x8B] { // BINUNICODE, BINBYTES, LONG4
            assertRefused(
                try unpickle(pickle([op, 0xFF, 0xFF, 0xFF, 0x7F, 1, 2])), file: "x.pkl",
                key: "pickle at byte 7",
                ["a length of 2147483647 bytes runs past the end of the pickle (3 left)"])
        }
    }

    func testDeepNestingIsRefusedWhileBuilding() {
        let tuples = pickle([0x29] + [UInt8](repeating: 0x85, count: 100_000)) // ((((),),),)...
        assertRefused(try unpickle(tuples), file: "x.pkl", key: "pickle", ["nesting deeper than 200 levels"])
        let lists = pickle([UInt8](repeating: 0x5D, count: 100_000) + [UInt8](repeating: 0x61, count: 99_999))
        assertRefused(try unpickle(lists), file: "x.pkl", key: "pickle", ["nesting deeper than 200 levels"])
        let marks = pickle([UInt8](repeating: 0x28, count: 100_000) + [UInt8](repeating: 0x6C, count: 100_000))
        assertRefused(try unpickle(marks), file: "x.pkl", key: "pickle", ["nesting deeper than 200 levels"])
        // 200 levels load, 201 do not.
        guard case .tuple = try? unpickle(pickle([0x29] + [UInt8](repeating: 0x85, count: 199))) else {
            return XCTFail("200 nested tuples must load")
        }
        XCTAssertThrowsError(try unpickle(pickle([0x29] + [UInt8](repeating: 0x85, count: 200))))
    }

    func testContainersCannotContainThemselves() {
        // l = []; l.append(l)
        assertRefused(
            try unpickle(pickle([0x5D, 0x71, 0, 0x68, 0, 0x61])), file: "x.pkl", key: "pickle",
            ["puts a container inside itself"])
        // a = []; b = []; a.append(b); b.append(a)
        assertRefused(
            try unpickle(pickle([0x5D, 0x71, 0, 0x5D, 0x71, 1, 0x61, 0x68, 1, 0x68, 0, 0x61])),
            file: "x.pkl", key: "pickle", ["into a container already placed inside another"])
        // d = {}; d['k'] = d, by SETITEMS
        var w = PickleWriter()
        w.op(0x7D)
        w.op(0x71)
        w.op(0)
        w.op(0x28)
        w.string("k")
        w.op(0x68)
        w.op(0)
        w.op(0x75)
        assertRefused(try unpickle(w.stop()), file: "x.pkl", key: "pickle", ["puts a container inside itself"])
    }

    func testOpcodeAndMemoBudgets() {
        let tuples = pickle([UInt8](repeating: 0x29, count: RestrictedUnpickler.maxOps + 10))
        assertRefused(
            try unpickle(tuples), file: "x.pkl", key: "pickle at byte \(RestrictedUnpickler.maxOps + 1)",
            ["more than 4194304 opcodes"])
        assertRefused(
            try unpickle(pickle([0x4E, 0x72, 0xF0, 0xFF, 0xFF, 0xFF])), file: "x.pkl", key: "pickle",
            ["memo index 4294967280 beyond 4194304"])
        assertRefused(try unpickle(pickle([0x6A, 7, 0, 0, 0])), file: "x.pkl", key: "pickle", ["memo entry 7 missing"])
    }

    /// 50,000 keys by SETITEMS: kept in order, a repeated key updated in place, and linear (the
    /// old linear scan took minutes in a debug build; the bound is 20 times the time measured).
    func testLargeDictsAreHashedAndKeepTheirOrder() throws {
        var w = PickleWriter()
        w.op(0x7D)
        w.op(0x28)
        for i in 0..<50_000 {
            w.string("key\(i)")
            w.int(i)
        }
        w.string("key7")
        w.int(-7)
        w.op(0x75)
        let start = Date()
        guard case .dict(let d) = try unpickle(w.stop()) else { return XCTFail("not a dict") }
        XCTAssertLessThan(Date().timeIntervalSince(start), 10)
        XCTAssertEqual(d.entries.count, 50_000)
        XCTAssertEqual(d.entries[49_999].key.asString, "key49999")
        XCTAssertEqual(d.entries[7].key.asString, "key7")
        XCTAssertEqual(d["key7"]?.asInt, -7)
        XCTAssertEqual(d["key123"]?.asInt, 123)
    }

    // MARK: .pth

    /// Writes a zip with libarchive (entries stored like torch.save's, or deflated); an entry's
    /// data is `data` written `repeats` times.
    func writeZip(
        _ name: String, _ entries: [(name: String, data: [UInt8], repeats: Int)],
        deflate: Bool = false
    ) -> URL {
        let url = dir.appendingPathComponent(name)
        let a = archive_write_new()
        archive_write_set_format_zip(a)
        archive_write_set_options(a, deflate ? "zip:compression=deflate" : "zip:compression=store")
        XCTAssertEqual(archive_write_open_filename(a, url.path), ARCHIVE_OK)
        for e in entries {
            let entry = archive_entry_new()
            archive_entry_set_pathname(entry, e.name)
            archive_entry_set_filetype(entry, HRHF_AE_IFREG)
            archive_entry_set_perm(entry, 0o644)
            archive_entry_set_size(entry, Int64(e.data.count * e.repeats))
            XCTAssertEqual(archive_write_header(a, entry), ARCHIVE_OK)
            for _ in 0..<e.repeats { _ = e.data.withUnsafeBytes { archive_write_data(a, $0.baseAddress, $0.count) } }
            archive_entry_free(entry)
        }
        archive_write_close(a)
        archive_write_free(a)
        return url
    }

    /// A zip checkpoint of `tensors` whose storages each hold `storageBytes` bytes.
    func zipCheckpoint(_ name: String, _ tensors: [(String, TensorSpec)], storageBytes: Int = 16) -> URL {
        let storages = Set(tensors.map(\.1.storage)).sorted()
        return writeZip(
            name,
            [("archive/data.pkl", PickleWriter.stateDict(tensors), 1)]
                + storages.map { ("archive/data/\($0)", [UInt8](repeating: 0, count: storageBytes), 1) })
    }

    func testZipTensorsMustLieInsideTheirStorage() throws {
        func refused(_ t: TensorSpec, _ reasons: [String], line: UInt = #line) {
            let url = zipCheckpoint("t\(line).pth", [("w", t)])
            assertRefused(try TorchCheckpoint.read(url), file: url.path, key: "w", reasons, line: line)
        }
        refused(
            TensorSpec(offset: Int.max, shape: [], strides: []),
            ["offset \(Int.max) lies outside the storage of 4 elements"])
        refused(TensorSpec(offset: Int.max, shape: [1]), ["shorter than the tensor of shape [1]"])
        refused(TensorSpec(offset: Int.max - 1, shape: [2]), ["shorter than the tensor of shape [2]"])
        refused(TensorSpec(offset: 3, shape: [2]), ["shorter than the tensor of shape [2], strides [1] at offset 3"])
        refused(TensorSpec(shape: [2, 2], strides: [Int.max, 1]), ["shorter than the tensor of shape [2, 2]"])
        for (t, reason) in [
            (TensorSpec(offset: -1), "negative offset -1"),
            (TensorSpec(shape: [4], strides: [-1]), "negative offset 0, size [4] or stride [-1]"),
        ] {
            let url = zipCheckpoint("negative.pth", [("w", t)])
            assertRefused(try TorchCheckpoint.read(url), file: url.path, key: "pickle", [reason])
        }
        refused(
            TensorSpec(shape: [1000, 1000], strides: [0, 0]),
            ["shape [1000, 1000] has 1000000 elements, more than its storage's 4"])
        refused(TensorSpec(shape: [1 << 32, 1 << 32], strides: [0, 0]), ["has more than 67108864 elements"])
        refused(TensorSpec(storageCount: 5), ["storage 0 declares 5 elements of F32 but holds 16 bytes"])
        refused(
            TensorSpec(storageCount: Int.max / 2),
            ["storage 0 declares \(Int.max / 2) elements of F32 but holds 16 bytes"])
        let url = zipCheckpoint("count.pth", [("w", TensorSpec(storageCount: -4))])
        assertRefused(try TorchCheckpoint.read(url), file: url.path, key: "storage 0", ["not a non-negative integer"])
        // The same layouts in range load, strided ones included.
        let ok = zipCheckpoint("ok.pth", [("w", TensorSpec(offset: 1, shape: [2, 1], strides: [2, 7]))])
        XCTAssertEqual(try TorchCheckpoint.read(ok).tensors.first?.tensor.shape, [2, 1])
    }

    /// `{key: l}` where `l = []` is appended into itself.
    func selfContainingList(under key: String) -> [UInt8] {
        var w = PickleWriter()
        w.op(0x7D)
        w.op(0x28)
        w.string(key)
        w.bytes += [0x5D, 0x71, 1, 0x68, 1, 0x61, 0x75] // EMPTY_LIST, BINPUT 1, BINGET 1, APPEND, SETITEMS
        return w.stop()
    }

    /// One tensor under 65,537 keys (memoised once, fetched again for each key).
    func testTensorCountBudget() {
        var w = PickleWriter()
        w.op(0x7D)
        w.op(0x28)
        w.string("k0")
        w.tensor(TensorSpec(), legacy: false)
        w.op(0x72)
        w.littleEndian(0, 4)
        for i in 1...TensorBudget.maxTensors {
            w.string("k\(i)")
            w.op(0x6A)
            w.littleEndian(0, 4)
        }
        w.op(0x75)
        let url = writeZip(
            "many.pth",
            [
                ("archive/data.pkl", w.stop(), 1),
                ("archive/data/0", [UInt8](repeating: 0, count: 16), 1),
            ])
        assertRefused(try TorchCheckpoint.read(url), file: url.path, key: nil, ["65537 tensors, more than 65536"])
        let entries = (0...TensorBudget.maxTensors).map {
            #""t\#($0)":{"dtype":"F32","shape":[0],"data_offsets":[0,0]}"#
        }
        let header = safetensors("{" + entries.joined(separator: ",") + "}")
        assertRefused(
            try SafeTensorsFile.parse(header, file: "s.safetensors"), file: "s.safetensors", key: nil,
            ["65537 entries, more than 65536 tensors"])
    }

    func testSelfReferencingStateDictIsRefused() {
        // {'w': l} where l = [] contains itself, inside a real zip checkpoint.
        let url = writeZip("loop.pth", [("archive/data.pkl", selfContainingList(under: "w"), 1)])
        assertRefused(try TorchCheckpoint.read(url), file: url.path, key: "pickle", ["puts a container inside itself"])
    }

    /// 256 MiB of zeros deflated into a zip of about a quarter MB: refused after reading 4 times
    /// the file's size plus 16 MiB, not after 256 MiB (nor the 16 GiB archive budget).
    func testCompressionBombIsRefusedEarly() throws {
        let storageBytes = 256 << 20
        let tensor = TensorSpec(storageCount: storageBytes / 4, shape: [1 << 26], strides: [1])
        let url = writeZip(
            "bomb.pth",
            [
                ("archive/data.pkl", PickleWriter.stateDict([("w", tensor)]), 1),
                ("archive/data/0", [UInt8](repeating: 0, count: 1 << 20), storageBytes >> 20),
            ],
            deflate: true)
        let size = try XCTUnwrap(FileManager.default.attributesOfItem(atPath: url.path)[.size] as? Int)
        XCTAssertLessThan(size, 2 << 20)
        assertRefused(
            try TorchCheckpoint.read(url), file: url.path, key: "entry archive/data/0",
            ["expands past 4 times the archive's \(size) bytes (plus 16 MiB): a compression bomb"])
    }

    /// A legacy checkpoint: magic, protocol, system info, the state dict, the key list, then each
    /// storage as an int64 element count and its bytes.
    func legacyCheckpoint(
        _ name: String, _ tensors: [(String, TensorSpec)],
        storages: [(key: String, count: UInt64, bytes: Int)]
    ) throws -> URL {
        var magic = PickleWriter()
        magic.op(0x8A)
        magic.op(10)
        magic.bytes += TorchCheckpoint.legacyMagic
        var version = PickleWriter()
        version.int(1001)
        var info = PickleWriter()
        info.op(0x7D)
        info.string("little_endian")
        info.op(0x88)
        info.op(0x73)
        var keys = PickleWriter()
        keys.op(0x5D)
        keys.op(0x28)
        for storage in storages { keys.string(storage.key) }
        keys.op(0x65)
        var data = magic.stop() + version.stop() + info.stop() + PickleWriter.stateDict(tensors, legacy: true)
        data += keys.stop()
        for s in storages {
            for i in 0..<8 { data.append(UInt8(truncatingIfNeeded: s.count >> (8 * UInt64(i)))) }
            data += [UInt8](repeating: 0, count: s.bytes)
        }
        let url = dir.appendingPathComponent(name)
        try Data(data).write(to: url)
        return url
    }

    func testLegacyStorageCountsAndViewsAreChecked() throws {
        let ok = try legacyCheckpoint(
            "ok.pth", [("w", TensorSpec(shape: [2], view: (2, 2)))],
            storages: [("0", 4, 16)])
        XCTAssertEqual(try TorchCheckpoint.read(ok).tensors.first?.tensor.shape, [2])
        let lying = try legacyCheckpoint("lying.pth", [("w", TensorSpec())], storages: [("0", 3, 12)])
        assertRefused(
            try TorchCheckpoint.read(lying), file: lying.path, key: "storage 0",
            ["holds 3 elements, its persistent id declares 4"])
        let huge = try legacyCheckpoint("huge.pth", [("w", TensorSpec())], storages: [("0", UInt64.max, 16)])
        assertRefused(
            try TorchCheckpoint.read(huge), file: huge.path, key: "storage 0",
            ["holds -1 elements, its persistent id declares 4"])
        let big = try legacyCheckpoint(
            "big.pth", [("w", TensorSpec(storageCount: 1 << 62))],
            storages: [("0", 1 << 62, 16)])
        assertRefused(
            try TorchCheckpoint.read(big), file: big.path, key: "storage 0",
            ["file ends inside the storage's \(1 << 62) elements"])
        let view = try legacyCheckpoint(
            "view.pth", [("w", TensorSpec(shape: [2], view: (Int.max, 2)))],
            storages: [("0", 4, 16)])
        assertRefused(
            try TorchCheckpoint.read(view), file: view.path, key: "storage 0",
            ["view does not lie inside the storage of 4 elements"])
        let beyondView = try legacyCheckpoint(
            "beyond.pth", [("w", TensorSpec(offset: 1, shape: [2], view: (2, 2)))],
            storages: [("0", 4, 16)])
        assertRefused(
            try TorchCheckpoint.read(beyondView), file: beyondView.path, key: "w",
            ["storage of 2 elements is shorter than the tensor"])
        let unlisted = try legacyCheckpoint("unlisted.pth", [("w", TensorSpec())], storages: [("9", 4, 16)])
        assertRefused(
            try TorchCheckpoint.read(unlisted), file: unlisted.path, key: "storage 9",
            ["listed but no persistent id declares it"])
    }

    // MARK: safetensors

    func safetensors(_ header: String, payload: Int = 0) -> Data {
        var data = Data()
        withUnsafeBytes(of: UInt64(header.utf8.count).littleEndian) { data.append(contentsOf: $0) }
        data.append(contentsOf: Array(header.utf8) + [UInt8](repeating: 0, count: payload))
        return data
    }

    func testSafetensorsNumbersMustBeExactNonNegativeIntegers() {
        for bad in ["[2.9]", "[2.0]", "[true]", "[1e3]", "[-1]", "[18446744073709551615]", "[\"2\"]"] {
            let data = safetensors(#"{"w":{"dtype":"F32","shape":\#(bad),"data_offsets":[0,8]}}"#, payload: 8)
            assertRefused(
                try SafeTensorsFile.parse(data, file: "s.safetensors"), file: "s.safetensors", key: "w",
                ["must be non-negative integers"])
        }
        let offsets = safetensors(#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8.5]}}"#, payload: 8)
        assertRefused(
            try SafeTensorsFile.parse(offsets, file: "s.safetensors"), file: "s.safetensors", key: "w",
            ["data_offsets [0, 8.5] must be non-negative integers"])
        var length = Data()
        withUnsafeBytes(of: UInt64.max.littleEndian) { length.append(contentsOf: $0) }
        assertRefused(
            try SafeTensorsFile.parse(length, file: "s.safetensors"), file: "s.safetensors",
            key: "header length", ["\(UInt64.max) exceeds the file (8 bytes)"])
    }

    func testSafetensorsElementBudgets() {
        let one = safetensors(#"{"w":{"dtype":"F32","shape":[1048576,1048576],"data_offsets":[0,8]}}"#, payload: 8)
        assertRefused(
            try SafeTensorsFile.parse(one, file: "s.safetensors"), file: "s.safetensors", key: "w",
            ["shape [1048576, 1048576] has more than 67108864 elements"])
        let wrap = safetensors(#"{"w":{"dtype":"F32","shape":[4294967296,4294967296,16],"data_offsets":[0,0]}}"#)
        assertRefused(
            try SafeTensorsFile.parse(wrap, file: "s.safetensors"), file: "s.safetensors", key: "w",
            ["more than 67108864 elements"])
        // Three tensors of 64 Mi elements each: the third passes the 128 Mi total (before any offset check).
        let entries = (0..<3).map { #""t\#($0)":{"dtype":"U8","shape":[67108864],"data_offsets":[0,67108864]}"# }
        let many = safetensors("{" + entries.joined(separator: ",") + "}")
        XCTAssertThrowsError(try SafeTensorsFile.parse(many, file: "s.safetensors")) { e in
            XCTAssertTrue("\(e)".contains("the tensors hold more than 134217728 elements in all"), "\(e)")
        }
        let ones = Array(repeating: "1", count: 65).joined(separator: ",")
        let rank = safetensors(#"{"w":{"dtype":"F32","shape":[\#(ones)],"data_offsets":[0,4]}}"#, payload: 4)
        assertRefused(
            try SafeTensorsFile.parse(rank, file: "s.safetensors"), file: "s.safetensors", key: "w",
            ["65 dimensions, more than 64"])
    }

    // MARK: model cards

    static let cardArchitecture = ArchitectureDescription(
        name: "tiny", flavor: .torchvision, block: .basic, layers: [1, 1, 1, 1], baseWidth: 4, outputStride: 8,
        headChannels: 8, classesPerStep: [4, 2])

    /// A native model file whose card is the valid card for `cardArchitecture` changed by `edit`.
    func cardFile(tensors: [(name: String, tensor: Tensor)] = [], _ edit: (inout [String: Any]) -> Void) throws -> URL {
        let card = ModelCard(architecture: Self.cardArchitecture, classNames: ["bg", "a", "b", "c", "d", "e"])
        var json = try XCTUnwrap(try JSONSerialization.jsonObject(with: JSONEncoder().encode(card)) as? [String: Any])
        edit(&json)
        let text = String(decoding: try JSONSerialization.data(withJSONObject: json), as: UTF8.self)
        let url = dir.appendingPathComponent("card-\(UUID().uuidString).safetensors")
        try SafeTensorsFile(tensors: tensors, metadata: [ModelFile.cardKey: text]).write(to: url)
        return url
    }

    func architecture(_ key: String, _ value: Any) -> (inout [String: Any]) -> Void {
        { json in
            var arch = json["architecture"] as? [String: Any] ?? [:]
            arch[key] = value
            json["architecture"] = arch
        }
    }

    func testModelCardBoundsAreCheckedBeforeBuilding() throws {
        let cases: [(String, Any, String)] = [
            ("baseWidth", 65536, "65536 is not in 1...128"),
            ("layers", [1, 1, 1 << 20, 1], "must be four block counts in 1...64"),
            ("layers", [1, 1, 1], "must be four block counts"),
            ("headChannels", 1 << 20, "1048576 is not in 1...1024"),
            ("asppRates", [12, 24, 1 << 30], "must be three rates in 1...64"),
            ("asppRates", [0, 24, 36], "must be three rates in 1...64"),
            ("outputStride", 4, "4 is not 8 or 16"),
            ("classesPerStep", [Int.max, Int.max, 2], "1024 in all at most"),
            ("classesPerStep", [4, 0], "each step adds at least one class"),
            ("classesPerStep", Array(repeating: 1, count: 300), "300 steps, not 1...256"),
        ]
        for (key, value, reason) in cases {
            let url = try cardFile(architecture(key, value))
            assertRefused(try ModelFile.load(url), file: url.path, key: "architecture.\(key)", [reason])
        }
        let wide = try cardFile { json in
            self.architecture("block", "bottleneck")(&json)
            self.architecture("layers", [64, 64, 64, 64])(&json)
            self.architecture("baseWidth", 128)(&json)
        }
        assertRefused(
            try ModelFile.load(wide), file: wide.path, key: "architecture.layers",
            ["convolution weights, more than 134217728"])
        for preset in ArchitectureDescription.presets { XCTAssertNoThrow(try preset.validate(), preset.name) }
        var resnet152 = ArchitectureDescription.preset("deeplabv3-resnet101")!
        resnet152.layers = [3, 8, 36, 3]
        resnet152.classesPerStep = [100, 10, 10, 10, 10, 10]
        resnet152.auxHead = true
        XCTAssertNoThrow(try resnet152.validate())
    }

    func testModelCardContentsMustAgree() throws {
        let fewer = try cardFile { json in json["classes"] = [["id": 0, "name": "bg"]] }
        assertRefused(try ModelFile.load(fewer), file: fewer.path, key: "classes", ["card lists 1 classes"])
        let ids = try cardFile { json in
            var classes = json["classes"] as? [[String: Any]] ?? []
            classes[3]["id"] = 100_000_000
            json["classes"] = classes
        }
        assertRefused(try ModelFile.load(ids), file: ids.path, key: "classes[3].id", ["is 100000000"])
        let history = try cardFile { json in
            json["history"] = [["step": 0, "classes": [0, 1, 2, 3]], ["step": 1, "classes": [4, 9]]]
        }
        assertRefused(try ModelFile.load(history), file: history.path, key: "history[1]", ["add classes 4..<6"])
        let steps = try cardFile { json in json["history"] = [["step": 0, "classes": [0, 1, 2, 3]]] }
        assertRefused(try ModelFile.load(steps), file: steps.path, key: "history", ["has 1 steps, classesPerStep 2"])
        let std = try cardFile { json in json["normalization"] = ["mean": [0, 0, 0], "std": [1, 0, 1]] }
        assertRefused(try ModelFile.load(std), file: std.path, key: "normalization", ["finite positive"])
        let fraction = try cardFile(architecture("baseWidth", 2.9))
        assertRefused(
            try ModelFile.load(fraction), file: fraction.path, key: nil,
            ["model card is not valid: a number does not fit its field"])
        let text = try cardFile(architecture("baseWidth", "wide"))
        assertRefused(
            try ModelFile.load(text), file: text.path, key: "architecture.baseWidth",
            ["model card is not valid"])
        let missing = try cardFile { json in json["classes"] = [["id": 0]] }
        assertRefused(try ModelFile.load(missing), file: missing.path, key: "classes[0].name", ["missing"])
    }

    func testModelWeightsMustMatchTheCard() throws {
        let model = try DeepLabV3(Self.cardArchitecture)
        var tensors = model.stateDict().map { (name: $0.name, tensor: $0.tensor) }
        let good = try cardFile(tensors: tensors) { _ in }
        XCTAssertEqual(try ModelFile.load(good).model.numClasses, 6)
        tensors[0].tensor = Tensor(zeros: [1, 2, 3])
        let bad = try cardFile(tensors: tensors) { _ in }
        assertRefused(
            try ModelFile.load(bad), file: bad.path, key: nil,
            ["\(tensors[0].name): shape [1, 2, 3] where the model has"])
    }

    // MARK: .npy

    func npy(_ header: String, version: UInt8 = 1, payload: Int = 0) -> Data {
        var data = Data([0x93] + Array("NUMPY".utf8) + [version, 0])
        let length = header.utf8.count
        data.append(
            contentsOf: version == 1
                ? [UInt8(length & 0xFF), UInt8(length >> 8)]
                : [UInt8(length & 0xFF), UInt8(length >> 8 & 0xFF), 0, 0])
        data.append(contentsOf: Array(header.utf8) + [UInt8](repeating: 0, count: payload))
        return data
    }

    func testNPYHeadersAreParsedStrictly() throws {
        func refused(_ data: Data, _ key: String, _ reason: String, line: UInt = #line) {
            assertRefused(try NPY.parse(data, file: "a.npy"), file: "a.npy", key: key, [reason], line: line)
        }
        let ok = npy("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 1), }\n", payload: 8)
        XCTAssertEqual(try NPY.parse(ok, file: "a.npy").shape, [2, 1])
        let two = npy("{'descr': '<f4', 'fortran_order': False, 'shape': (2,)}", version: 2, payload: 8)
        XCTAssertEqual(try NPY.parse(two, file: "a.npy").shape, [2])
        refused(
            npy("{'descr': '<f4', 'fortran_order': False, 'shape': (2.9,), }", payload: 8), "header",
            "shape sizes must be non-negative integers, found '2.9'")
        refused(npy("{'descr': '<f4', 'fortran_order': False, 'shape': (-1,), }"), "header", "found '-1'")
        refused(npy("{'descr': '<f4', 'fortran_order': False, 'shape': (True,), }"), "header", "found 'True'")
        refused(
            npy("{'descr': '<f4', 'fortran_order': False, 'shape': (99999999999999999999,), }"), "header",
            "found '99999999999999999999'")
        refused(
            npy("{'descr': '<f4', 'fortran_order': False, 'shape': (4294967296, 4294967296), }"), "shape",
            "has more than 268435456 elements")
        refused(
            npy("{'descr': '<f4', 'fortran_order': False, 'shape': (1000, 1000), }", payload: 8), "data",
            "holds 8 bytes, shape [1000, 1000] needs 4000000")
        refused(npy("{'descr': '>f8', 'fortran_order': False, 'shape': (1,), }", payload: 8), "descr", "must be '<f4'")
        refused(npy("{'descr': '<f4', 'fortran_order': True, 'shape': (1,), }", payload: 4), "fortran_order", "C order")
        refused(
            npy("{'descr': '<f4', 'fortran_order': False, 'shape': (1,), 'x': '<f4'}", payload: 4), "header",
            "keys are")
        refused(npy("{'descr': '<f4', 'fortran_order': False, 'shape': (1,)", payload: 4), "header", "expected")
        refused(npy("{'descr': '<f4'}", version: 7), "version", "7.0 is not 1.0, 2.0 or 3.0")
        var long = npy("{}", version: 2)
        long.replaceSubrange(8..<12, with: [0xFF, 0xFF, 0xFF, 0xFF])
        refused(long, "header length", "4294967295 bytes: more than the file's")
    }

    // MARK: hrhf-convert

    func testConvertRefusesAPlantedPartialLinkAndHostileInputs() throws {
        let models = Fixtures.directory.appendingPathComponent("models")
        let archFile = dir.appendingPathComponent("arch.json")
        try JSONEncoder().encode(ModelParityTests.tvSmall).write(to: archFile)
        let out = dir.appendingPathComponent("model.safetensors")
        let target = dir.appendingPathComponent("precious.txt")
        try Data("precious".utf8).write(to: target)
        try FileManager.default.createSymbolicLink(atPath: out.path + ".partial", withDestinationPath: target.path)
        let planted = try runTool(
            "hrhf-convert",
            [
                models.appendingPathComponent("tv_small_legacy.pth").path,
                "--arch", archFile.path, "--out", out.path,
            ])
        XCTAssertEqual(planted.status, 1, planted.stderr)
        XCTAssertTrue(
            planted.stderr.contains(out.path + ".partial") && planted.stderr.contains("not a regular file"),
            planted.stderr)
        XCTAssertEqual(try String(contentsOf: target, encoding: .utf8), "precious")
        XCTAssertEqual(try FileManager.default.destinationOfSymbolicLink(atPath: out.path + ".partial"), target.path)
        XCTAssertFalse(FileManager.default.fileExists(atPath: out.path))
        try FileManager.default.removeItem(atPath: out.path + ".partial")

        let zeroStride = zipCheckpoint(
            "stride.pth",
            [("backbone.conv1.weight", TensorSpec(shape: [64, 64], strides: [0, 0]))])
        let loop = writeZip("loop.pth", [("archive/data.pkl", selfContainingList(under: "backbone.x"), 1)])
        for (input, expected) in [(zeroStride, "backbone.conv1.weight"), (loop, "puts a container inside itself")] {
            let run = try runTool("hrhf-convert", [input.path, "--arch", archFile.path, "--out", out.path])
            XCTAssertEqual(run.status, 1, run.stderr)
            XCTAssertTrue(run.stderr.contains(input.path) && run.stderr.contains(expected), run.stderr)
            XCTAssertFalse(FileManager.default.fileExists(atPath: out.path))
            XCTAssertFalse(FileManager.default.fileExists(atPath: out.path + ".partial"))
        }
    }
}
