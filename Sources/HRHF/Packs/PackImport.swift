import Foundation

/// The teacher's reading of one image: its argmax class per pixel and its mean top probability
/// (what `hrhf-synth` records as `teacherConfidence`).
public func teacherReading(_ predictor: Predictor, _ image: RGBImage, name: String) throws
    -> (mask: IndexMask, confidence: Double)
{
    let logits = try predictor.logits(for: image, name: name).logits
    let top = channelArgmax(withNoGrad { softmax(logits) })
    let mask = IndexMask(width: image.width, height: image.height, values: top.indices.map { UInt16($0) })
    return (mask, top.values.reduce(0.0) { $0 + Double($1) } / Double(max(top.values.count, 1)))
}

/// A pack made from a folder of images and labels made elsewhere (a PyTorch DeepInversion run's
/// `images/*.png` + `labels/*.png`, or the VOC layout `VOCExport` writes: `JPEGImages/` +
/// `SegmentationClass/`). Every label file names a pair; the records follow the labels' names in
/// byte order, so the same folder and teacher give the same pack bytes. Targets are the
/// non-background classes a label shows, target and achieved areas their shares of its pixels,
/// the confidence the teacher's on the image; `generator.name` is `PackImport.generatorName`.
public enum PackImport {
    public static let generatorName = "hrhf-pack import"
    /// Pairs one import takes: entry names hold six digits, and a million 512-pixel pairs is
    /// about 500 GB of PNG, beyond any pack the 16 GiB total budget admits anyway.
    public static let maxImages = 1_000_000
    /// Characters of a file name's stem: DeepInversion's and VOC's names (`2007_000032`) have 11.
    public static let maxStemLength = 100
    static let imageExtensions = ["png", "jpg", "jpeg"]

    /// The image and label folders of `folder`: `images` + `labels`, else `JPEGImages` +
    /// `SegmentationClass`; each must be a real folder, not a link.
    static func layout(_ folder: URL) throws -> (images: URL, labels: URL) {
        func isFolder(_ url: URL) -> Bool {
            var info = stat()
            return lstat(url.path, &info) == 0 && (info.st_mode & S_IFMT) == S_IFDIR
        }
        for (images, labels) in [("images", "labels"), ("JPEGImages", "SegmentationClass")] {
            let pair = (folder.appendingPathComponent(images), folder.appendingPathComponent(labels))
            if isFolder(pair.0) && isFolder(pair.1) { return pair }
        }
        throw FileError(
            file: folder.path,
            "holds neither images/ + labels/ nor JPEGImages/ + SegmentationClass/ "
                + "(real folders, not links)")
    }

    /// The stem of an allowed file name: ASCII letters, digits, `_` and `-`, 1 to `maxStemLength`
    /// of them, then `.` and one of `extensions`; nil for any other name.
    static func stem(_ name: String, extensions: [String]) -> String? {
        let parts = name.split(separator: ".", omittingEmptySubsequences: false)
        guard parts.count == 2, extensions.contains(String(parts[1])), (1...maxStemLength).contains(parts[0].count),
            parts[0].utf8.allSatisfy({ byte in
                (0x30...0x39).contains(byte) || (0x41...0x5A).contains(byte) || (0x61...0x7A).contains(byte)
                    || byte == 0x5F || byte == 0x2D
            })
        else { return nil }
        return String(parts[0])
    }

