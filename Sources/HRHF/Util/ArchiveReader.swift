import CArchive
import Foundation

/// A failure reading an archive (zip checkpoint or tar pack), naming the file and entry.
public struct ArchiveError: Error, CustomStringConvertible, Equatable {
    public var file: String
    public var entry: String?
    public var problem: String

    public init(file: String, entry: String? = nil, _ problem: String) {
        self.file = file
        self.entry = entry
        self.problem = problem
    }

    public var description: String {
        entry.map { "\(file): entry \($0): \(problem)" } ?? "\(file): \(problem)"
    }
}

/// Sequential reading of a zip or tar archive through libarchive.
public final class ArchiveReader {
    public enum Format { case zip, tar }

    public enum EntryKind: Equatable {
        case file, directory, symlink, hardlink
        case other(UInt32)
    }

    public struct Entry {
        public var name: String
        public var kind: EntryKind
        public var size: Int64
    }

    /// Bytes one archive may give in all, by default (a VOC-scale pack or a ResNet-101
    /// checkpoint is far below it; a compression bomb is not).
    public static let defaultTotalLimit = 16 << 30

    public let path: String
    private let handle: OpaquePointer
    /// Bytes the whole archive may give; with `bytesRead`, what is left of that budget.
    public let totalLimit: Int
    public private(set) var bytesRead = 0
    /// Bytes the archive may give as a multiple of its size on disk, and that size.
    public let maxExpansion: Int?
    public private(set) var archiveBytes = 0
    /// Allowance on top of `maxExpansion` times the archive's size, so small archives of
    /// small entries always read.
    public static let expansionSlack = 16 << 20

    /// `totalLimit` bounds the data of all entries together (decompressed, for zip);
    /// `maxExpansion`, if given, bounds it to that many times the archive's size plus
    /// `expansionSlack`, which stops a compression bomb after a few times its own size.
    public init(
        path: String, format: Format, totalLimit: Int = ArchiveReader.defaultTotalLimit,
        maxExpansion: Int? = nil
    ) throws {
        self.path = path
        self.totalLimit = totalLimit
        self.maxExpansion = maxExpansion
        guard FileManager.default.fileExists(atPath: path) else { throw ArchiveError(file: path, "no such file") }
        var info = stat()
        guard stat(path, &info) == 0, let size = Int(exactly: info.st_size) else {
            throw ArchiveError(file: path, "cannot read its size: \(String(cString: strerror(errno)))")
        }
        archiveBytes = size
        guard let a = archive_read_new() else { throw ArchiveError(file: path, "libarchive could not start") }
        switch format {
        case .zip: archive_read_support_format_zip(a)
        case .tar: archive_read_support_format_tar(a)
        }
        archive_read_support_filter_none(a)
        if archive_read_open_filename(a, path, 1 << 16) != ARCHIVE_OK {
            let message = Self.message(a)
            archive_read_free(a)
            throw ArchiveError(file: path, "not a readable \(format) archive: \(message)")
        }
        // Set only now: once every property is set, a throw runs deinit, which frees the handle.
        handle = a
    }

    deinit { archive_read_free(handle) }

    private static func message(_ a: OpaquePointer) -> String {
        archive_error_string(a).map { String(cString: $0) } ?? "unknown error"
    }

    /// The next entry's header, or nil at the end.
    public func next() throws -> Entry? {
        var entry: OpaquePointer?
        let status = archive_read_next_header(handle, &entry)
        if status == ARCHIVE_EOF { return nil }
        guard status == ARCHIVE_OK || status == ARCHIVE_WARN, let entry else {
            throw ArchiveError(file: path, "corrupt archive: \(Self.message(handle))")
        }
        let name = archive_entry_pathname(entry).map { String(cString: $0) } ?? ""
        // A sparse entry declares far more bytes than the archive holds: refused unread.
        guard archive_entry_sparse_count(entry) == 0 else {
            throw ArchiveError(file: path, entry: name, "sparse entries are not allowed")
        }
        let type = UInt32(archive_entry_filetype(entry))
        var kind: EntryKind
        switch type & HRHF_AE_IFMT {
        case HRHF_AE_IFREG: kind = .file
        case HRHF_AE_IFDIR: kind = .directory
        case HRHF_AE_IFLNK: kind = .symlink
        default: kind = .other(type)
        }
        if archive_entry_hardlink(entry) != nil { kind = .hardlink }
        if archive_entry_symlink(entry) != nil { kind = .symlink }
        return Entry(
            name: name, kind: kind, size: archive_entry_size_is_set(entry) != 0 ? archive_entry_size(entry) : -1)
    }

    /// The current entry's data, at most `limit` bytes (more is an error naming the entry).
    public func readData(entry: String, limit: Int) throws -> Data {
        var data = Data()
        var buffer = [UInt8](repeating: 0, count: 1 << 16)
        while true {
            let n = buffer.withUnsafeMutableBytes { archive_read_data(handle, $0.baseAddress, $0.count) }
            if n == 0 { break }
            guard n > 0 else {
                throw ArchiveError(file: path, entry: entry, "cannot read data: \(Self.message(handle))")
            }
            guard data.count + n <= limit else {
                throw ArchiveError(file: path, entry: entry, "larger than the limit of \(limit) bytes")
            }
            guard bytesRead + n <= totalLimit else {
                throw ArchiveError(
                    file: path, entry: entry,
                    "the archive gives more than its limit of \(totalLimit) bytes in all")
            }
            if let maxExpansion {
                let (scaled, o1) = archiveBytes.multipliedReportingOverflow(by: maxExpansion)
                let (allowed, o2) = scaled.addingReportingOverflow(Self.expansionSlack)
                guard o1 || o2 || bytesRead + n <= allowed else {
                    throw ArchiveError(
                        file: path, entry: entry,
                        "expands past \(maxExpansion) times the archive's \(archiveBytes) bytes "
                            + "(plus \(Self.expansionSlack >> 20) MiB): a compression bomb")
                }
            }
            bytesRead += n
            data.append(contentsOf: buffer[0..<n])
        }
        return data
    }
}
