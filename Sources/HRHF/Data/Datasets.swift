import Foundation

/// A failure reading a dataset, naming the file.
public typealias DatasetError = FileError

/// One image and its label mask (class ids; 255 ignore), already in the dataset's class ids.
public struct SegmentationSample: Sendable {
    public var name: String
    public var image: RGBImage
    public var labels: IndexMask
}

/// Images and masks on disk, by index.
public protocol SegmentationDataset: Sendable {
    var root: URL { get }
    var split: String { get }
    /// Class names, index = id (background first where the dataset has one).
    var classNames: [String] { get }
    var count: Int { get }
    func name(_ index: Int) -> String
    func imageURL(_ index: Int) -> URL
    func maskURL(_ index: Int) -> URL
    /// Mask values mapped to class ids (Cityscapes' label ids to train ids, for example).
    func mapLabels(_ raw: IndexMask, file: String) throws -> IndexMask
}

extension SegmentationDataset {
    /// Reads one sample, checking that the mask matches the image and holds known labels.
    public func sample(_ index: Int) throws -> SegmentationSample {
        let image = try ImageIO.readRGB(imageURL(index))
        let maskFile = maskURL(index)
        let labels = try readLabels(index)
        guard labels.width == image.width && labels.height == image.height else {
            throw DatasetError(
                file: maskFile.path,
                "mask is \(labels.width)x\(labels.height) but its image is \(image.width)x\(image.height)")
        }
        return SegmentationSample(name: name(index), image: image, labels: labels)
    }

    /// The mask alone (for filtering by classes present), validated against the class range.
    public func readLabels(_ index: Int) throws -> IndexMask {
        let file = maskURL(index)
        let labels = try mapLabels(try ImageIO.readIndexPNG(file), file: file.path)
        let limit = classNames.count
        if let bad = labels.values.first(where: { Int($0) >= limit && $0 != 255 }) {
            throw DatasetError(
                file: file.path, "label \(bad) is outside the \(limit) classes (0-\(limit - 1), 255 ignore)")
        }
        return labels
    }
}

/// List files larger than this are refused unread (MiB's train_aug list of 10,582 lines is 570 KB).
let listFileLimit = 64 << 20

/// The non-blank lines of a list file, trimmed, with their 1-based line numbers.
func readListLines(_ url: URL) throws -> [(number: Int, text: String)] {
    let size = (try? FileManager.default.attributesOfItem(atPath: url.path)[.size] as? Int) ?? nil
    guard let size else { throw DatasetError(file: url.path, "cannot read the image list") }
    guard size <= listFileLimit else {
        throw DatasetError(file: url.path, "\(size) bytes is over the limit of \(listFileLimit) for an image list")
    }
    guard let text = try? String(contentsOf: url, encoding: .utf8) else {
        throw DatasetError(file: url.path, "cannot read the image list (missing, or not UTF-8)")
    }
    // "\r\n" is one Character, a newline: Windows line ends count once.
    let lines = text.split(omittingEmptySubsequences: false, whereSeparator: \.isNewline)
    return lines.enumerated().compactMap { number, line in
        let trimmed = line.trimmingCharacters(in: .whitespacesAndNewlines)
        return trimmed.isEmpty ? nil : (number + 1, trimmed)
    }
}

/// Reads a list file of names, one per line; a line may also be "IMAGE MASK" as MiB's lists.
func readList(_ url: URL) throws -> [String] { try readListLines(url).map(\.text) }

/// Why `name` is not one safe file name (no `/`, not `.` or `..`, no NUL or control
/// characters), or nil: dataset names become output file names.
func fileNameProblem(_ name: String) -> String? {
    if name.isEmpty { return "is empty" }
    if name == "." || name == ".." { return "is . or .." }
    if name.contains("/") { return "holds a /" }
    if name.unicodeScalars.contains(where: { $0.properties.generalCategory == .control }) {
        return "holds NUL or control characters"
    }
    return nil
}

/// `directory/NAME + suffix`, refusing a name that is not one safe file name, so nothing is
/// written outside `directory`.
public func outputURL(in directory: URL, name: String, suffix: String) throws -> URL {
    if let problem = fileNameProblem(name) {
        throw DatasetError(file: directory.path, "the output name \(String(reflecting: name)) \(problem)")
    }
    return directory.appendingPathComponent(name + suffix)
}

