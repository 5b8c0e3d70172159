import CArchive
import Foundation

/// What a fuzz harness made of one input.
public enum FuzzOutcome: Equatable, Sendable {
    /// The reader took the input and the code that uses its result ran to the end.
    case accepted
    /// The reader refused the input with a thrown error; its message.
    case refused(String)
    /// The reader took the input, but something its users rely on does not hold (a dataset
    /// name that is not a plain file name, a label of another size than its image, a file
    /// left behind). libFuzzer's entry point traps on it, so the input is saved.
    case violation(String)
}

/// The readers of untrusted files, each driven as the tools drive it, so that `hrhf-fuzz`
/// (libFuzzer) and the ordinary tests replay inputs through exactly the same code.
public enum FuzzTarget: String, CaseIterable, Sendable {
    /// `data.pkl` of a zip checkpoint whose storages `0` to `7` hold 256 bytes each.
    case pickle
    /// A whole `.pth` file, zip or legacy, through `TorchCheckpoint.read`.
    case pth
    /// A native model file through `ModelFile.load`: header, card, network, weights.
    case safetensors
    /// A synthetic pack (a tar) with its SHA256SUMS rebuilt: read and verified, its manifest used
    /// as `hrhf-pack inspect` uses it, every image and label decoded, a contact sheet of the first four.
    case pack
    /// PNG bytes decoded as RGB and as an index mask.
    case png
    /// JPEG bytes decoded as RGB.
    case jpeg
    /// A VOC list file (names, or MiB's "IMAGE MASK" lines) over a small dataset folder.
    case list
    /// A `.npy` file through `NPY.read`.
    case npy

    /// Runs one input; `name` is the file name the readers see (errors must name it).
    public func run(_ data: Data, name: String = "input") -> FuzzOutcome {
        switch self {
        case .png:
            return refusing {
                do { _ = try ImageIO.decodeRGB(data, name: name) } catch let rgbError {
                    do { _ = try ImageIO.decodeIndexPNG(data, name: name) } catch { throw rgbError }
                }
                return .accepted
            }
        case .jpeg:
            return refusing {
                _ = try ImageIO.decodeRGB(data, name: name)
                return .accepted
            }
        case .pickle:
            return withScratch(
                { folder in
                    let file = folder.appendingPathComponent(name)
                    let storages = (0..<8).map { key in
                        ("archive/data/\(key)", Data((0..<256).map { UInt8(truncatingIfNeeded: $0 * 7 + key) }))
                    }
                    try writeStoredZip([("archive/data.pkl", data)] + storages, to: file.path)
                    return file
                },
                read: { file in
                    _ = try TorchCheckpoint.read(file)
                    return .accepted
                })
        case .pth:
            return withInputFile(data, name: name) { file in
                _ = try TorchCheckpoint.read(file)
                return .accepted
            }
        case .safetensors:
            return withInputFile(data, name: name) { file in
                _ = try ModelFile.load(file)
                return .accepted
            }
        case .pack:
            return withScratch(
                { folder in
                    let file = folder.appendingPathComponent(name)
                    try data.write(to: file)
                    // An input whose entries cannot be listed is read as it is.
                    try? Self.rebuildChecksums(file)
                    return file
                }, read: { try Self.usePack(SyntheticPack(url: $0)) })
        case .list:
            return withScratch(
                { folder in
                    try Self.makeDatasetFolder(in: folder)
                    let list = folder.appendingPathComponent(name)
                    try data.write(to: list)
                    return list
                },
                read: { list in
                    let root = list.deletingLastPathComponent().appendingPathComponent("voc")
                    return Self.checkNames(try VOCDataset(root: root, split: "train", list: list))
                })
        case .npy:
            return withInputFile(data, name: name) { file in
                _ = try NPY.read(file)
                return .accepted
            }
        }
    }

    /// Rewrites a pack with a SHA256SUMS that matches its other entries (kept in order), as a
    /// forger would, so that mutated contents reach the checks behind the checksums.
    static func rebuildChecksums(_ file: URL) throws {
        let reader = try ArchiveReader(path: file.path, format: .tar, totalLimit: 64 << 20)
        var entries: [(name: String, kind: TarWriter.Kind, data: Data)] = []
        while let entry = try reader.next() {
            let kind: TarWriter.Kind
            switch entry.kind {
            case .file: kind = .file
            case .directory: kind = .directory
            case .symlink: kind = .symlink("target")
            case .hardlink: kind = .hardlink("target")
            case .other: kind = .characterDevice
            }
            guard entry.name != "SHA256SUMS" else { continue }
            let data = entry.kind == .file ? try reader.readData(entry: entry.name, limit: 16 << 20) : Data()
            entries.append((entry.name, kind, data))
        }
        let sums = entries.filter { if case .file = $0.kind { return true } else { return false } }
            .map { "\(sha256Hex($0.data))  \($0.name)\n" }.joined()
        let writer = try TarWriter(url: file)
        for entry in entries { try writer.add(entry.name, entry.data, kind: entry.kind) }
        try writer.add("SHA256SUMS", Data(sums.utf8))
        try writer.finish()
    }

