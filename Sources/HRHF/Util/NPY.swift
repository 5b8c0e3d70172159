import Foundation

/// NumPy `.npy` (format 1.0) for float32 tensors, so any framework can read our outputs.
public enum NPY {
    public static func serialize(_ t: Tensor) -> Data {
        let shape = t.shape.map(String.init).joined(separator: ", ") + (t.rank == 1 ? "," : "")
        var header = "{'descr': '<f4', 'fortran_order': False, 'shape': (\(shape)), }"
        // Magic (6) + version (2) + length (2) + header, padded with spaces to 64 bytes, ending in \n.
        let unpadded = 10 + header.utf8.count + 1
        header += String(repeating: " ", count: (64 - unpadded % 64) % 64) + "\n"
        var data = Data([0x93] + Array("NUMPY".utf8) + [1, 0])
        withUnsafeBytes(of: UInt16(header.utf8.count).littleEndian) { data.append(contentsOf: $0) }
        data.append(contentsOf: Array(header.utf8))
        data.append(UnsafeBufferPointer(start: t.pointer, count: t.count))
        return data
    }

    public static func write(_ t: Tensor, to url: URL) throws {
        try writeAtomically(serialize(t), to: url)
    }

    /// Largest header NumPy itself reads (`max_header_size`).
    public static let maxHeaderBytes = 10_000
    /// Elements one `.npy` may hold: 256 Mi (1 GiB of float32), the logits of 6 ADE20K images
    /// (150 classes) at 512 x 512; the data must be in the file too, so memory follows its size.
    public static let maxElements = 1 << 28

    /// Reads a little-endian float32, C-order `.npy` written by this toolkit or NumPy.
    public static func read(_ url: URL) throws -> Tensor {
        let data: Data
        do { data = try Data(contentsOf: url, options: .alwaysMapped) } catch {
            throw WeightFileError(file: url.path, "cannot read: \(error.localizedDescription)")
        }
        return try parse(data, file: url.path)
    }

    /// Parses `.npy` bytes (versions 1 to 3); the header's dict is read as the Python literal it
    /// is, and the data's size checked against the shape before anything is allocated.
    public static func parse(_ data: Data, file: String) throws -> Tensor {
        let bytes = [UInt8](data.prefix(12))
        guard bytes.count >= 10, bytes.prefix(6).elementsEqual([0x93] + Array("NUMPY".utf8)) else {
            throw WeightFileError(file: file, "not a .npy file")
        }
        guard (1...3).contains(bytes[6]), bytes[7] == 0 else {
            throw WeightFileError(file: file, key: "version", "\(bytes[6]).\(bytes[7]) is not 1.0, 2.0 or 3.0")
        }
        let start = bytes[6] == 1 ? 10 : 12
        guard bytes.count >= start else { throw WeightFileError(file: file, key: "header length", "truncated") }
        let headerLength = bytes[8..<start].reversed().reduce(0) { $0 << 8 | Int($1) }
        guard headerLength <= maxHeaderBytes, headerLength <= data.count - start else {
            throw WeightFileError(
                file: file, key: "header length",
                "\(headerLength) bytes: more than the file's "
                    + "\(data.count - start) left or NumPy's limit of \(maxHeaderBytes)")
        }
        let headerBytes = data[(data.startIndex + start)..<(data.startIndex + start + headerLength)]
        guard let header = String(bytes: headerBytes, encoding: bytes[6] == 3 ? .utf8 : .isoLatin1) else {
            throw WeightFileError(file: file, key: "header", "not text")
        }
        var parser = HeaderParser(text: Array(header.unicodeScalars), file: file)
        let fields = try parser.dictionary()
        guard Set(fields.keys) == ["descr", "fortran_order", "shape"] else {
            throw WeightFileError(
                file: file, key: "header",
                "keys are \(fields.keys.sorted()), not descr, fortran_order and shape")
        }
        guard case .string("<f4")? = fields["descr"] else {
            throw WeightFileError(file: file, key: "descr", "must be '<f4' (little-endian float32)")
        }
        guard case .bool(false)? = fields["fortran_order"] else {
            throw WeightFileError(file: file, key: "fortran_order", "must be False (C order)")
        }
        guard case .tuple(let shape)? = fields["shape"] else {
            throw WeightFileError(file: file, key: "shape", "missing or not a tuple of integers")
        }
        let count = try TensorBudget.elementCount(shape, limit: maxElements, file: file, key: "shape")
        let offset = start + headerLength
        guard data.count - offset == count * 4 else {
            throw WeightFileError(
                file: file, key: "data",
                "holds \(data.count - offset) bytes, shape \(shape) needs \(count * 4)")
        }
        let t = Tensor(zeros: shape)
        data.withUnsafeBytes { raw in
            guard let base = raw.baseAddress, count > 0 else { return }
            StoredDType.f32.decode(base + offset, count: count, into: t.pointer)
        }
        return t
    }