    /// The pairs of `folder`, in the byte order of the labels' names.
    static func pairs(_ folder: URL) throws -> [(image: URL, label: URL)] {
        let (imageFolder, labelFolder) = try layout(folder)
        let names = try FileManager.default.contentsOfDirectory(atPath: labelFolder.path)
        guard names.count <= maxImages else {
            throw FileError(file: labelFolder.path, "\(names.count) files, over the limit of \(maxImages)")
        }
        var pairs: [(image: URL, label: URL)] = []
        for name in names.sorted(by: { Array($0.utf8).lexicographicallyPrecedes(Array($1.utf8)) }) {
            let label = labelFolder.appendingPathComponent(name)
            guard let stem = stem(name, extensions: ["png"]) else {
                throw FileError(
                    file: label.path,
                    "not an allowed label name: letters, digits, _ and - (1 to "
                        + "\(maxStemLength)), then .png")
            }
            let images = imageExtensions.map { imageFolder.appendingPathComponent("\(stem).\($0)") }.filter {
                var info = stat()
                return lstat($0.path, &info) == 0
            }
            guard images.count == 1 else {
                throw FileError(
                    file: label.path,
                    images.isEmpty
                        ? "no image \(stem).png, .jpg or .jpeg in \(imageFolder.path)"
                        : "more than one image named \(stem) in \(imageFolder.path)")
            }
            pairs.append((images[0], label))
        }
        guard !pairs.isEmpty else { throw FileError(file: labelFolder.path, "holds no labels") }
        return pairs
    }

    /// Reads, checks and records every pair of `folder`, then writes the pack to `url`.
    /// `classes` (teacher class ids) are the pack's classes; without them, those the labels show.
    @discardableResult
    public static func run(
        folder: URL, teacher teacherURL: URL, classes requested: [Int]?, to url: URL,
        fileLimit: Int = SyntheticPack.defaultEntryLimit,
        totalLimit: Int = ArchiveReader.defaultTotalLimit
    ) throws -> PackManifest {
        let pairs = try pairs(folder)
        let (model, card) = try ModelFile.load(teacherURL)
        let teacherClasses = card.classes.count
        guard teacherClasses <= SyntheticPack.maxTeacherClasses else {
            throw FileError(
                file: teacherURL.path,
                "\(teacherClasses) classes: a pack's 8-bit labels hold at most "
                    + "\(SyntheticPack.maxTeacherClasses)")
        }
        if let requested {
            for id in requested where !(1..<teacherClasses).contains(id) || requested.filter({ $0 == id }).count > 1 {
                throw FileError(
                    file: teacherURL.path,
                    "class \(id) of --classes is not a teacher class other than "
                        + "background (1 to \(teacherClasses - 1)), or is given twice")
            }
        }
        let predictor = Predictor(model: model, card: card)
        var records: [SynthesisRecord] = [], files: [String: Data] = [:]
        var resolution = 0, total = 0
        func read(_ file: URL) throws -> Data {
            let data = try readInputFile(file, limit: fileLimit)
            let (sum, overflow) = total.addingReportingOverflow(data.count)
            guard !overflow, sum <= totalLimit else {
                throw FileError(file: file.path, "the files read so far exceed the total budget of \(totalLimit) bytes")
            }
            total = sum
            return data
        }
        for (index, pair) in pairs.enumerated() {
            let side = resolution == 0 ? SyntheticPack.maxResolution : resolution
            let image = try ImageIO.decodeRGB(try read(pair.image), name: pair.image.path, maxPixels: side * side)
            guard image.width == image.height, (1...SyntheticPack.maxResolution).contains(image.width),
                resolution == 0 || image.width == resolution
            else {
                throw FileError(
                    file: pair.image.path,
                    "\(image.width)x\(image.height): a pack's images are square, "
                        + "all of one side up to \(SyntheticPack.maxResolution)"
                        + (resolution == 0 ? "" : " (the first is \(resolution))"))
            }
            resolution = image.width
            let label = try ImageIO.decodeIndexPNG(
                try read(pair.label), name: pair.label.path,
                maxPixels: resolution * resolution)
            guard label.width == resolution, label.height == resolution else {
                throw FileError(
                    file: pair.label.path,
                    "\(label.width)x\(label.height), its image is "
                        + "\(resolution)x\(resolution)")
            }
            var counts = [Int](repeating: 0, count: 256)
            for (i, value) in label.values.enumerated() {
                guard Int(value) < teacherClasses || value == 255 else {
                    throw FileError(
                        file: pair.label.path,
                        "value \(value) at pixel (\(i % resolution), "
                            + "\(i / resolution)) is neither a teacher class (0 to \(teacherClasses - 1)) "
                            + "nor 255")
                }
                counts[Int(value)] += 1
            }
            let targets = (1..<teacherClasses).filter { counts[$0] > 0 }
            guard !targets.isEmpty else {
                throw FileError(
                    file: pair.label.path,
                    "shows no class but background and ignore: a record needs a target")
            }
            if let requested, let outside = targets.first(where: { !requested.contains($0) }) {
                throw FileError(file: pair.label.path, "shows class \(outside), which --classes does not list")
            }
            let areas = targets.map { Double(counts[$0]) / Double(label.values.count) }
            let confidence = try teacherReading(predictor, image, name: pair.image.path).confidence
            let record = SynthesisRecord(
                index: index, image: SyntheticPack.entryName("images", index),
                label: SyntheticPack.entryName("labels", index), targets: targets,
                targetAreas: areas, achievedAreas: areas, absentMaxArea: 0,
                teacherConfidence: confidence, losses: [:], seed: 0, batch: index)
            files[record.image] = try ImageIO.encodePNG(image, name: pair.image.path)
            files[record.label] = try ImageIO.encodePalettePNG(label, name: pair.label.path)
            records.append(record)
        }
        let classIDs = requested?.sorted() ?? Array(Set(records.flatMap(\.targets))).sorted()
        var options = InversionOptions()
        options.iterations = 0
        options.batchSize = 1
        options.resolution = resolution
        options.maxClasses = records.map(\.targets.count).max() ?? 1
        let manifest = PackManifest(
            generator: .init(
                name: generatorName, version: toolkitVersion, options: options, seed: 0,
                count: records.count),
            teacher: .init(file: teacherURL.lastPathComponent, sha256: try sha256Hex(file: teacherURL), card: card),
            classes: classIDs.map { card.classes[$0] }, shard: nil, images: records,
            quality: SynthesisQuality(records: records, imagesPerMinute: nil))
        try SyntheticPack.write(
            manifest: manifest,
            files: { name in
                guard let data = files[name] else { throw PackError(file: url.path, entry: name, "not imported") }
                return data
            }, to: url)
        return manifest
    }
}

