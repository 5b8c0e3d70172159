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

    /// Reads a little-endian float32, C-order `.npy` written by this toolkit or NumPy.
    public static func read(_ url: URL) throws -> Tensor {
        let data = try Data(contentsOf: url)
        guard data.count >= 10, data.prefix(6) == Data([0x93] + Array("NUMPY".utf8)) else {
            throw WeightFileError(file: url.path, "not a .npy file")
        }
        let major = data[6]
        let headerLength = major == 1 ? Int(data[8]) | Int(data[9]) << 8
            : Int(data[8]) | Int(data[9]) << 8 | Int(data[10]) << 16 | Int(data[11]) << 24
        let start = major == 1 ? 10 : 12
        guard data.count >= start + headerLength else { throw WeightFileError(file: url.path, "truncated .npy header") }
        let header = String(decoding: data[start..<(start + headerLength)], as: UTF8.self)
        guard header.contains("'<f4'"), header.contains("'fortran_order': False"),
              let open = header.range(of: "'shape': ("), let close = header[open.upperBound...].firstIndex(of: ")") else {
            throw WeightFileError(file: url.path, ".npy must be little-endian float32 in C order")
        }
        let shape = header[open.upperBound..<close].split(separator: ",").compactMap {
            Int($0.trimmingCharacters(in: .whitespaces))
        }
        let t = Tensor(zeros: shape)
        let offset = start + headerLength
        guard data.count - offset == t.count * 4 else {
            throw WeightFileError(file: url.path, ".npy holds \(data.count - offset) bytes, shape \(shape) needs \(t.count * 4)")
        }
        data.withUnsafeBytes { raw in
            StoredDType.f32.decode(raw.baseAddress! + offset, count: t.count, into: t.pointer)
        }
        return t
    }
}
