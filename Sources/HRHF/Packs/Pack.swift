import CArchive
import Foundation

/// The version string of this toolkit, recorded in the packs and models it makes.
public let toolkitVersion = "0.1.0"

/// manifest.json of a synthetic pack.
public struct PackManifest: Codable, Equatable, Sendable {
    public static let formatName = "hrhf-synthetic-pack"
    public static let currentVersion = 1

    public struct Generator: Codable, Equatable, Sendable {
        public var name: String
        public var version: String
        public var options: InversionOptions
        public var seed: UInt64
        /// Images of the whole pack (all shards).
        public var count: Int
    }

    public struct Teacher: Codable, Equatable, Sendable {
        public var file: String
        public var sha256: String
        public var card: ModelCard
    }

    public struct Shard: Codable, Equatable, Sendable {
        public var index: Int
        public var count: Int
    }

    public var format = PackManifest.formatName
    public var formatVersion = PackManifest.currentVersion
    public var generator: Generator
    public var teacher: Teacher
    /// The old classes the images show.
    public var classes: [ClassInfo]
    /// Present only in a part made with --shard K/N.
    public var shard: Shard?
    public var images: [SynthesisRecord]
    public var quality: SynthesisQuality

    public func encoded() throws -> Data {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
        return try encoder.encode(self) + Data("\n".utf8)
    }
}

/// A failure reading or writing a pack, naming the pack and the entry.
public typealias PackError = ArchiveError

/// Writes a tar (POSIX pax) entry by entry through libarchive, to `NAME.partial`, renamed into
/// place by `finish()`. Fixed mtimes, owners and modes: the same entries give the same bytes.
public final class TarWriter {
    public let url: URL
    let partial: String
    private let descriptor: Int32
    private var handle: OpaquePointer?

    public init(url: URL) throws {
        self.url = url
        (partial, descriptor) = try createPartialFile(for: url)
        guard let a = archive_write_new() else {
            close(descriptor)
            unlink(partial)
            throw PackError(file: url.path, "libarchive could not start")
        }
        handle = a
        archive_write_set_format_pax(a)
        archive_write_add_filter_none(a)
        guard archive_write_open_fd(a, descriptor) == ARCHIVE_OK else {
            let message = String(cString: archive_error_string(a))
            archive_write_free(a)
            handle = nil
            close(descriptor)
            unlink(partial)
            throw PackError(file: url.path, "cannot write \(partial): \(message)")
        }
    }

    deinit {
        if let handle {
            archive_write_free(handle)
            close(descriptor)
            unlink(partial)
        }
    }

    public enum Kind { case file, directory, symlink(String), hardlink(String), characterDevice }

    /// Adds one entry. Kinds other than `.file` exist so tests can build hostile archives.
    public func add(_ name: String, _ data: Data, kind: Kind = .file) throws {
        guard let a = handle else { throw PackError(file: url.path, entry: name, "writer already finished") }
        let entry = archive_entry_new()
        defer { archive_entry_free(entry) }
        archive_entry_set_pathname(entry, name)
        archive_entry_set_mtime(entry, 0, 0)
        archive_entry_set_uid(entry, 0)
        archive_entry_set_gid(entry, 0)
        archive_entry_set_uname(entry, "root")
        archive_entry_set_gname(entry, "root")
        switch kind {
        case .file:
            archive_entry_set_filetype(entry, HRHF_AE_IFREG)
            archive_entry_set_perm(entry, 0o644)
            archive_entry_set_size(entry, la_int64_t(data.count))
        case .directory:
            archive_entry_set_filetype(entry, HRHF_AE_IFDIR)
            archive_entry_set_perm(entry, 0o755)
        case .symlink(let target):
            archive_entry_set_filetype(entry, HRHF_AE_IFLNK)
            archive_entry_set_perm(entry, 0o777)
            archive_entry_set_symlink(entry, target)
        case .hardlink(let target):
            archive_entry_set_filetype(entry, HRHF_AE_IFREG)
            archive_entry_set_perm(entry, 0o644)
            archive_entry_set_hardlink(entry, target)
        case .characterDevice:
            archive_entry_set_filetype(entry, HRHF_AE_IFCHR)
            archive_entry_set_perm(entry, 0o600)
        }
        guard archive_write_header(a, entry) == ARCHIVE_OK else {
            throw PackError(file: url.path, entry: name, "cannot write header: \(String(cString: archive_error_string(a)))")
        }
        if case .file = kind, !data.isEmpty {
            let written = data.withUnsafeBytes { archive_write_data(a, $0.baseAddress, $0.count) }
            guard written == data.count else {
                throw PackError(file: url.path, entry: name, "cannot write data: \(String(cString: archive_error_string(a)))")
            }
        }
    }