extension SyntheticPack {
    /// Share of labelled pixels (label not 255) at which a label must equal the teacher's argmax
    /// for `checkLabels` to accept it: an `hrhf-synth` pack's labels are the teacher's argmax, off
    /// only where 8-bit rounding of the image flips a near-tie (measured: at least 99.56% on each of
    /// 16 images of 64 pixels), while a label that lies about the teacher differs on whole objects.
    public static let defaultLabelAgreement = 0.95

    /// Per record, the share of its labelled pixels where the stored label equals the teacher's
    /// argmax on the stored image (0 when no pixel is labelled).
    public func labelAgreement(_ predictor: Predictor) throws -> [Double] {
        try manifest.images.sorted { $0.index < $1.index }.map { record in
            let label = try label(record)
            let reading = try teacherReading(predictor, try image(record), name: record.image).mask
            var labelled = 0, equal = 0
            for (stored, predicted) in zip(label.values, reading.values) where stored != 255 {
                labelled += 1
                if stored == predicted { equal += 1 }
            }
            return labelled == 0 ? 0 : Double(equal) / Double(labelled)
        }
    }

    /// Refuses the pack, naming the first label below `minimum`, if any label disagrees with the
    /// teacher on more than `1 - minimum` of its pixels; returns every record's agreement.
    @discardableResult
    public func checkLabels(_ predictor: Predictor, minimum: Double = defaultLabelAgreement) throws -> [Double] {
        let agreement = try labelAgreement(predictor)
        let records = manifest.images.sorted { $0.index < $1.index }
        if let i = agreement.firstIndex(where: { !($0 >= minimum) }) {
            throw PackError(
                file: url.path, entry: records[i].label,
                String(
                    format: "agrees with the teacher's argmax on %.2f%% of its pixels, below the minimum of %.2f%%",
                    100 * agreement[i], 100 * minimum))
        }
        return agreement
    }
}
