import Foundation

/// One confusion matrix over a whole evaluation: rows are labels, columns predictions;
/// pixels labelled 255 are skipped.
public struct ConfusionMatrix: Sendable {
    public let classes: Int
    public private(set) var counts: [Int]

    public init(classes: Int) {
        self.classes = classes
        counts = [Int](repeating: 0, count: classes * classes)
    }

    public mutating func add(prediction: IndexMask, label: IndexMask) {
        precondition(prediction.values.count == label.values.count, "prediction and label sizes differ")
        for (p, l) in zip(prediction.values, label.values) where l != 255 {
            precondition(Int(l) < classes, "label \(l) outside \(classes) classes")
            counts[Int(l) * classes + min(Int(p), classes - 1)] += 1
        }
    }

    /// Replaces the counts by their sums over the ranks of `communicator`.
    public mutating func sumOverRanks(_ communicator: Communicator) {
        communicator.allreduceSum(&counts)
    }

    public mutating func merge(_ other: ConfusionMatrix) {
        for i in counts.indices { counts[i] += other.counts[i] }
    }

    /// IoU of class c = TP / (TP + FP + FN); nil when the class appears in neither labels nor
    /// predictions.
    public func iou(_ c: Int) -> Double? {
        let tp = counts[c * classes + c]
        let row = (0..<classes).reduce(0) { $0 + counts[c * classes + $1] }
        let column = (0..<classes).reduce(0) { $0 + counts[$1 * classes + c] }
        let union = row + column - tp
        return union > 0 ? Double(tp) / Double(union) : nil
    }

    public var pixelAccuracy: Double {
        let total = counts.reduce(0, +)
        return total > 0 ? Double((0..<classes).reduce(0) { $0 + counts[$1 * classes + $1] }) / Double(total) : 0
    }
}

/// The figures of one evaluation with METHOD.md's convention: `old` is the mean IoU over the
/// step-0 foreground classes (background excluded), `new` over classes added after step 0,
/// `all` over every class seen so far, background included.
public struct IoUReport: Codable, Sendable {
    public static let convention =
        "mIoU convention: old = step-0 foreground classes (background excluded); new = classes added after step 0; all = every seen class, background included"

    public var task: String
    public var step: Int
    public var classNames: [String]
    public var perClass: [Double?]
    public var oldClasses: [Int]
    public var newClasses: [Int]
    public var seenClasses: [Int]
    public var old: Double?
    public var new: Double?
    public var all: Double?
    public var pixelAccuracy: Double
    public var images: Int

    public init(matrix: ConfusionMatrix, task: IncrementalTask, step: Int, classNames: [String], images: Int) {
        self.task = task.name
        self.step = step
        self.classNames = classNames
        self.images = images
        let perClass = (0..<matrix.classes).map { matrix.iou($0) }
        self.perClass = perClass
        oldClasses = task.steps[0].filter { $0 != 0 }
        newClasses = step > 0 ? task.steps[1...step].flatMap { $0 } : []
        seenClasses = task.seen(through: step)
        func mean(_ cs: [Int]) -> Double? {
            let values = cs.compactMap { $0 < perClass.count ? perClass[$0] : nil }
            return values.isEmpty ? nil : values.reduce(0, +) / Double(values.count)
        }
        pixelAccuracy = matrix.pixelAccuracy
        old = mean(oldClasses)
        new = mean(newClasses)
        all = mean(seenClasses)
    }

    public static func percent(_ v: Double?) -> String { v.map { String(format: "%.2f", 100 * $0) } ?? "-" }

    /// Per-class table, then old / new / all, with the convention stated.
    public func table() -> String {
        let rows = seenClasses.map { c in
            [String(c), c < classNames.count ? classNames[c] : "?", Self.percent(perClass[c])]
        }
        return formatTable(header: ["id", "class", "IoU %"], rows: rows) + "\n\n"
            + formatTable(
                header: ["task \(task) step \(step)", "old", "new", "all", "pixel acc"],
                rows: [
                    ["mIoU %", Self.percent(old), Self.percent(new), Self.percent(all), Self.percent(pixelAccuracy)]
                ])
            + "\n" + Self.convention + " (\(images) images)"
    }

    /// PLOP's results line: step, the IoU of every class ("x" for classes not seen), mean IoU.
    public func plopCSVLine(classCount: Int) -> String {
        let seen = Set(seenClasses)
        let cells = (0..<classCount).map { c in seen.contains(c) ? (perClass[c].map { String($0) } ?? "x") : "x" }
        return "\(step),\(cells.joined(separator: ",")),\(all.map { String($0) } ?? "x")"
    }

    public func json() throws -> Data {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
        return try encoder.encode(self)
    }
}

/// Evaluates a model on the test images of a step: classes not yet seen are ignored.
/// Images are run one at a time at their own size. Under several ranks each evaluates a contiguous
/// share of the images and the confusion matrices are summed: every rank gets the whole report.
public func evaluate(
    model: DeepLabV3, normalization: Normalization, dataset: SegmentationDataset,
    proto: StepProtocol, limit: Int? = nil, communicator: Communicator = .single,
    onImage: ((Int, Int, SegmentationSample, IndexMask) throws -> Void)? = nil
) throws -> IoUReport {
    model.eval()
    var matrix = ConfusionMatrix(classes: max(model.numClasses, dataset.classNames.count))
    let n = min(limit ?? dataset.count, dataset.count)
    for i in DataParallel.share(of: n, rank: communicator.rank, size: communicator.size) {
        let sample = try dataset.sample(i)
        try model.checkInput(height: sample.image.height, width: sample.image.width, name: dataset.imageURL(i).path)
        let logits = withNoGrad { model.run(normalization.tensor(sample.image)).logits }
        let prediction = argmaxMasks(logits)[0]
        matrix.add(prediction: prediction, label: proto.testLabels(sample.labels))
        try onImage?(i, n, sample, prediction)
    }
    matrix.sumOverRanks(communicator)
    return IoUReport(matrix: matrix, task: proto.task, step: proto.step, classNames: dataset.classNames, images: n)
}
