import Foundation

/// A failure reading or writing a weight file, naming the file and, where it applies, the key.
public struct WeightFileError: Error, CustomStringConvertible, Equatable {
    public var file: String
    public var key: String?
    public var problem: String

    public init(file: String, key: String? = nil, _ problem: String) {
        self.file = file
        self.key = key
        self.problem = problem
    }

    public var description: String {
        if let key { return "\(file): \(key): \(problem)" }
        return "\(file): \(problem)"
    }
}

/// Element types a tensor file may hold; all are converted to float32 on reading.
public enum StoredDType: String, Sendable, CaseIterable {
    case f32 = "F32"
    case f16 = "F16"
    case bf16 = "BF16"
    case f64 = "F64"
    case i64 = "I64"
    case i32 = "I32"
    case i16 = "I16"
    case i8 = "I8"
    case u8 = "U8"
    case bool = "BOOL"

    public var byteSize: Int {
        switch self {
        case .f64, .i64: return 8
        case .f32, .i32: return 4
        case .f16, .bf16, .i16: return 2
        case .i8, .u8, .bool: return 1
        }
    }

    /// Converts `count` little-endian values at `raw` into float32.
    func decode(_ raw: UnsafeRawPointer, count: Int, into out: UnsafeMutablePointer<Float>) {
        switch self {
        case .f32:
            for i in 0..<count {
                out[i] = Float(
                    bitPattern: UInt32(littleEndian: raw.loadUnaligned(fromByteOffset: 4 * i, as: UInt32.self)))
            }
        case .f64:
            for i in 0..<count {
                out[i] = Float(
                    Double(bitPattern: UInt64(littleEndian: raw.loadUnaligned(fromByteOffset: 8 * i, as: UInt64.self))))
            }
        case .f16:
            for i in 0..<count {
                out[i] = Float(
                    halfBits: UInt16(littleEndian: raw.loadUnaligned(fromByteOffset: 2 * i, as: UInt16.self)))
            }
        case .bf16:
            for i in 0..<count {
                out[i] = Float(
                    bitPattern: UInt32(UInt16(littleEndian: raw.loadUnaligned(fromByteOffset: 2 * i, as: UInt16.self)))
                        << 16)
            }
        case .i64:
            for i in 0..<count {
                out[i] = Float(Int64(littleEndian: raw.loadUnaligned(fromByteOffset: 8 * i, as: Int64.self)))
            }
        case .i32:
            for i in 0..<count {
                out[i] = Float(Int32(littleEndian: raw.loadUnaligned(fromByteOffset: 4 * i, as: Int32.self)))
            }
        case .i16:
            for i in 0..<count {
                out[i] = Float(Int16(littleEndian: raw.loadUnaligned(fromByteOffset: 2 * i, as: Int16.self)))
            }
        case .i8: for i in 0..<count { out[i] = Float(raw.load(fromByteOffset: i, as: Int8.self)) }
        case .u8, .bool: for i in 0..<count { out[i] = Float(raw.load(fromByteOffset: i, as: UInt8.self)) }
        }
    }
}

/// Limits on the tensors of one weight file, checked before anything is allocated.
public enum TensorBudget {
    /// Most dimensions a tensor may have (NumPy's own limit).
    public static let maxRank = 64
    /// Elements of one tensor: 64 Mi (256 MiB as float32). The largest DeepLab weight
    /// (ResNet-152's 2.4 M) and even an ImageNet-21k classifier (44.7 M) fit.
    public static let maxElements = 1 << 26
    /// Elements of all tensors of one file: 128 Mi (512 MiB as float32). A ResNet-152
    /// DeepLabV3 with its auxiliary head holds 77 M.
    public static let maxTotalElements = 1 << 27
    /// Tensors one file may give: 64 Ki. A ResNet-101 DeepLabV3 state dict has about 650.
    public static let maxTensors = 1 << 16

    /// The product of `shape`, refused if a size is negative, the rank or the product too large
    /// (every step checked).
    public static func elementCount(
        _ shape: [Int], limit: Int = maxElements, file: String,
        key: String?
    ) throws -> Int {
        guard shape.count <= maxRank else {
            throw WeightFileError(file: file, key: key, "\(shape.count) dimensions, more than \(maxRank)")
        }
        var count = 1
        for n in shape {
            guard n >= 0 else { throw WeightFileError(file: file, key: key, "negative size in shape \(shape)") }
            let (product, overflow) = count.multipliedReportingOverflow(by: n)
            guard !overflow, product <= limit else {
                throw WeightFileError(file: file, key: key, "shape \(shape) has more than \(limit) elements")
            }
            count = product
        }
        return count
    }
}

