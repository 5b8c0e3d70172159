import Foundation

/// The tensors of a PyTorch checkpoint, by key, and what was found around them.
public struct LoadedStateDict {
    public var tensors: [(name: String, tensor: Tensor)]
    /// "zip", "legacy" or "safetensors".
    public var format: String
    /// The wrapper the state dict sat in ("state_dict", "model_state", ...), if any.
    public var wrapper: String?
    /// Whether a "module." prefix (DataParallel) was removed from every key.
    public var strippedModulePrefix: Bool
    /// Other top-level entries of a wrapper dict (epoch, optimizer state, ...), not loaded.
    public var ignoredEntries: [String]

    public var dictionary: [String: Tensor] { Dictionary(tensors.map { ($0.name, $0.tensor) }, uniquingKeysWith: { a, _ in a }) }
}

/// Reads PyTorch checkpoints without Python: the zip format (PyTorch 1.6 and later), the legacy
/// format (MiB's PyTorch 1.2 files), and safetensors. Pickles go through `RestrictedUnpickler`.
public enum TorchCheckpoint {
    /// Largest storage a checkpoint entry may hold (4 GiB).
    static let maxEntryBytes = 1 << 32
    static let legacyMagic: [UInt8] = [0x6C, 0xFC, 0x9C, 0x46, 0xF9, 0x20, 0x6A, 0xA8, 0x50, 0x19]

    public static func read(_ url: URL) throws -> LoadedStateDict {
        let file = url.path
        guard let handle = FileHandle(forReadingAtPath: file) else { throw WeightFileError(file: file, "cannot open file") }
        let head = [UInt8](handle.readData(ofLength: 16))
        try? handle.close()
        if head.starts(with: [0x50, 0x4B, 0x03, 0x04]) { return try readZip(url) }
        if head.count >= 2 && head[0] == 0x80 && head[1] >= 2 { return try readLegacy(url) }
        if head.count >= 9 && head[8] == UInt8(ascii: "{") {
            let st = try SafeTensorsFile.read(url)
            return finish(topLevel: nil, tensors: st.tensors, format: "safetensors", file: file)
        }
        throw WeightFileError(file: file, "unknown file type: neither a PyTorch checkpoint (zip or legacy) nor safetensors")
    }

    // MARK: zip

    static func readZip(_ url: URL) throws -> LoadedStateDict {
        let file = url.path
        let reader: ArchiveReader
        do { reader = try ArchiveReader(path: file, format: .zip) } catch let e as ArchiveError {
            throw WeightFileError(file: file, "damaged zip checkpoint: \(e.problem)")
        }
        var pickle: [UInt8]?
        var records: [String: Data] = [:]
        do {
            while let entry = try reader.next() {
                guard entry.kind == .file else { continue }
                if entry.name.hasSuffix("/data.pkl") || entry.name == "data.pkl" {
                    pickle = [UInt8](try reader.readData(entry: entry.name, limit: maxEntryBytes))
                } else if let range = entry.name.range(of: "/data/") {
                    records[String(entry.name[range.upperBound...])] = try reader.readData(entry: entry.name, limit: maxEntryBytes)
                }
            }
        } catch let e as ArchiveError {
            throw WeightFileError(file: file, "damaged zip checkpoint: \(e.entry.map { "entry \($0): " } ?? "")\(e.problem)")
        }
        guard let pickle else { throw WeightFileError(file: file, "zip checkpoint without data.pkl") }
        var unpickler = RestrictedUnpickler(data: pickle, file: file) { pid in
            // ('storage', storage_type, key, location, numel)
            guard pid.count >= 5, pid[0].asString == "storage", case .global(let type) = pid[1],
                  let dtype = RestrictedUnpickler.storageTypes[type], let key = pid[2].asString else {
                throw WeightFileError(file: file, "unexpected persistent id in data.pkl")
            }
            return .storage(StorageReference(key: key, dtype: dtype, viewOffset: 0))
        }
        let top = try unpickler.load()
        return try materialize(top, storages: records, format: "zip", file: file)
    }

    // MARK: legacy

    static func readLegacy(_ url: URL) throws -> LoadedStateDict {
        let file = url.path
        let bytes: [UInt8]
        do { bytes = [UInt8](try Data(contentsOf: url, options: .alwaysMapped)) } catch {
            throw WeightFileError(file: file, "cannot read: \(error.localizedDescription)")
        }
        var position = 0
        func next(_ persistent: @escaping ([PickleValue]) throws -> PickleValue = { _ in .none }) throws -> PickleValue {
            var u = RestrictedUnpickler(data: bytes, file: file, persistentLoad: persistent)
            u.position = position
            let v = try u.load()
            position = u.position
            return v
        }
        guard case .bytes(let magic) = try next(), magic == legacyMagic else {
            throw WeightFileError(file: file, "not a PyTorch checkpoint (legacy magic number missing)")
        }
        guard let protocolVersion = try next().asInt, protocolVersion == 1001 else {
            throw WeightFileError(file: file, "unsupported legacy protocol version")
        }
        if case .dict(let info) = try next(), let little = info["little_endian"], case .bool(false) = little {
            throw WeightFileError(file: file, "big-endian checkpoints are not supported")
        }
        let top = try next { pid in
            // ('storage', storage_type, root_key, location, size, view_metadata)
            guard pid.count >= 6, pid[0].asString == "storage", case .global(let type) = pid[1],
                  let dtype = RestrictedUnpickler.storageTypes[type], let key = pid[2].asString else {
                throw WeightFileError(file: file, "unexpected persistent id")
            }
            var offset = 0
            if let view = pid[5].asTuple, view.count >= 2, let o = view[1].asInt { offset = o }
            return .storage(StorageReference(key: key, dtype: dtype, viewOffset: offset))
        }
        guard case .list(let keyList) = try next() else {
            throw WeightFileError(file: file, "legacy checkpoint: storage key list missing")
        }
        // The raw storages follow in key-list order, each an int64 element count then the data.
        var records: [String: Data] = [:]
        var dtypes: [String: StoredDType] = [:]
        collectStorageTypes(top, into: &dtypes)
        for keyValue in keyList.items {
            guard let key = keyValue.asString else { throw WeightFileError(file: file, "storage key is not a string") }
            guard position + 8 <= bytes.count else {
                throw WeightFileError(file: file, key: "storage \(key)", "file ends before the storage's size")
            }
            let count = bytes[position..<(position + 8)].reversed().reduce(UInt64(0)) { $0 << 8 | UInt64($1) }
            position += 8
            let size = dtypes[key]?.byteSize ?? 4
            let (byteCount, overflow) = Int(clamping: count).multipliedReportingOverflow(by: size)
            guard !overflow, byteCount <= bytes.count - position else {
                throw WeightFileError(file: file, key: "storage \(key)", "file ends inside the storage's \(count) elements")
            }
            records[key] = Data(bytes[position..<(position + byteCount)])
            position += byteCount
        }
        return try materialize(top, storages: records, format: "legacy", file: file)
    }