    /// The header's Python dict literal: string keys; values a string, True/False, or a tuple
    /// of non-negative integers. Anything else is refused by name.
    struct HeaderParser {
        enum Value {
            case string(String)
            case bool(Bool)
            case tuple([Int])
        }

        let text: [Unicode.Scalar]
        let file: String
        var position = 0

        func fail(_ problem: String) -> WeightFileError {
            WeightFileError(file: file, key: "header at character \(position)", problem)
        }

        mutating func skipSpaces() {
            while position < text.count, text[position].properties.isWhitespace { position += 1 }
        }

        /// Consumes `c` (after spaces) if it comes next.
        mutating func take(_ c: Unicode.Scalar) -> Bool {
            skipSpaces()
            guard position < text.count, text[position] == c else { return false }
            position += 1
            return true
        }

        mutating func expect(_ c: Unicode.Scalar) throws {
            guard take(c) else { throw fail("expected '\(c)'") }
        }

        mutating func word() -> String {
            skipSpaces()
            var s = ""
            while position < text.count, text[position].properties.isAlphabetic {
                s.unicodeScalars.append(text[position])
                position += 1
            }
            return s
        }

        mutating func string() throws -> String {
            skipSpaces()
            guard position < text.count, text[position] == "'" || text[position] == "\"" else {
                throw fail("expected a string")
            }
            let quote = text[position]
            position += 1
            var s = ""
            while position < text.count, text[position] != quote {
                guard text[position] != "\\" else { throw fail("escapes are not supported") }
                s.unicodeScalars.append(text[position])
                position += 1
            }
            try expect(quote)
            return s
        }

        mutating func value() throws -> Value {
            skipSpaces()
            if take("(") {
                var items: [Int] = []
                while !take(")") {
                    var digits = ""
                    while position < text.count, !",)".unicodeScalars.contains(text[position]),
                        !text[position].properties.isWhitespace
                    {
                        digits.unicodeScalars.append(text[position])
                        position += 1
                    }
                    guard !digits.isEmpty, digits.unicodeScalars.allSatisfy({ ("0"..."9").contains($0) }),
                        let n = Int(digits)
                    else {
                        throw fail("shape sizes must be non-negative integers, found '\(digits)'")
                    }
                    items.append(n)
                    guard take(",") || (position < text.count && text[position] == ")") else {
                        throw fail("expected ',' or ')' in the shape")
                    }
                }
                return .tuple(items)
            }
            if position < text.count, text[position] == "'" || text[position] == "\"" { return .string(try string()) }
            switch word() {
            case "True": return .bool(true)
            case "False": return .bool(false)
            case let other: throw fail("unsupported value '\(other)'")
            }
        }

        mutating func dictionary() throws -> [String: Value] {
            try expect("{")
            var fields: [String: Value] = [:]
            while !take("}") {
                let key = try string()
                guard fields[key] == nil else { throw fail("key '\(key)' given twice") }
                try expect(":")
                fields[key] = try value()
                guard take(",") || (position < text.count && text[position] == "}") else {
                    throw fail("expected ',' or '}'")
                }
            }
            skipSpaces()
            guard position == text.count else { throw fail("text after the dict") }
            return fields
        }
    }
}