/// A path of a list line relative to the dataset root: a leading `/` means the root, and no
/// component may be empty, `.` or `..`, or hold control characters, so it stays inside the root.
func relativePathProblem(_ path: String) -> String? {
    let parts = path.trimmingPrefix("/").split(separator: "/", omittingEmptySubsequences: false)
    return parts.lazy.compactMap { fileNameProblem(String($0)).map { "has a component that \($0)" } }.first
}

/// Checks every file of a dataset exists before any work starts.
func checkFilesExist(_ ds: SegmentationDataset, list: URL) throws {
    for i in 0..<ds.count {
        for url in [ds.imageURL(i), ds.maskURL(i)] where !FileManager.default.fileExists(atPath: url.path) {
            throw DatasetError(file: url.path, "listed in \(list.lastPathComponent) but missing")
        }
    }
}

/// PASCAL VOC 2012 (and the Shapes set, written in the same layout):
/// JPEGImages/NAME.jpg (or .png), SegmentationClass/NAME.png (palette) with
/// ImageSets/Segmentation/SPLIT.txt; or MiB's augmented set, SegmentationClassAug/NAME.png with
/// a list file of "/JPEGImages/NAME.jpg /SegmentationClassAug/NAME.png" lines.
public struct VOCDataset: SegmentationDataset {
    public let root: URL
    public let split: String
    public let classNames: [String]
    let images: [URL], masks: [URL], names: [String]

    /// `list`: a list file; by default ImageSets/Segmentation/SPLIT.txt, or for split
    /// "train_aug" MiB's list of the augmented set.
    public init(root: URL, split: String, classNames: [String] = DatasetClasses.voc, list: URL? = nil) throws {
        self.root = root
        self.split = split
        self.classNames = classNames
        let listURL = list ?? Self.defaultList(root: root, split: split)
        var images: [URL] = [], masks: [URL] = [], names: [String] = []
        for (number, line) in try readListLines(listURL) {
            func refuse(_ what: String, _ problem: String) -> DatasetError {
                DatasetError(file: listURL.path, "line \(number): \(what) \(String(reflecting: line)) \(problem)")
            }
            let parts = line.split(separator: " ").map(String.init)
            if parts.count == 2 {
                for part in parts { if let problem = relativePathProblem(part) { throw refuse("path", problem) } }
                let name = URL(fileURLWithPath: parts[0]).deletingPathExtension().lastPathComponent
                if let problem = fileNameProblem(name) { throw refuse("image name of", problem) }
                images.append(root.appendingPathComponent(parts[0].trimmingPrefix("/")))
                masks.append(root.appendingPathComponent(parts[1].trimmingPrefix("/")))
                names.append(name)
            } else {
                if let problem = fileNameProblem(line) { throw refuse("name", problem) }
                let jpg = root.appendingPathComponent("JPEGImages/\(line).jpg")
                let png = root.appendingPathComponent("JPEGImages/\(line).png")
                images.append(FileManager.default.fileExists(atPath: jpg.path) ? jpg : png)
                masks.append(root.appendingPathComponent("SegmentationClass/\(line).png"))
                names.append(line)
            }
        }
        self.images = images
        self.masks = masks
        self.names = names
        try checkFilesExist(self, list: listURL)
    }

    static func defaultList(root: URL, split: String) -> URL {
        let standard = root.appendingPathComponent("ImageSets/Segmentation/\(split).txt")
        if FileManager.default.fileExists(atPath: standard.path) { return standard }
        // MiB keeps train_aug.txt and val.txt beside the images.
        for candidate in ["\(split).txt", "splits/\(split).txt", "list/\(split).txt"] {
            let url = root.appendingPathComponent(candidate)
            if FileManager.default.fileExists(atPath: url.path) { return url }
        }
        return standard
    }

    public var count: Int { names.count }
    public func name(_ index: Int) -> String { names[index] }
    public func imageURL(_ index: Int) -> URL { images[index] }
    public func maskURL(_ index: Int) -> URL { masks[index] }
    public func mapLabels(_ raw: IndexMask, file: String) throws -> IndexMask { raw }
}

/// ADE20K SceneParsing (ADEChallengeData2016): images/{training,validation}/NAME.jpg,
/// annotations/{training,validation}/NAME.png with 0 = other (background here), 1-150.
public struct ADE20KDataset: SegmentationDataset {
    public let root: URL
    public let split: String
    public var classNames: [String] { DatasetClasses.ade }
    let names: [String]
    let folder: String