    /// Closes the archive and renames it into place.
    public func finish() throws {
        guard let a = handle else { return }
        handle = nil
        let closed = archive_write_close(a)
        archive_write_free(a)
        let synced = close(descriptor) == 0
        guard closed == ARCHIVE_OK, synced else {
            unlink(partial)
            throw PackError(file: url.path, "cannot finish the archive")
        }
        try finishPartialFile(partial, as: url)
    }
}

/// A pack read into memory and checked: entries named safely, no links or devices, sizes
/// bounded, no duplicates, a known manifest first and every checksum right.
public struct SyntheticPack {
    public let url: URL
    public let manifest: PackManifest
    public let files: [String: Data]

    /// Entries larger than this are refused (images of a pack are far smaller).
    public static let defaultEntryLimit = 64 << 20

    /// Reads and verifies a pack. Any problem throws, naming the pack and the entry.
    public init(url: URL, entryLimit: Int = SyntheticPack.defaultEntryLimit) throws {
        self.url = url
        let path = url.path
        let reader = try ArchiveReader(path: path, format: .tar)
        var files: [String: Data] = [:]
        var order: [String] = []
        while let entry = try reader.next() {
            let name = entry.name
            try Self.checkName(name, pack: path)
            switch entry.kind {
            case .file: break
            case .directory: continue
            case .symlink, .hardlink: throw PackError(file: path, entry: name, "links are not allowed in a pack")
            case .other: throw PackError(file: path, entry: name, "device or special entries are not allowed in a pack")
            }
            guard entry.size <= Int64(entryLimit) else {
                throw PackError(file: path, entry: name, "\(entry.size) bytes is over the limit of \(entryLimit)")
            }
            guard files[name] == nil else { throw PackError(file: path, entry: name, "appears twice") }
            files[name] = try reader.readData(entry: name, limit: entryLimit)
            order.append(name)
        }
        guard order.first == "manifest.json", let manifestData = files["manifest.json"] else {
            throw PackError(file: path, entry: "manifest.json", "missing, or not the first entry")
        }
        let probe = try? JSONSerialization.jsonObject(with: manifestData) as? [String: Any]
        guard let probe, probe["format"] as? String == PackManifest.formatName else {
            throw PackError(file: path, entry: "manifest.json", "not a synthetic-pack manifest")
        }
        guard let version = probe["formatVersion"] as? Int, version <= PackManifest.currentVersion else {
            throw PackError(file: path, entry: "manifest.json",
                            "format version \(probe["formatVersion"] ?? "none") is not one this toolkit reads (up to \(PackManifest.currentVersion))")
        }
        do {
            manifest = try JSONDecoder().decode(PackManifest.self, from: manifestData)
        } catch {
            throw PackError(file: path, entry: "manifest.json", "does not follow the manifest schema: \(error)")
        }
        guard order.last == "SHA256SUMS", let sums = files["SHA256SUMS"] else {
            throw PackError(file: path, entry: "SHA256SUMS", "missing, or not the last entry")
        }
        var listed = Set<String>()
        for line in String(decoding: sums, as: UTF8.self).split(separator: "\n") {
            let parts = line.split(separator: " ", maxSplits: 1).map(String.init)
            guard parts.count == 2 else { throw PackError(file: path, entry: "SHA256SUMS", "malformed line: \(line)") }
            let name = parts[1].trimmingCharacters(in: .whitespaces)
            guard let data = files[name] else { throw PackError(file: path, entry: name, "listed in SHA256SUMS but absent") }
            guard sha256Hex(data) == parts[0] else { throw PackError(file: path, entry: name, "checksum mismatch: the entry is damaged") }
            listed.insert(name)
        }
        for name in order where name != "SHA256SUMS" && !listed.contains(name) {
            throw PackError(file: path, entry: name, "not listed in SHA256SUMS")
        }
        for record in manifest.images {
            for name in [record.image, record.label] where files[name] == nil {
                throw PackError(file: path, entry: name, "named by the manifest but absent")
            }
        }
        self.files = files
    }

