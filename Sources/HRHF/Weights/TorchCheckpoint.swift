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

    public var dictionary: [String: Tensor] {
        Dictionary(tensors.map { ($0.name, $0.tensor) }, uniquingKeysWith: { a, _ in a })
    }
}

/// Reads PyTorch checkpoints without Python: the zip format (PyTorch 1.6 and later), the legacy
/// format (MiB's PyTorch 1.2 files), and safetensors. Pickles go through `RestrictedUnpickler`.
public enum TorchCheckpoint {
    /// Largest storage a checkpoint entry may hold (4 GiB).
    static let maxEntryBytes = 1 << 32
    /// Largest `data.pkl`: the fixtures take 140 bytes per tensor, so a ResNet-101 checkpoint
    /// with Adam state (about 1,300 tensors) needs under 200 KB.
    static let maxPickleBytes = 64 << 20
    /// A zip checkpoint may give at most this many times its size on disk (plus 16 MiB):
    /// `torch.save` stores entries uncompressed (ratio 1) and a deflated re-zip of float weights
    /// stays under 2, while a compression bomb (1000:1) is refused after reading 4 times its size.
    static let maxExpansion = 4
    static let legacyMagic: [UInt8] = [0x6C, 0xFC, 0x9C, 0x46, 0xF9, 0x20, 0x6A, 0xA8, 0x50, 0x19]

    public static func read(_ url: URL) throws -> LoadedStateDict {
        let file = url.path
        guard let handle = FileHandle(forReadingAtPath: file) else {
            throw WeightFileError(file: file, "cannot open file")
        }
        let head = [UInt8](handle.readData(ofLength: 16))
        try? handle.close()
        if head.starts(with: [0x50, 0x4B, 0x03, 0x04]) { return try readZip(url) }
        if head.count >= 2 && head[0] == 0x80 && head[1] >= 2 { return try readLegacy(url) }
        if head.count >= 9 && head[8] == UInt8(ascii: "{") {
            let st = try SafeTensorsFile.read(url)
            return finish(topLevel: nil, tensors: st.tensors, format: "safetensors", file: file)
        }
        throw WeightFileError(
            file: file, "unknown file type: neither a PyTorch checkpoint (zip or legacy) nor safetensors")
    }

    /// A persistent id's element count (its item `index`), as a non-negative Int.
    static func declaredCount(_ pid: [PickleValue], _ index: Int, key: String, file: String) throws -> Int {
        guard let count = pid[index].asInt, count >= 0 else {
            throw WeightFileError(file: file, key: "storage \(key)", "element count is not a non-negative integer")
        }
        return count
    }

    // MARK: zip

    static func readZip(_ url: URL) throws -> LoadedStateDict {
        let file = url.path
        let reader: ArchiveReader
        do {
            reader = try ArchiveReader(path: file, format: .zip, maxExpansion: maxExpansion)
        } catch let e as ArchiveError {
            throw WeightFileError(file: file, "damaged zip checkpoint: \(e.problem)")
        }
        var selection: StateDictSelection?
        var records: [String: Data] = [:]
        do {
            while let entry = try reader.next() {
                guard entry.kind == .file else { continue }
                if entry.name.hasSuffix("/data.pkl") || entry.name == "data.pkl" {
                    guard selection == nil else {
                        throw WeightFileError(file: file, key: entry.name, "a second data.pkl")
                    }
                    let pickle = [UInt8](try reader.readData(entry: entry.name, limit: maxPickleBytes))
                    selection = try select(try unpickleZip(pickle, file: file), file: file)
                } else if let range = entry.name.range(of: "/data/") {
                    let key = String(entry.name[range.upperBound...])
                    // torch writes data.pkl first: storages the state dict does not use are skipped unread.
                    if let selection, !selection.storageKeys.contains(key) { continue }
                    records[key] = try reader.readData(entry: entry.name, limit: maxEntryBytes)
                }
            }
        } catch let e as ArchiveError {
            throw WeightFileError(
                file: file, key: e.entry.map { "entry \($0)" },
                "damaged zip checkpoint: \(e.problem)")
        }
        guard let selection else { throw WeightFileError(file: file, "zip checkpoint without data.pkl") }
        return try materialize(selection, storages: records, format: "zip", file: file)
    }

    static func unpickleZip(_ pickle: [UInt8], file: String) throws -> PickleValue {
        var unpickler = RestrictedUnpickler(data: pickle, file: file) { pid in
            // ('storage', storage_type, key, location, numel)
            guard pid.count >= 5, pid[0].asString == "storage", case .global(let type) = pid[1],
                let dtype = RestrictedUnpickler.storageTypes[type], let key = pid[2].asString
            else {
                throw WeightFileError(file: file, key: "data.pkl", "unexpected persistent id")
            }
            let count = try declaredCount(pid, 4, key: key, file: file)
            return .storage(StorageReference(key: key, dtype: dtype, count: count, viewOffset: 0, viewCount: count))
        }
        return try unpickler.load()
    }

