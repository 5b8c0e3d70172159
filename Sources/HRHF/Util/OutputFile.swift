import Foundation

/// A failure creating or finishing an output file, naming the file.
public typealias OutputError = FileError

/// Creates `url.partial` for writing: exclusively (`O_EXCL`) and never through a link
/// (`O_NOFOLLOW`), so a link planted at that name cannot redirect the write. A regular file left
/// there by an interrupted run is removed first; anything else there is an error.
/// Returns the partial path and its open descriptor.
public func createPartialFile(for url: URL) throws -> (path: String, descriptor: Int32) {
    let partial = url.path + ".partial"
    var info = stat()
    if lstat(partial, &info) == 0 {
        guard (info.st_mode & S_IFMT) == S_IFREG else {
            throw OutputError(file: partial, "exists and is not a regular file (a link or a folder): remove it first")
        }
        unlink(partial)
    }
    let fd = open(partial, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0o644)
    guard fd >= 0 else {
        throw OutputError(file: partial, "cannot create: \(String(cString: strerror(errno)))")
    }
    return (partial, fd)
}

/// Renames a finished partial file over `url` in one step (rename(2) replaces a link at `url`
/// itself, never its target); on failure the partial file is removed.
public func finishPartialFile(_ partial: String, as url: URL) throws {
    guard rename(partial, url.path) == 0 else {
        let reason = String(cString: strerror(errno))
        unlink(partial)
        throw OutputError(file: url.path, "cannot rename the finished file into place: \(reason)")
    }
}

/// Writes `data` to `url.partial`, then renames it over `url`, so a reader never sees half a file.
public func writeAtomically(_ data: Data, to url: URL) throws {
    let (partial, fd) = try createPartialFile(for: url)
    var failure: String?
    data.withUnsafeBytes { raw in
        var offset = 0
        while offset < raw.count {
            let n = write(fd, raw.baseAddress! + offset, raw.count - offset)
            if n < 0 {
                if errno == EINTR { continue }
                failure = String(cString: strerror(errno))
                return
            }
            offset += n
        }
    }
    if close(fd) != 0, failure == nil { failure = String(cString: strerror(errno)) }
    if let failure {
        unlink(partial)
        throw OutputError(file: url.path, "cannot write: \(failure)")
    }
    try finishPartialFile(partial, as: url)
}