    /// Rejects absolute paths, `..` components and empty names.
    static func checkName(_ name: String, pack: String) throws {
        guard !name.isEmpty, !name.hasPrefix("/") else { throw PackError(file: pack, entry: name, "absolute paths are not allowed") }
        if name.split(separator: "/", omittingEmptySubsequences: false).contains(where: { $0 == ".." }) {
            throw PackError(file: pack, entry: name, "paths with .. are not allowed")
        }
    }

    public func image(_ record: SynthesisRecord) throws -> RGBImage {
        try ImageIO.decodeRGB(files[record.image]!, name: "\(url.path): \(record.image)")
    }

    public func label(_ record: SynthesisRecord) throws -> IndexMask {
        try ImageIO.decodeIndexPNG(files[record.label]!, name: "\(url.path): \(record.label)")
    }

    /// Writes a pack: manifest first, then each record's image and label, SHA256SUMS last.
    public static func write(manifest: PackManifest, files: (String) throws -> Data, to url: URL) throws {
        let writer = try TarWriter(url: url)
        var sums: [String] = []
        func add(_ name: String, _ data: Data) throws {
            try writer.add(name, data)
            sums.append("\(sha256Hex(data))  \(name)")
        }
        try add("manifest.json", try manifest.encoded())
        for record in manifest.images.sorted(by: { $0.index < $1.index }) {
            try add(record.image, try files(record.image))
            try add(record.label, try files(record.label))
        }
        try writer.add("SHA256SUMS", Data((sums.joined(separator: "\n") + "\n").utf8))
        try writer.finish()
    }

    /// Joins shard parts into the pack a single run gives: same generator, teacher and seed,
    /// disjoint images that together make the whole count.
    public static func merge(_ parts: [SyntheticPack], to url: URL) throws -> PackManifest {
        guard let first = parts.first else { throw PackError(file: url.path, "no parts to merge") }
        var records: [SynthesisRecord] = []
        var files: [String: Data] = [:]
        for part in parts {
            let m = part.manifest
            guard m.generator == first.manifest.generator, m.teacher == first.manifest.teacher, m.classes == first.manifest.classes else {
                throw PackError(file: part.url.path, entry: "manifest.json", "made with other options, teacher or seed than \(first.url.lastPathComponent)")
            }
            for r in m.images {
                guard files[r.image] == nil else { throw PackError(file: part.url.path, entry: r.image, "also in another part") }
                files[r.image] = part.files[r.image]
                files[r.label] = part.files[r.label]
                records.append(r)
            }
        }
        records.sort { $0.index < $1.index }
        guard records.count == first.manifest.generator.count, records.map(\.index) == Array(0..<records.count) else {
            throw PackError(file: url.path, "the parts hold \(records.count) of \(first.manifest.generator.count) images: a shard is missing")
        }
        var manifest = first.manifest
        manifest.shard = nil
        manifest.images = records
        manifest.quality = SynthesisQuality(records: records, imagesPerMinute: nil)
        try write(manifest: manifest, files: { files[$0]! }, to: url)
        return manifest
    }
}
