import Foundation

/// A pack as a PASCAL VOC folder that MiB's and PLOP's `VOCSegmentation` read unchanged:
/// `JPEGImages/NNNNNN.png` (PNG bytes; PIL opens an image by its content, not its extension),
/// `SegmentationClass/` and `SegmentationClassAug/` (the same VOC-palette labels: MiB's training
/// list names the second and asserts that it exists), `ImageSets/Segmentation/train.txt` (VOC's
/// list of ids) and `splits/train.txt`, `splits/train_aug.txt` (MiB's lists of
/// `/JPEGImages/ID.png /SegmentationClass[Aug]/ID.png` lines), and PLOP's `list/train.txt`,
/// `list/train_aug.txt`, whose image paths PLOP joins under `VOCdevkit/VOC2012/` (so they climb
/// out of those two empty folders: `/../../JPEGImages/ID.png`). The toolkit encodes no JPEG, so
/// images are PNG only.
public enum VOCExport {
    /// Written first: names the exported pack, so a second export into the folder is told apart
    /// from another pack's files or a real dataset's, which are never mixed with this one's.
    public static let markerName = "hrhf-pack-export.txt"
    public static let folders = [
        "JPEGImages", "SegmentationClass", "SegmentationClassAug", "ImageSets",
        "ImageSets/Segmentation", "splits", "list", "VOCdevkit", "VOCdevkit/VOC2012",
    ]

    static func marker(_ pack: SyntheticPack) throws -> Data {
        guard let manifest = pack.files["manifest.json"] else {
            throw PackError(file: pack.url.path, entry: "manifest.json", "missing")
        }
        return Data("hrhf-synthetic-pack export\nmanifest-sha256 \(sha256Hex(manifest))\n".utf8)
    }

    /// The record's six-to-nine-digit id, from its verified index (never from a name in the manifest).
    static func id(_ record: SynthesisRecord) -> String {
        String(SyntheticPack.entryName("", record.index).dropFirst().dropLast(4))
    }

    /// Refuses a folder that holds anything but an export of this pack; creates the folders.
    static func prepare(_ dir: URL, marker: Data) throws {
        var info = stat()
        if lstat(dir.path, &info) == 0 {
            guard (info.st_mode & S_IFMT) == S_IFDIR else {
                throw FileError(file: dir.path, "exists and is not a folder (a link or a file)")
            }
            let markerURL = dir.appendingPathComponent(markerName)
            let contents = try FileManager.default.contentsOfDirectory(atPath: dir.path)
            if !contents.isEmpty {
                guard contents.contains(markerName) else {
                    throw FileError(
                        file: dir.path,
                        "holds files that are not an export of this pack (no "
                            + "\(markerName)): export into an empty or new folder rather than mix")
                }
                let existing = try readInputFile(markerURL, limit: 4096)
                guard existing == marker else {
                    throw FileError(
                        file: markerURL.path,
                        "names another pack: export into an empty or new folder "
                            + "rather than mix two packs")
                }
            }
        } else {
            try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        }
        for folder in folders {
            let url = dir.appendingPathComponent(folder)
            if lstat(url.path, &info) == 0 {
                guard (info.st_mode & S_IFMT) == S_IFDIR else {
                    throw FileError(file: url.path, "exists and is not a folder (a link or a file)")
                }
            } else if mkdir(url.path, 0o755) != 0 {
                throw FileError(file: url.path, "cannot create: \(String(cString: strerror(errno)))")
            }
        }
    }

    /// Writes `pack` under `dir`, every file atomically; returns the ids in list order.
    @discardableResult
    public static func write(_ pack: SyntheticPack, to dir: URL) throws -> [String] {
        let marker = try marker(pack)
        try prepare(dir, marker: marker)
        try writeAtomically(marker, to: dir.appendingPathComponent(markerName))
        let records = pack.manifest.images.sorted { $0.index < $1.index }
        for record in records {
            let id = id(record)
            // Re-encoded from the decoded, checked pixels: RGB images and VOC-palette labels.
            let image = try ImageIO.encodePNG(try pack.image(record), name: record.image)
            let label = try ImageIO.encodePalettePNG(try pack.label(record), name: record.label)
            try writeAtomically(image, to: dir.appendingPathComponent("JPEGImages/\(id).png"))
            try writeAtomically(label, to: dir.appendingPathComponent("SegmentationClass/\(id).png"))
            try writeAtomically(label, to: dir.appendingPathComponent("SegmentationClassAug/\(id).png"))
        }
        let ids = records.map(id)
        func list(_ line: (String) -> String) -> Data { Data(ids.map { line($0) + "\n" }.joined().utf8) }
        try writeAtomically(list { $0 }, to: dir.appendingPathComponent("ImageSets/Segmentation/train.txt"))
        try writeAtomically(
            list { "/JPEGImages/\($0).png /SegmentationClass/\($0).png" },
            to: dir.appendingPathComponent("splits/train.txt"))
        try writeAtomically(
            list { "/JPEGImages/\($0).png /SegmentationClassAug/\($0).png" },
            to: dir.appendingPathComponent("splits/train_aug.txt"))
        try writeAtomically(
            list { "/../../JPEGImages/\($0).png /SegmentationClass/\($0).png" },
            to: dir.appendingPathComponent("list/train.txt"))
        try writeAtomically(
            list { "/../../JPEGImages/\($0).png /SegmentationClassAug/\($0).png" },
            to: dir.appendingPathComponent("list/train_aug.txt"))
        return ids
    }
}

/// Reads a regular file of at most `limit` bytes, never through a link, its size checked from
/// the open descriptor before anything is allocated (O_NONBLOCK: opening a FIFO must not hang).
func readInputFile(_ url: URL, limit: Int) throws -> Data {
    let fd = open(url.path, O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC)
    guard fd >= 0 else { throw FileError(file: url.path, "cannot open: \(String(cString: strerror(errno)))") }
    defer { close(fd) }
    var info = stat()
    guard fstat(fd, &info) == 0, (info.st_mode & S_IFMT) == S_IFREG else {
        throw FileError(file: url.path, "not a regular file")
    }
    guard let size = Int(exactly: info.st_size), size <= limit else {
        throw FileError(file: url.path, "\(info.st_size) bytes is over the limit of \(limit)")
    }
    var data = Data(count: size)
    var offset = 0
    try data.withUnsafeMutableBytes { raw in
        while offset < size {
            let n = read(fd, raw.baseAddress! + offset, size - offset)
            if n < 0, errno == EINTR { continue }
            guard n > 0 else { throw FileError(file: url.path, "cannot read: the file shrank or failed") }
            offset += n
        }
    }
    return data
}