extension Float {
    /// IEEE 754 half precision to single, without relying on Float16 support of the platform.
    init(halfBits h: UInt16) {
        let sign = UInt32(h >> 15) << 31
        let exponent = Int((h >> 10) & 0x1F), mantissa = UInt32(h & 0x3FF)
        if exponent == 0 {
            // Zero or subnormal: mantissa * 2^-24.
            let magnitude = Float(mantissa) * Float(sign: .plus, exponent: -24, significand: 1)
            self = sign != 0 ? -magnitude : magnitude
        } else if exponent == 31 {
            self = Float(bitPattern: sign | 0x7F80_0000 | (mantissa << 13))
        } else {
            self = Float(bitPattern: sign | UInt32(exponent - 15 + 127) << 23 | (mantissa << 13))
        }
    }
}

/// A safetensors file: named float32 tensors in order, plus string metadata.
public struct SafeTensorsFile {
    public var tensors: [(name: String, tensor: Tensor)]
    public var metadata: [String: String]

    public init(tensors: [(name: String, tensor: Tensor)], metadata: [String: String] = [:]) {
        self.tensors = tensors
        self.metadata = metadata
    }

    public subscript(_ name: String) -> Tensor? { tensors.first { $0.name == name }?.tensor }

    /// Reads a safetensors file, converting every dtype to float32 and checking every offset.
    public static func read(_ url: URL) throws -> SafeTensorsFile {
        let data: Data
        do { data = try Data(contentsOf: url, options: .alwaysMapped) } catch {
            throw WeightFileError(file: url.path, "cannot read: \(error.localizedDescription)")
        }
        return try parse(data, file: url.path)
    }

    /// Header bigger than this is refused: 16 MiB. A ResNet-152 model's header with its card
    /// takes under 200 KB, and parsing JSON costs several times its size in memory (the format's
    /// own reader allows 100 MB).
    static let maxHeaderBytes = 16 << 20

    /// A JSON number that is an exact non-negative integer: not a float (`2.9`, `2.0`), not
    /// `true` (NSNumber's `intValue` would truncate or convert both).
    static func exactCount(_ value: Any) -> Int? {
        guard let number = value as? NSNumber else { return nil }
        switch String(cString: number.objCType) {
        case "s", "i", "l", "q": return Int(exactly: number.int64Value).flatMap { $0 >= 0 ? $0 : nil }
        case "S", "I", "L", "Q": return Int(exactly: number.uint64Value)
        default: return nil // "d": written with a fraction or an exponent; "c": a boolean
        }
    }

