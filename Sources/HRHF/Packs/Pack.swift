import CArchive
import Foundation

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

    public enum Kind {
        case file, directory
        case symlink(String)
        case hardlink(String)
        case characterDevice
    }

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
            throw PackError(
                file: url.path, entry: name, "cannot write header: \(String(cString: archive_error_string(a)))")
        }
        if case .file = kind, !data.isEmpty {
            let written = data.withUnsafeBytes { archive_write_data(a, $0.baseAddress, $0.count) }
            guard written == data.count else {
                throw PackError(
                    file: url.path, entry: name, "cannot write data: \(String(cString: archive_error_string(a)))")
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

/// A pack read into memory and checked by the rules the Python reader (tools/hrhf_pack.py)
/// shares: entry names whitelisted, only regular files, sizes bounded from the headers, the
/// manifest first and consistent with its teacher, every image and label named by a record and
/// of the manifest's resolution (from its IHDR), SHA256SUMS last and every checksum right.
/// After `init` every field of `manifest` other code relies on holds; label values are checked
/// when a label is decoded (`label(_:)`, `verifyImages()`).
public struct SyntheticPack {
    public let url: URL
    public let manifest: PackManifest
    public let files: [String: Data]

    /// Entries larger than this are refused from their header (a 4096-pixel image is 48 MiB raw).
    public static let defaultEntryLimit = 64 << 20
    /// Largest `resolution` a pack may declare (synthesis runs at 128 to 512).
    public static let maxResolution = 4096
    /// Labels are 8-bit PNGs whose 255 means ignore, so a teacher has at most 255 classes.
    public static let maxTeacherClasses = 255

    /// Reads and verifies a pack. Any problem throws, naming the pack and the entry (or field).
    public init(
        url: URL, entryLimit: Int = SyntheticPack.defaultEntryLimit,
        totalLimit: Int = ArchiveReader.defaultTotalLimit
    ) throws {
        self.url = url
        let path = url.path
        let reader = try ArchiveReader(path: path, format: .tar, totalLimit: totalLimit)
        var files: [String: Data] = [:]
        var manifest: PackManifest?
        var recordOfEntry: [String: SynthesisRecord] = [:]
        var sumsSeen = false
        while let entry = try reader.next() {
            let name = entry.name
            if let problem = Self.nameProblem(name) { throw PackError(file: path, entry: name, problem) }
            switch entry.kind {
            case .file: break
            case .directory: throw PackError(file: path, entry: name, "directories are not allowed in a pack")
            case .symlink, .hardlink: throw PackError(file: path, entry: name, "links are not allowed in a pack")
            case .other: throw PackError(file: path, entry: name, "device or special entries are not allowed in a pack")
            }
            guard entry.size <= Int64(entryLimit) else {
                throw PackError(file: path, entry: name, "\(entry.size) bytes is over the limit of \(entryLimit)")
            }
            guard files[name] == nil else { throw PackError(file: path, entry: name, "appears twice") }
            guard !sumsSeen else {
                throw PackError(file: path, entry: "SHA256SUMS", "not the last entry: \(name) follows it")
            }
            if manifest == nil, name != "manifest.json" {
                throw PackError(file: path, entry: "manifest.json", "missing, or not the first entry (\(name) is)")
            }
            let record = recordOfEntry[name]
            if name.hasPrefix("images/") || name.hasPrefix("labels/"), record == nil {
                throw PackError(file: path, entry: name, "not named by any record of the manifest")
            }
            let data = try reader.readData(entry: name, limit: entryLimit)
            files[name] = data
            if name == "manifest.json" {
                let checked = try Self.checkedManifest(data, pack: path)
                for r in checked.images {
                    recordOfEntry[r.image] = r
                    recordOfEntry[r.label] = r
                }
                manifest = checked
            } else if name == "SHA256SUMS" {
                sumsSeen = true
            } else if let record, let manifest {
                try Self.checkHeader(
                    data, entry: name, isLabel: name == record.label,
                    resolution: manifest.generator.options.resolution, pack: path)
            }
        }
        guard let manifest else { throw PackError(file: path, entry: "manifest.json", "missing: the pack is empty") }
        guard sumsSeen, let sums = files["SHA256SUMS"] else {
            throw PackError(file: path, entry: "SHA256SUMS", "missing, or not the last entry")
        }
        try Self.checkSums(sums, files: files, pack: path)
        for record in manifest.images {
            for name in [record.image, record.label] where files[name] == nil {
                throw PackError(file: path, entry: name, "named by the manifest but absent")
            }
        }
        self.manifest = manifest
        self.files = files
    }

    /// Why `name` is not a pack entry name, or nil: only manifest.json, SHA256SUMS,
    /// images/D.png and labels/D.png (D six to nine digits) are.
    static func nameProblem(_ name: String) -> String? {
        if name == "manifest.json" || name == "SHA256SUMS" { return nil }
        let parts = name.split(separator: "/", omittingEmptySubsequences: false)
        if parts.count == 2, parts[0] == "images" || parts[0] == "labels", parts[1].hasSuffix(".png") {
            let digits = parts[1].utf8.dropLast(4)
            if (6...9).contains(digits.count), digits.allSatisfy({ (0x30...0x39).contains($0) }) { return nil }
        }
        // Printable ASCII only: no control characters, no bytes that are not UTF-8 (read as U+FFFD),
        // and no Unicode that compares equal to another spelling.
        let unreadable = !name.utf8.allSatisfy { (0x20..<0x7F).contains($0) }
        let reason: String
        if name.hasPrefix("/") {
            reason = "absolute paths are not allowed"
        } else if parts.contains("..") {
            reason = "paths with .. are not allowed"
        } else if parts.contains(".") || parts.contains("") {
            reason = "paths with . or empty components are not allowed"
        } else if unreadable {
            reason = "control characters or bytes outside printable ASCII are not allowed"
        } else {
            reason = "not a pack entry name"
        }
        return reason + " (a pack holds only manifest.json, images/NNNNNN.png, labels/NNNNNN.png and SHA256SUMS)"
    }

    /// SHA256SUMS: lines of 64 lowercase hex digits, two spaces and a name; every other entry
    /// listed exactly once, nothing else listed, every checksum right.
    static func checkSums(_ sums: Data, files: [String: Data], pack: String) throws {
        let bytes = [UInt8](sums)
        guard bytes.last == 0x0A else {
            throw PackError(file: pack, entry: "SHA256SUMS", "does not end with a line feed")
        }
        var listed = Set<String>()
        for (number, line) in bytes.dropLast().split(separator: 0x0A, omittingEmptySubsequences: false).enumerated() {
            let line = Array(line)
            let hex = line.prefix(64)
            guard line.count > 66, hex.allSatisfy(isLowerHex), line[64] == 0x20, line[65] == 0x20 else {
                throw PackError(
                    file: pack, entry: "SHA256SUMS",
                    "line \(number + 1) is not 64 lowercase hex digits, two spaces and a name")
            }
            let name = String(decoding: line[66...], as: UTF8.self)
            guard name != "SHA256SUMS", let data = files[name] else {
                throw PackError(file: pack, entry: name, "listed in SHA256SUMS but not an entry of the pack")
            }
            guard listed.insert(name).inserted else {
                throw PackError(file: pack, entry: name, "listed twice in SHA256SUMS")
            }
            guard sha256Hex(data) == String(decoding: hex, as: UTF8.self) else {
                throw PackError(file: pack, entry: name, "checksum mismatch: the entry is damaged")
            }
        }
        for name in files.keys.sorted() where name != "SHA256SUMS" && !listed.contains(name) {
            throw PackError(file: pack, entry: name, "not listed in SHA256SUMS")
        }
    }

    /// JSON values a manifest may hold: a record has about 28, so this serves 150,000 images,
    /// while decoding stays within 250 MB (measured: 231 MB at the limit; a 60 MB list of 30M
    /// zeros took 2.4 GB and 22 s through JSONSerialization).
    static let maxManifestValues = 1 << 22
    /// Nesting a manifest may have (it has 5 levels).
    static let maxManifestDepth = 32

    /// Keys one JSON object of a manifest may hold (its largest object, the options, has 21).
    static let maxObjectKeys = 4096

    /// Counts the values, the nesting and each object's keys of JSON text without decoding it,
    /// so neither a flood of tiny values nor deep nesting reaches the decoder, and refuses a key
    /// given twice in one object (a decoder would keep one of them silently).
    static func checkJSONSize(_ data: Data, pack: String) throws {
        func refuse(_ problem: String) -> PackError { PackError(file: pack, entry: "manifest.json", problem) }
        struct Level {
            var isObject: Bool
            var keys: Set<[UInt8]> = []
            var expectsKey: Bool
        }
        try data.withUnsafeBytes { (bytes: UnsafeRawBufferPointer) in
            var levels: [Level] = [], values = 1
            var stringStart: Int?, escaped = false
            for (i, byte) in bytes.enumerated() {
                if let start = stringStart {
                    if escaped {
                        escaped = false
                    } else if byte == 0x5C {
                        escaped = true
                    } else if byte == 0x22 {
                        stringStart = nil
                        if let last = levels.indices.last, levels[last].isObject, levels[last].expectsKey {
                            let key = [UInt8](bytes[(start + 1)..<i])
                            guard levels[last].keys.insert(key).inserted else {
                                let shown = String(decoding: key, as: UTF8.self)
                                throw refuse("the key \"\(shown)\" appears twice in one object")
                            }
                            guard levels[last].keys.count <= maxObjectKeys else {
                                throw refuse("an object of more than \(maxObjectKeys) keys")
                            }
                            levels[last].expectsKey = false
                        }
                    }
                    continue
                }
                switch byte {
                case 0x22: stringStart = i
                case 0x5B, 0x7B:
                    levels.append(Level(isObject: byte == 0x7B, expectsKey: byte == 0x7B))
                    guard levels.count <= maxManifestDepth else {
                        throw refuse("nested deeper than \(maxManifestDepth) levels")
                    }
                case 0x5D, 0x7D: _ = levels.popLast()
                case 0x2C:
                    values += 1
                    guard values <= maxManifestValues else {
                        throw refuse("more than \(maxManifestValues) JSON values")
                    }
                    if let last = levels.indices.last, levels[last].isObject { levels[last].expectsKey = true }
                default: break
                }
            }
        }
    }

    /// The manifest's format and version, read before its schema.
    private struct ManifestHead: Decodable {
        var format: String?
        var formatVersion: Int?
        var versionText: String

        enum CodingKeys: String, CodingKey { case format, formatVersion }

        init(from decoder: Decoder) throws {
            let c = try decoder.container(keyedBy: CodingKeys.self)
            format = try? c.decode(String.self, forKey: .format)
            formatVersion = try? c.decode(Int.self, forKey: .formatVersion)
            let number =
                formatVersion.map { "\($0)" }
                ?? (try? c.decode(Double.self, forKey: .formatVersion)).map { "\($0)" }
            versionText = number ?? "none"
        }
    }

    static func isLowerHex(_ byte: UInt8) -> Bool { (0x30...0x39).contains(byte) || (0x61...0x66).contains(byte) }

    /// The manifest, decoded and checked field by field against itself and its teacher card.
    static func checkedManifest(_ data: Data, pack: String) throws -> PackManifest {
        func refuse(_ field: String, _ problem: String) -> PackError {
            PackError(file: pack, entry: "manifest.json", "field \(field): \(problem)")
        }
        try checkJSONSize(data, pack: pack)
        let head = try? JSONDecoder().decode(ManifestHead.self, from: data)
        guard let head, head.format == PackManifest.formatName else {
            throw PackError(file: pack, entry: "manifest.json", "not a synthetic-pack manifest")
        }
        guard let version = head.formatVersion, (1...PackManifest.currentVersion).contains(version) else {
            throw PackError(
                file: pack, entry: "manifest.json",
                "format version \(head.versionText) is not one this "
                    + "toolkit reads (1 to \(PackManifest.currentVersion))")
        }
        do {
            let decoder = JSONDecoder()
            decoder.userInfo[ManifestFieldCheck.shapeKey] = ManifestShape.version1
            _ = try decoder.decode(ManifestFieldCheck.self, from: data)
        } catch let unknown as ManifestFieldCheck.UnknownField {
            throw refuse(unknown.field, "unknown field (fields are added only with a new formatVersion)")
        } catch {
            throw PackError(file: pack, entry: "manifest.json", "does not follow the manifest schema: \(error)")
        }
        let m: PackManifest
        do {
            m = try JSONDecoder().decode(PackManifest.self, from: data)
        } catch {
            throw PackError(file: pack, entry: "manifest.json", "does not follow the manifest schema: \(error)")
        }
        guard m.teacher.sha256.utf8.count == 64, m.teacher.sha256.utf8.allSatisfy(isLowerHex) else {
            throw refuse("teacher.sha256", "not 64 lowercase hex digits")
        }
        // The card as a model file's card is checked (format, version, architecture, classes for
        // outputs, normalisation), its output count summed without overflow first.
        var outputs = 0
        for n in m.teacher.card.architecture.classesPerStep {
            let (sum, overflow) = outputs.addingReportingOverflow(n)
            guard n >= 1, !overflow else {
                throw refuse(
                    "teacher.card.architecture.classesPerStep",
                    "\(n) is not a positive count, or the sum overflows")
            }
            outputs = sum
        }
        do {
            try m.teacher.card.validate(file: pack)
        } catch let e as WeightFileError {
            throw refuse(e.key.map { "teacher.card.\($0)" } ?? "teacher.card", e.problem)
        }
        let teacherClasses = m.teacher.card.classes
        guard (1...maxTeacherClasses).contains(teacherClasses.count) else {
            throw refuse("teacher.card.classes", "\(teacherClasses.count) classes, not 1 to \(maxTeacherClasses)")
        }
        var packClasses = Set<Int>()
        for (i, c) in m.classes.enumerated() {
            let field = "classes[\(i)]"
            guard c.id != 0 else { throw refuse(field, "background (0) is not a pack class") }
            guard c.id > 0, c.id < teacherClasses.count else {
                throw refuse(field, "\(c.id) is not a class of the teacher (0 to \(teacherClasses.count - 1))")
            }
            guard c.name == teacherClasses[c.id].name else {
                let teacherName = teacherClasses[c.id].name
                throw refuse(field, "\(c.id) is named \"\(c.name)\" but the teacher calls it \"\(teacherName)\"")
            }
            guard packClasses.insert(c.id).inserted else { throw refuse(field, "class \(c.id) is listed twice") }
        }
        guard !packClasses.isEmpty else { throw refuse("classes", "no classes") }
        // hrhf-synth draws 1 to min(maxClasses, classes) targets: maxClasses may exceed the classes.
        let options = m.generator.options
        guard options.maxClasses >= 1 else {
            throw refuse("generator.options.maxClasses", "\(options.maxClasses), not 1 or more")
        }
        guard (1...maxResolution).contains(options.resolution) else {
            throw refuse("generator.options.resolution", "\(options.resolution), not 1 to \(maxResolution)")
        }
        guard m.generator.count >= 0 else { throw refuse("generator.count", "\(m.generator.count) is negative") }
        if let shard = m.shard {
            guard shard.count >= 1, (1...shard.count).contains(shard.index) else {
                throw refuse("shard", "part \(shard.index) of \(shard.count)")
            }
        } else if m.images.count != m.generator.count {
            throw refuse("images", "\(m.images.count) records, generator.count is \(m.generator.count)")
        }
        var indices = Set<Int>()
        for (i, r) in m.images.enumerated() {
            let field = "images[\(i)]"
            guard r.index >= 0, r.index < m.generator.count, r.index < maxRecordIndex else {
                throw refuse(
                    "\(field).index",
                    "\(r.index), not 0 to generator.count - 1 (\(m.generator.count - 1)) "
                        + "and below \(maxRecordIndex)")
            }
            guard indices.insert(r.index).inserted else { throw refuse("\(field).index", "\(r.index) appears twice") }
            let image = entryName("images", r.index), label = entryName("labels", r.index)
            guard r.image == image, r.label == label else {
                throw refuse(field, "image \"\(r.image)\" and label \"\(r.label)\" are not \(image) and \(label)")
            }
            guard r.targets.count >= 1, r.targets.count <= options.maxClasses, r.targetAreas.count == r.targets.count,
                r.achievedAreas.count == r.targets.count
            else {
                throw refuse(
                    field,
                    "\(r.targets.count) targets, \(r.targetAreas.count) target areas and "
                        + "\(r.achievedAreas.count) achieved areas: not equal, 1 to maxClasses "
                        + "(\(options.maxClasses))")
            }
            for (k, t) in r.targets.enumerated() {
                guard packClasses.contains(t) else {
                    throw refuse("\(field).targets[\(k)]", "\(t) is not a pack class")
                }
                guard !r.targets[..<k].contains(t) else { throw refuse("\(field).targets[\(k)]", "\(t) appears twice") }
            }
            let areas =
                r.targetAreas.enumerated().map { ("targetAreas[\($0.offset)]", $0.element) }
                + r.achievedAreas.enumerated().map { ("achievedAreas[\($0.offset)]", $0.element) }
                + [("absentMaxArea", r.absentMaxArea), ("teacherConfidence", r.teacherConfidence)]
            for (name, value) in areas where !(0...1).contains(value) {
                throw refuse("\(field).\(name)", "\(value) is outside [0, 1]")
            }
        }
        return m
    }

    /// Entry names have six to nine digits, so record indices are below this.
    static let maxRecordIndex = 1_000_000_000

    /// `folder/NNNNNN.png`: the index zero-padded to six digits (no printf, whose %d is 32-bit).
    static func entryName(_ folder: String, _ index: Int) -> String {
        let digits = String(index)
        return "\(folder)/\(String(repeating: "0", count: max(0, 6 - digits.count)))\(digits).png"
    }

    /// An image or label entry's IHDR: 8-bit, a colour type the decoder takes, and the
    /// manifest's resolution on both sides (so images and labels match), read before decoding.
    static func checkHeader(_ data: Data, entry: String, isLabel: Bool, resolution: Int, pack: String) throws {
        let header: PNGHeader
        do { header = try PNGHeader(data, name: entry) } catch let e as ImageError {
            throw PackError(file: pack, entry: entry, e.problem)
        }
        let colourTypes = isLabel ? [0, 3] : [0, 2, 3, 4, 6]
        guard !header.interlaced else {
            throw PackError(file: pack, entry: entry, "an interlaced PNG: packs hold plain ones")
        }
        guard header.bitDepth == 8, colourTypes.contains(header.colorType) else {
            let expected = isLabel ? "a label is an 8-bit palette or grey PNG" : "an image is an 8-bit PNG"
            throw PackError(
                file: pack, entry: entry,
                "a \(header.bitDepth)-bit PNG of colour type \(header.colorType): \(expected)")
        }
        guard header.width == resolution, header.height == resolution else {
            throw PackError(
                file: pack, entry: entry,
                "IHDR gives \(header.width)x\(header.height), the manifest's resolution is \(resolution)")
        }
    }

    /// Decodes an entry as `decode` does, with the pixel budget of the pack's resolution; any
    /// problem (including a size other than the resolution) names the pack and the entry.
    private func decoded<T>(_ entry: String, _ decode: (Data, Int) throws -> T, size: (T) -> (Int, Int)) throws -> T {
        guard let data = files[entry] else { throw PackError(file: url.path, entry: entry, "not an entry of the pack") }
        let side = manifest.generator.options.resolution
        do {
            let value = try decode(data, side * side)
            guard size(value) == (side, side) else {
                throw PackError(file: url.path, entry: entry, "decodes to \(size(value)), not the resolution \(side)")
            }
            return value
        } catch let e as ImageError {
            throw PackError(file: url.path, entry: entry, e.problem)
        }
    }

    public func image(_ record: SynthesisRecord) throws -> RGBImage {
        try decoded(record.image, { try ImageIO.decodeRGB($0, name: record.image, maxPixels: $1) }) {
            ($0.width, $0.height)
        }
    }

    /// The pseudo-label; a value that is neither a class of the teacher nor 255 (ignore) throws.
    public func label(_ record: SynthesisRecord) throws -> IndexMask {
        let mask = try decoded(record.label, { try ImageIO.decodeIndexPNG($0, name: record.label, maxPixels: $1) }) {
            ($0.width, $0.height)
        }
        let classes = manifest.teacher.card.classes.count
        if let i = mask.values.firstIndex(where: { Int($0) >= classes && $0 != 255 }) {
            throw PackError(
                file: url.path, entry: record.label,
                "value \(mask.values[i]) at pixel (\(i % mask.width), "
                    + "\(i / mask.width)) is neither a teacher class (0 to \(classes - 1)) nor 255")
        }
        return mask
    }

    /// Decodes every image and label (what `hrhf-pack verify` adds to the checks of `init`).
    public func verifyImages() throws {
        for record in manifest.images {
            _ = try image(record)
            _ = try label(record)
        }
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
            guard m.generator == first.manifest.generator, m.teacher == first.manifest.teacher,
                m.classes == first.manifest.classes
            else {
                throw PackError(
                    file: part.url.path, entry: "manifest.json",
                    "made with other options, teacher or seed than \(first.url.lastPathComponent)")
            }
            for r in m.images {
                guard files[r.image] == nil else {
                    throw PackError(file: part.url.path, entry: r.image, "also in another part")
                }
                files[r.image] = part.files[r.image]
                files[r.label] = part.files[r.label]
                records.append(r)
            }
        }
        records.sort { $0.index < $1.index }
        guard records.count == first.manifest.generator.count, records.map(\.index) == Array(0..<records.count) else {
            throw PackError(
                file: url.path,
                "the parts hold \(records.count) of \(first.manifest.generator.count) images: a shard is missing")
        }
        var manifest = first.manifest
        manifest.shard = nil
        manifest.images = records
        manifest.quality = SynthesisQuality(records: records, imagesPerMinute: nil)
        try write(
            manifest: manifest,
            files: { name in
                guard let data = files[name] else { throw PackError(file: url.path, entry: name, "in no part") }
                return data
            }, to: url)
        return manifest
    }
}

/// The objects of a version-1 manifest and their fields, derived from the types that encode it
/// (a manifest with every optional field present gives every key), so they cannot drift apart.
indirect enum ManifestShape {
    case object([String: ManifestShape])
    case array(ManifestShape)
    case freeForm, value

    /// Objects whose keys are data, not fields.
    static let freeFormPaths: Set<String> = ["images[].losses", "teacher.card.notes"]

    static let version1: ManifestShape = {
        var card = ModelCard(
            architecture: ArchitectureDescription.presets[0], classNames: ["background", "a"],
            source: SourceInfo(file: "f", sha256: "s", format: "f", flavor: "f"), notes: ["k": "v"])
        card.history[0].note = "n"
        let record = SynthesisRecord(
            index: 0, image: "i", label: "l", targets: [1], targetAreas: [0],
            achievedAreas: [0], absentMaxArea: 0, teacherConfidence: 0, losses: ["k": 0],
            seed: 0, batch: 0)
        var options = InversionOptions()
        options.scaleAwareAggregation = false // recorded only when off
        let sample = PackManifest(
            generator: .init(
                name: "n", version: "v", options: options, seed: 0,
                count: 1),
            teacher: .init(file: "f", sha256: "s", card: card),
            classes: [ClassInfo(id: 1, name: "a")], shard: .init(index: 1, count: 1),
            images: [record],
            quality: SynthesisQuality(records: [record], imagesPerMinute: 1))
        // Encoding a constant value of these types cannot fail.
        return shape(of: try! JSONSerialization.jsonObject(with: try! sample.encoded()), path: "")
    }()

    static func shape(of value: Any, path: String) -> ManifestShape {
        if freeFormPaths.contains(path) { return .freeForm }
        if let object = value as? [String: Any] {
            return .object(
                Dictionary(
                    uniqueKeysWithValues: object.map { key, field in
                        (key, shape(of: field, path: path.isEmpty ? key : "\(path).\(key)"))
                    }))
        }
        if let array = value as? [Any] { return .array(array.first.map { shape(of: $0, path: path + "[]") } ?? .value) }
        return .value
    }
}

/// Decodes nothing: walks a manifest's JSON and throws at the first field its shape does not have.
struct ManifestFieldCheck: Decodable {
    static let shapeKey = CodingUserInfoKey(rawValue: "hrhf.manifestShape")!

    struct UnknownField: Error { var field: String }

    struct AnyKey: CodingKey {
        var stringValue: String, intValue: Int?
        init(stringValue: String) { self.stringValue = stringValue }
        init?(intValue: Int) { return nil }
    }

    init(from decoder: Decoder) throws {
        guard var shape = decoder.userInfo[Self.shapeKey] as? ManifestShape else { return }
        for key in decoder.codingPath {
            switch shape {
            case .object(let fields): shape = fields[key.stringValue] ?? .value
            case .array(let element): shape = element
            case .freeForm, .value: shape = .value
            }
        }
        if let single = try? decoder.singleValueContainer(), single.decodeNil() { return }
        switch shape {
        case .object(let fields):
            let container = try decoder.container(keyedBy: AnyKey.self)
            for key in container.allKeys {
                guard fields[key.stringValue] != nil else {
                    let path = (decoder.codingPath + [key]).map { key in
                        key.intValue.map { "[\($0)]" } ?? ".\(key.stringValue)"
                    }
                    throw UnknownField(field: path.joined().trimmingPrefix("."))
                }
                _ = try container.decode(ManifestFieldCheck.self, forKey: key)
            }
        case .array:
            var container = try decoder.unkeyedContainer()
            while !container.isAtEnd { _ = try container.decode(ManifestFieldCheck.self) }
        case .freeForm, .value:
            return
        }
    }
}