    public init(root: URL, split: String) throws {
        self.root = root
        self.split = split
        folder = split == "train" || split == "training" ? "training" : "validation"
        let dir = root.appendingPathComponent("images/\(folder)")
        guard let files = try? FileManager.default.contentsOfDirectory(atPath: dir.path) else {
            throw DatasetError(file: dir.path, "missing: expected ADEChallengeData2016/images/\(folder)")
        }
        names = files.filter { $0.hasSuffix(".jpg") || $0.hasSuffix(".png") }
            .map { URL(fileURLWithPath: $0).deletingPathExtension().lastPathComponent }.sorted()
        try checkFilesExist(self, list: dir)
    }

    public var count: Int { names.count }
    public func name(_ index: Int) -> String { names[index] }
    public func imageURL(_ index: Int) -> URL {
        let jpg = root.appendingPathComponent("images/\(folder)/\(names[index]).jpg")
        return FileManager.default.fileExists(atPath: jpg.path)
            ? jpg : root.appendingPathComponent("images/\(folder)/\(names[index]).png")
    }
    public func maskURL(_ index: Int) -> URL {
        root.appendingPathComponent("annotations/\(folder)/\(names[index]).png")
    }
    public func mapLabels(_ raw: IndexMask, file: String) throws -> IndexMask { raw }
}

/// Cityscapes: leftImg8bit/SPLIT/CITY/X_leftImg8bit.png and gtFine/SPLIT/CITY/X_gtFine_labelIds.png;
/// label ids are mapped to the 19 train ids, everything else to 255.
public struct CityscapesDataset: SegmentationDataset {
    public let root: URL
    public let split: String
    public var classNames: [String] { DatasetClasses.cityscapes }
    let stems: [String] // CITY/X

    /// Label id -> train id, as cityscapesScripts' labels.py.
    public static let trainIds: [Int: UInt16] = [
        7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12, 26: 13, 27: 14,
        28: 15, 31: 16, 32: 17, 33: 18,
    ]

    public init(root: URL, split: String) throws {
        self.root = root
        self.split = split
        let dir = root.appendingPathComponent("leftImg8bit/\(split)")
        guard let cities = try? FileManager.default.contentsOfDirectory(atPath: dir.path) else {
            throw DatasetError(file: dir.path, "missing: expected leftImg8bit/\(split)/CITY")
        }
        var stems: [String] = []
        for city in cities.sorted() {
            let files =
                (try? FileManager.default.contentsOfDirectory(atPath: dir.appendingPathComponent(city).path)) ?? []
            for f in files.sorted() where f.hasSuffix("_leftImg8bit.png") {
                stems.append("\(city)/\(f.dropLast("_leftImg8bit.png".count))")
            }
        }
        self.stems = stems
        try checkFilesExist(self, list: dir)
    }

    public var count: Int { stems.count }
    public func name(_ index: Int) -> String { stems[index].replacingOccurrences(of: "/", with: "_") }
    public func imageURL(_ index: Int) -> URL {
        root.appendingPathComponent("leftImg8bit/\(split)/\(stems[index])_leftImg8bit.png")
    }
    public func maskURL(_ index: Int) -> URL {
        root.appendingPathComponent("gtFine/\(split)/\(stems[index])_gtFine_labelIds.png")
    }

    public func mapLabels(_ raw: IndexMask, file: String) throws -> IndexMask {
        var lut = [UInt16](repeating: 255, count: 65536)
        for (id, train) in Self.trainIds { lut[id] = train }
        return IndexMask(width: raw.width, height: raw.height, values: raw.values.map { lut[Int($0)] })
    }
}

extension String {
    func trimmingPrefix(_ prefix: String) -> String { hasPrefix(prefix) ? String(dropFirst(prefix.count)) : self }
}

/// Opens a dataset by layout name: voc (also Shapes), ade, cityscapes.
public func openDataset(_ layout: String, root: URL, split: String) throws -> SegmentationDataset {
    switch layout.lowercased() {
    case "voc": return try VOCDataset(root: root, split: split)
    case "shapes":
        return try VOCDataset(root: root, split: split, classNames: DatasetClasses.shapes)
    case "ade", "ade20k": return try ADE20KDataset(root: root, split: split == "train" ? "training" : "validation")
    case "cityscapes": return try CityscapesDataset(root: root, split: split)
    default: throw DatasetError(file: root.path, "unknown dataset layout \(layout): voc, shapes, ade or cityscapes")
    }
}