    /// What `hrhf-pack inspect` and `sheet` do with a verified pack.
    static func usePack(_ pack: SyntheticPack) throws -> FuzzOutcome {
        let m = pack.manifest
        let names = m.teacher.card.classNames
        for c in m.classes {
            let with = m.images.filter { $0.targets.contains(c.id) }
            let areas = with.compactMap { r in r.targets.firstIndex(of: c.id).map { r.achievedAreas[$0] } }
            _ = (c.id < names.count ? names[c.id] : "?", areas.reduce(0, +))
        }
        var histogram = [Int](repeating: 0, count: 10)
        for a in m.images.flatMap(\.achievedAreas) { histogram[min(9, Int(a * 10))] += 1 }
        for record in m.images {
            let image = try pack.image(record), label = try pack.label(record)
            guard image.width == label.width, image.height == label.height else {
                return .violation(
                    "verified pack: label \(record.label) is \(label.width)x\(label.height), "
                        + "its image \(image.width)x\(image.height)")
            }
        }
        if !m.images.isEmpty { _ = try contactSheet(pack, columns: 2, limit: 4) }
        return .accepted
    }

    /// Empty images and masks a list may name: `a` and `b` in every folder, so that a line such as
    /// `../SegmentationClass/a` (a name with `/`) also names files that exist.
    static func makeDatasetFolder(in folder: URL) throws {
        let root = folder.appendingPathComponent("voc")
        for sub in ["JPEGImages", "SegmentationClass", "SegmentationClassAug"] {
            let dir = root.appendingPathComponent(sub)
            try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
            for file in ["a.jpg", "a.png", "b.png"] {
                try Data().write(to: dir.appendingPathComponent(file))
            }
        }
    }

    /// Names become output file names (`--save-predictions`): one path component, nothing else.
    static func checkNames(_ dataset: VOCDataset) -> FuzzOutcome {
        for i in 0..<dataset.count {
            let name = dataset.name(i)
            if name.isEmpty || name == ".." || name.contains("/") || name.contains("\0") {
                return .violation("dataset name \(name.debugDescription) is not a plain file name")
            }
        }
        return .accepted
    }
}

/// Runs `body`, turning a thrown error into a refusal that carries its message.
private func refusing(_ body: () throws -> FuzzOutcome) -> FuzzOutcome {
    do { return try body() } catch { return .refused(String(describing: error)) }
}

/// Runs `read` on the input `prepare` puts in a new empty folder (in /dev/shm when there is
/// one), removed afterwards. Anything `read` adds to the folder is a violation: reading a file
/// must write nothing.
private func withScratch(_ prepare: (URL) throws -> URL, read: (URL) throws -> FuzzOutcome) -> FuzzOutcome {
    let manager = FileManager.default
    let shm = URL(fileURLWithPath: "/dev/shm")
    let base = manager.isWritableFile(atPath: shm.path) ? shm : manager.temporaryDirectory
    let folder = base.appendingPathComponent("hrhf-fuzz-\(getpid())-\(UUID().uuidString)")
    defer { try? manager.removeItem(at: folder) }
    let input: URL, before: [String]
    do {
        try manager.createDirectory(at: folder, withIntermediateDirectories: false)
        input = try prepare(folder)
        before = try manager.subpathsOfDirectory(atPath: folder.path)
    } catch {
        fatalError("fuzz harness: cannot prepare \(folder.path): \(error)")
    }
    let outcome = refusing { try read(input) }
    let left = Set((try? manager.subpathsOfDirectory(atPath: folder.path)) ?? []).subtracting(before)
    return left.isEmpty ? outcome : .violation("reading \(input.lastPathComponent) left \(left.sorted()) behind")
}

/// `withScratch` with the input in a file called `name`.
private func withInputFile(_ data: Data, name: String, _ read: (URL) throws -> FuzzOutcome) -> FuzzOutcome {
    withScratch(
        { folder in
            let file = folder.appendingPathComponent(name)
            try data.write(to: file)
            return file
        }, read: read)
}

/// A zip of uncompressed entries, as `torch.save` writes them.
private func writeStoredZip(_ entries: [(name: String, data: Data)], to path: String) throws {
    guard let archive = archive_write_new() else { throw FileError(file: path, "libarchive could not start") }
    defer { archive_write_free(archive) }
    archive_write_set_format_zip(archive)
    guard archive_write_set_options(archive, "zip:compression=store") == ARCHIVE_OK,
        archive_write_open_filename(archive, path) == ARCHIVE_OK
    else {
        throw FileError(file: path, "cannot open the zip for writing")
    }
    for (name, data) in entries {
        let entry = archive_entry_new()
        defer { archive_entry_free(entry) }
        archive_entry_set_pathname(entry, name)
        archive_entry_set_filetype(entry, HRHF_AE_IFREG)
        archive_entry_set_perm(entry, 0o644)
        archive_entry_set_size(entry, la_int64_t(data.count))
        guard archive_write_header(archive, entry) == ARCHIVE_OK else {
            throw FileError(file: path, "cannot add \(name)")
        }
        let written = data.isEmpty ? 0 : data.withUnsafeBytes { archive_write_data(archive, $0.baseAddress, $0.count) }
        guard written == data.count else { throw FileError(file: path, "cannot write \(name)") }
    }
    guard archive_write_close(archive) == ARCHIVE_OK else { throw FileError(file: path, "cannot finish the zip") }
}