    // MARK: legacy

    static func readLegacy(_ url: URL) throws -> LoadedStateDict {
        let file = url.path
        let bytes: [UInt8]
        do { bytes = [UInt8](try Data(contentsOf: url, options: .alwaysMapped)) } catch {
            throw WeightFileError(file: file, "cannot read: \(error.localizedDescription)")
        }
        var position = 0
        func next(_ persistent: @escaping ([PickleValue]) throws -> PickleValue = { _ in .none }) throws -> PickleValue
        {
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
        // Every root storage as its persistent ids declare it: element type and count.
        var declared: [String: (dtype: StoredDType, count: Int)] = [:]
        let top = try next { pid in
            // ('storage', storage_type, root_key, location, size, view_metadata)
            guard pid.count >= 6, pid[0].asString == "storage", case .global(let type) = pid[1],
                let dtype = RestrictedUnpickler.storageTypes[type], let key = pid[2].asString
            else {
                throw WeightFileError(file: file, "unexpected persistent id")
            }
            let count = try declaredCount(pid, 4, key: key, file: file)
            if let previous = declared[key], previous != (dtype, count) {
                throw WeightFileError(
                    file: file, key: "storage \(key)",
                    "declared as \(previous.count) "
                        + "\(previous.dtype.rawValue) and as \(count) \(dtype.rawValue) elements")
            }
            declared[key] = (dtype, count)
            var storage = StorageReference(key: key, dtype: dtype, count: count, viewOffset: 0, viewCount: count)
            if case .none = pid[5] { return .storage(storage) }
            // (view_key, offset, view_size): a part of the root storage.
            guard let view = pid[5].asTuple, view.count >= 3, let offset = view[1].asInt, let size = view[2].asInt,
                offset >= 0, size >= 0, size <= count - offset
            else {
                throw WeightFileError(
                    file: file, key: "storage \(key)",
                    "view does not lie inside the storage of \(count) elements")
            }
            storage.viewOffset = offset
            storage.viewCount = size
            return .storage(storage)
        }
        guard case .list(let keyList) = try next() else {
            throw WeightFileError(file: file, "legacy checkpoint: storage key list missing")
        }
        let selection = try select(top, file: file)
        // The raw storages follow in key-list order, each an int64 element count then the data.
        var records: [String: Data] = [:]
        for keyValue in keyList.items {
            guard let key = keyValue.asString else { throw WeightFileError(file: file, "storage key is not a string") }
            guard let declaration = declared[key] else {
                throw WeightFileError(file: file, key: "storage \(key)", "listed but no persistent id declares it")
            }
            guard 8 <= bytes.count - position else {
                throw WeightFileError(file: file, key: "storage \(key)", "file ends before the storage's size")
            }
            let raw = bytes[position..<(position + 8)].reversed().reduce(UInt64(0)) { $0 << 8 | UInt64($1) }
            position += 8
            guard let count = Int(exactly: raw), count == declaration.count else {
                throw WeightFileError(
                    file: file, key: "storage \(key)",
                    "holds \(Int64(bitPattern: raw)) elements, "
                        + "its persistent id declares \(declaration.count)")
            }
            let (byteCount, overflow) = count.multipliedReportingOverflow(by: declaration.dtype.byteSize)
            guard !overflow, byteCount <= bytes.count - position else {
                throw WeightFileError(
                    file: file, key: "storage \(key)", "file ends inside the storage's \(count) elements")
            }
            if selection.storageKeys.contains(key) { records[key] = Data(bytes[position..<(position + byteCount)]) }
            position += byteCount
        }
        return try materialize(selection, storages: records, format: "legacy", file: file)
    }

    // MARK: from pickled objects to tensors

    static let wrapperKeys = ["state_dict", "model_state", "model_state_dict", "model", "net"]

    /// The dict holding the tensors (the top level or a wrapper entry) and what its tensors need.
    struct StateDictSelection {
        var root: PickleDict
        var wrapper: String?
        var tensors: [(key: String, reference: TensorReference)]
        var storageKeys: Set<String> { Set(tensors.map(\.reference.storage.key)) }
    }

    static func select(_ top: PickleValue, file: String) throws -> StateDictSelection {
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
        let tensors = dict.entries.compactMap { entry -> (String, TensorReference)? in
            guard let key = entry.key.asString, case .tensor(let reference) = entry.value else { return nil }
            return (key, reference)
        }
        return StateDictSelection(root: root, wrapper: wrapper, tensors: tensors)
    }

    static func materialize(
        _ selection: StateDictSelection, storages: [String: Data], format: String,
        file: String
    ) throws -> LoadedStateDict {
        guard selection.tensors.count <= TensorBudget.maxTensors else {
            throw WeightFileError(
                file: file,
                "\(selection.tensors.count) tensors, more than \(TensorBudget.maxTensors)")
        }
        var tensors: [(String, Tensor)] = []
        var total = 0
        for (key, reference) in selection.tensors {
            let count = try TensorBudget.elementCount(reference.shape, file: file, key: key)
            let (sum, overflow) = total.addingReportingOverflow(count)
            guard !overflow, sum <= TensorBudget.maxTotalElements else {
                throw WeightFileError(
                    file: file, key: key,
                    "the tensors hold more than \(TensorBudget.maxTotalElements) elements in all")
            }
            total = sum
            tensors.append((key, try tensor(reference, count: count, storages: storages, key: key, file: file)))
        }
        var result = finish(
            topLevel: selection.wrapper == nil ? nil : selection.root, tensors: tensors, format: format,
            file: file)
        result.wrapper = selection.wrapper
        return result
    }

    static func finish(
        topLevel: PickleDict?, tensors: [(name: String, tensor: Tensor)], format: String,
        file: String
    ) -> LoadedStateDict {
        var tensors = tensors
        let strip = !tensors.isEmpty && tensors.allSatisfy { $0.name.hasPrefix("module.") }
        if strip { tensors = tensors.map { (String($0.name.dropFirst("module.".count)), $0.tensor) } }
        let ignored = topLevel?.entries.compactMap { $0.key.asString }.filter { !wrapperKeys.contains($0) } ?? []
        return LoadedStateDict(
            tensors: tensors, format: format, wrapper: nil, strippedModulePrefix: strip,
            ignoredEntries: ignored)
    }

    /// The tensor `ref` describes, once its storage's size, its offset, sizes and strides are
    /// shown to keep every element inside the storage. `count` is its checked element count.
    static func tensor(
        _ ref: TensorReference, count: Int, storages: [String: Data], key: String,
        file: String
    ) throws -> Tensor {
        let storage = ref.storage
        guard let data = storages[storage.key] else {
            throw WeightFileError(file: file, key: key, "storage \(storage.key) is missing from the file")
        }
        let size = storage.dtype.byteSize
        let (bytes, overflow) = storage.count.multipliedReportingOverflow(by: size)
        guard !overflow, bytes == data.count else {
            throw WeightFileError(
                file: file, key: key,
                "storage \(storage.key) declares \(storage.count) elements of "
                    + "\(storage.dtype.rawValue) but holds \(data.count) bytes")
        }
        let available = storage.viewCount
        guard count <= available else {
            throw WeightFileError(
                file: file, key: key,
                "shape \(ref.shape) has \(count) elements, more than its storage's \(available)")
        }
        let t = Tensor(zeros: ref.shape)
        guard count > 0 else { return t }
        // The largest element index, every step checked: it must lie inside the storage.
        var last = ref.offset
        for (n, s) in zip(ref.shape, ref.strides) {
            let (step, o1) = (n - 1).multipliedReportingOverflow(by: s)
            let (sum, o2) = last.addingReportingOverflow(step)
            guard !o1, !o2, sum < available else {
                throw WeightFileError(
                    file: file, key: key,
                    "storage of \(available) elements is shorter than the "
                        + "tensor of shape \(ref.shape), strides \(ref.strides) at offset "
                        + "\(ref.offset) needs")
            }
            last = sum
        }
        guard last < available else {
            throw WeightFileError(
                file: file, key: key,
                "offset \(ref.offset) lies outside the storage of \(available) elements")
        }
        var contiguous = true, expected = 1
        for (n, s) in zip(ref.shape, ref.strides).reversed() {
            if n != 1 && s != expected { contiguous = false }
            expected *= n
        }
        data.withUnsafeBytes { raw in
            guard let start = raw.baseAddress else { return }
            let base = start + (storage.viewOffset + ref.offset) * size
            if contiguous {
                storage.dtype.decode(base, count: count, into: t.pointer)
                return
            }
            var index = [Int](repeating: 0, count: ref.shape.count)
            for i in 0..<count {
                let source = zip(index, ref.strides).reduce(0) { $0 + $1.0 * $1.1 }
                storage.dtype.decode(base + source * size, count: 1, into: t.pointer + i)
                var d = index.count - 1
                while d >= 0 {
                    index[d] += 1
                    if index[d] < ref.shape[d] { break }
                    index[d] = 0
                    d -= 1
                }
            }
        }
        return t
    }
}