    public static func parse(_ data: Data, file: String) throws -> SafeTensorsFile {
        guard data.count >= 8 else {
            throw WeightFileError(file: file, "too short for a safetensors header (\(data.count) bytes)")
        }
        let headerSize = data.withUnsafeBytes { UInt64(littleEndian: $0.loadUnaligned(as: UInt64.self)) }
        guard let headerLength = Int(exactly: headerSize), headerLength <= maxHeaderBytes,
            headerLength <= data.count - 8
        else {
            throw WeightFileError(
                file: file, key: "header length",
                "\(headerSize) exceeds the file (\(data.count) bytes) or \(maxHeaderBytes) bytes")
        }
        let payloadStart = data.startIndex + 8 + headerLength
        let headerData = data[(data.startIndex + 8)..<payloadStart]
        guard let header = (try? JSONSerialization.jsonObject(with: headerData)) as? [String: Any] else {
            throw WeightFileError(file: file, "header is not a JSON object")
        }
        let payloadSize = data.count - 8 - headerLength
        var metadata: [String: String] = [:]
        if let meta = header["__metadata__"] {
            guard let m = meta as? [String: String] else {
                throw WeightFileError(file: file, key: "__metadata__", "must map strings to strings")
            }
            metadata = m
        }
        var entries: [(name: String, dtype: StoredDType, shape: [Int], count: Int, start: Int, end: Int)] = []
        guard header.count <= TensorBudget.maxTensors else {
            throw WeightFileError(file: file, "\(header.count) entries, more than \(TensorBudget.maxTensors) tensors")
        }
        var total = 0
        for (name, value) in header where name != "__metadata__" {
            guard let info = value as? [String: Any], let dtypeName = info["dtype"] as? String,
                let shapeAny = info["shape"] as? [Any], let offsets = info["data_offsets"] as? [Any],
                offsets.count == 2
            else {
                throw WeightFileError(file: file, key: name, "entry needs dtype, shape and two data_offsets")
            }
            guard let dtype = StoredDType(rawValue: dtypeName) else {
                throw WeightFileError(file: file, key: name, "unsupported dtype \(dtypeName)")
            }
            let shape = shapeAny.compactMap(exactCount), bounds = offsets.compactMap(exactCount)
            guard shape.count == shapeAny.count, bounds.count == 2 else {
                throw WeightFileError(
                    file: file, key: name,
                    "shape \(shapeAny) and data_offsets \(offsets) must be "
                        + "non-negative integers")
            }
            let count = try TensorBudget.elementCount(shape, file: file, key: name)
            let (sum, overflow) = total.addingReportingOverflow(count)
            guard !overflow, sum <= TensorBudget.maxTotalElements else {
                throw WeightFileError(
                    file: file, key: name,
                    "the tensors hold more than \(TensorBudget.maxTotalElements) elements in all")
            }
            total = sum
            entries.append((name, dtype, shape, count, bounds[0], bounds[1]))
        }
        // Offsets only once every shape and the total are known to fit the budgets.
        for e in entries {
            guard e.start <= e.end, e.end <= payloadSize else {
                throw WeightFileError(
                    file: file, key: e.name,
                    "data offsets [\(e.start), \(e.end)] outside the data "
                        + "section of \(payloadSize) bytes")
            }
            let (needed, tooMany) = e.count.multipliedReportingOverflow(by: e.dtype.byteSize)
            guard !tooMany, e.end - e.start == needed else {
                throw WeightFileError(
                    file: file, key: e.name,
                    "holds \(e.end - e.start) bytes, shape \(e.shape) of "
                        + "\(e.dtype.rawValue) needs \(e.count) x \(e.dtype.byteSize)")
            }
        }
        entries.sort { $0.start != $1.start ? $0.start < $1.start : $0.name < $1.name }
        for (a, b) in zip(entries, entries.dropFirst()) where a.end > b.start {
            throw WeightFileError(file: file, key: b.name, "data overlaps that of \(a.name)")
        }
        let tensors: [(String, Tensor)] = data.withUnsafeBytes { raw in
            entries.map { e in
                let t = Tensor(zeros: e.shape)
                if let base = raw.baseAddress, t.count > 0 {
                    e.dtype.decode(base + 8 + headerLength + e.start, count: t.count, into: t.pointer)
                }
                return (e.name, t)
            }
        }
        return SafeTensorsFile(tensors: tensors, metadata: metadata)
    }

    /// The file's bytes: float32 tensors in the given order, header keys sorted, header padded
    /// with spaces to 8-byte alignment. The same content always gives the same bytes.
    public func serialized() throws -> Data {
        var header: [String: Any] = [:]
        var offset = 0
        for (name, t) in tensors {
            guard header[name] == nil, name != "__metadata__" else {
                throw WeightFileError(file: "safetensors", key: name, "duplicate or reserved tensor name")
            }
            header[name] = ["dtype": "F32", "shape": t.shape, "data_offsets": [offset, offset + 4 * t.count]]
            offset += 4 * t.count
        }
        if !metadata.isEmpty { header["__metadata__"] = metadata }
        var json = try JSONSerialization.data(withJSONObject: header, options: [.sortedKeys, .withoutEscapingSlashes])
        while json.count % 8 != 0 { json.append(0x20) }
        var out = Data(capacity: 8 + json.count + offset)
        withUnsafeBytes(of: UInt64(json.count).littleEndian) { out.append(contentsOf: $0) }
        out.append(json)
        for (_, t) in tensors {
            // Little-endian hosts only (x86-64, arm64): the float bits are written as they are.
            out.append(UnsafeBufferPointer(start: t.pointer, count: t.count))
        }
        return out
    }

    /// Writes to `NAME.partial` and renames when complete.
    public func write(to url: URL) throws {
        try writeAtomically(try serialized(), to: url)
    }
}