    static func collectStorageTypes(_ v: PickleValue, into types: inout [String: StoredDType]) {
        switch v {
        case .tensor(let t): types[t.storage.key] = t.storage.dtype
        case .dict(let d): for e in d.entries { collectStorageTypes(e.value, into: &types) }
        case .list(let l): for i in l.items { collectStorageTypes(i, into: &types) }
        case .tuple(let t): for i in t { collectStorageTypes(i, into: &types) }
        default: break
        }
    }

    // MARK: from pickled objects to tensors

    static let wrapperKeys = ["state_dict", "model_state", "model_state_dict", "model", "net"]

    static func materialize(_ top: PickleValue, storages: [String: Data], format: String, file: String) throws -> LoadedStateDict {
        guard case .dict(let root) = top else { throw WeightFileError(file: file, "top-level object is not a dict") }
        var dict = root
        var wrapper: String?
        for key in wrapperKeys {
            if let inner = root[key], case .dict(let d) = inner {
                dict = d
                wrapper = key
                break
            }
        }
        var tensors: [(String, Tensor)] = []
        for (keyValue, value) in dict.entries {
            guard let key = keyValue.asString, case .tensor(let ref) = value else { continue }
            tensors.append((key, try tensor(ref, storages: storages, key: key, file: file)))
        }
        var result = finish(topLevel: wrapper == nil ? nil : root, tensors: tensors, format: format, file: file)
        result.wrapper = wrapper
        return result
    }

    static func finish(topLevel: PickleDict?, tensors: [(name: String, tensor: Tensor)], format: String,
                       file: String) -> LoadedStateDict {
        var tensors = tensors
        let strip = !tensors.isEmpty && tensors.allSatisfy { $0.name.hasPrefix("module.") }
        if strip { tensors = tensors.map { (String($0.name.dropFirst("module.".count)), $0.tensor) } }
        let ignored = topLevel?.entries.compactMap { $0.key.asString }.filter { !wrapperKeys.contains($0) } ?? []
        return LoadedStateDict(tensors: tensors, format: format, wrapper: nil, strippedModulePrefix: strip,
                               ignoredEntries: ignored)
    }

    static func tensor(_ ref: TensorReference, storages: [String: Data], key: String, file: String) throws -> Tensor {
        guard let data = storages[ref.storage.key] else {
            throw WeightFileError(file: file, key: key, "storage \(ref.storage.key) is missing from the file")
        }
        let size = ref.storage.dtype.byteSize
        let available = data.count / size - ref.storage.viewOffset
        var extent = ref.offset + 1
        for (n, s) in zip(ref.shape, ref.strides) {
            let (p, o1) = (n - 1).multipliedReportingOverflow(by: s)
            let (e, o2) = extent.addingReportingOverflow(p)
            guard !o1, !o2 else { throw WeightFileError(file: file, key: key, "tensor shape overflows") }
            extent = e
        }
        let count = ref.shape.reduce(1, *)
        guard count == 0 || extent <= available else {
            throw WeightFileError(file: file, key: key,
                                  "storage of \(max(available, 0)) elements is shorter than the tensor of shape \(ref.shape) needs (\(extent))")
        }
        let t = Tensor(zeros: ref.shape)
        data.withUnsafeBytes { raw in
            let base = raw.baseAddress! + (ref.storage.viewOffset + ref.offset) * size
            let contiguous = zip(ref.strides, ref.shape.indices).allSatisfy { s, i in
                ref.shape[i] == 1 || s == ref.shape[(i + 1)...].reduce(1, *)
            }
            if contiguous {
                ref.storage.dtype.decode(base, count: count, into: t.pointer)
            } else {
                var index = [Int](repeating: 0, count: ref.shape.count)
                for i in 0..<count {
                    let source = zip(index, ref.strides).reduce(0) { $0 + $1.0 * $1.1 }
                    ref.storage.dtype.decode(base + source * size, count: 1, into: t.pointer + i)
                    var d = index.count - 1
                    while d >= 0 {
                        index[d] += 1
                        if index[d] < ref.shape[d] { break }
                        index[d] = 0
                        d -= 1
                    }
                }
            }
        }
        return t
    }
}
