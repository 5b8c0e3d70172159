import Foundation

/// A class-incremental task: which classes each step learns. Step 0 includes background (0).
public struct IncrementalTask: Equatable, Sendable, Codable {
    public var name: String
    public var steps: [[Int]]

    public init(name: String, steps: [[Int]]) {
        self.name = name
        self.steps = steps
    }

    /// MiB's and PLOP's tasks by name for a dataset with `foreground` classes (VOC and Shapes
    /// 20, ADE 150): "19-1", "15-5", "15-1" (= 15-5s), "10-1", "10-5-5", "100-50", "100-10",
    /// "50-50", "100-5", "offline"; or an explicit list "1-15" or "1-15,16-20" (one step per
    /// comma group, background added to the first).
    public static func named(_ spec: String, foreground: Int) throws -> IncrementalTask {
        func range(_ a: Int, _ b: Int) -> [Int] { Array(a...b) }
        func build(base: Int, increments: [Int]) -> [[Int]] {
            var steps = [range(0, base)]
            var next = base + 1
            for k in increments {
                steps.append(range(next, next + k - 1))
                next += k
            }
            return steps
        }
        let known: [String: (Int, [Int])] =
            foreground == 150
            ? [
                "100-50": (100, [50]), "100-10": (100, [10, 10, 10, 10, 10]), "50-50": (50, [50, 50]),
                "100-5": (100, Array(repeating: 5, count: 10)), "offline": (150, []),
            ]
            : [
                "19-1": (19, [1]), "15-5": (15, [5]), "15-1": (15, [1, 1, 1, 1, 1]), "15-5s": (15, [1, 1, 1, 1, 1]),
                "10-1": (10, Array(repeating: 1, count: 10)), "10-5-5": (10, [5, 5]), "offline": (foreground, []),
            ]
        if let (base, increments) = known[spec] {
            guard base + increments.reduce(0, +) == foreground else {
                throw DatasetError(file: spec, "task does not fit a dataset of \(foreground) classes")
            }
            return IncrementalTask(name: spec, steps: build(base: base, increments: increments))
        }
        // Explicit groups: "1-15,16-20" or "1-15".
        var steps: [[Int]] = []
        for group in spec.split(separator: ",") {
            let bounds = group.split(separator: "-").compactMap { Int($0) }
            guard bounds.count == 2 || bounds.count == 1, let lo = bounds.first, let hi = bounds.last, lo >= 1,
                lo <= hi,
                hi <= foreground
            else {
                throw DatasetError(file: spec, "unknown task: give a known name or class ranges such as 1-15,16-20")
            }
            steps.append(range(lo, hi))
        }
        guard !steps.isEmpty else { throw DatasetError(file: spec, "empty task") }
        steps[0] = [0] + steps[0]
        let all = steps.flatMap { $0 }
        guard Set(all).count == all.count else { throw DatasetError(file: spec, "a class appears in two steps") }
        return IncrementalTask(name: spec, steps: steps)
    }

    /// Classes learned at step t.
    public func classes(at step: Int) -> [Int] { steps[step] }
    /// Classes learned up to and including step t.
    public func seen(through step: Int) -> [Int] { steps[0...step].flatMap { $0 } }
    /// Classes learned in later steps.
    public func future(after step: Int) -> [Int] { step + 1 < steps.count ? steps[(step + 1)...].flatMap { $0 } : [] }
    /// Classifier outputs per step up to t.
    public func classesPerStep(through step: Int) -> [Int] { steps[0...step].map(\.count) }
}

/// Overlap: an image is used at step t if it contains a class of that step; the other labels
/// become background. Disjoint: also drop images holding a class of a later step.
public enum IncrementalSetting: String, Sendable, CaseIterable, Codable {
    case overlap, disjoint
}

/// Per-step selection and label remapping, as MiB defines them.
public struct StepProtocol: Sendable {
    public var task: IncrementalTask
    public var step: Int
    public var setting: IncrementalSetting

    public init(task: IncrementalTask, step: Int, setting: IncrementalSetting) {
        precondition(step >= 0 && step < task.steps.count, "step \(step) outside the task's \(task.steps.count) steps")
        self.task = task
        self.step = step
        self.setting = setting
    }

    /// Whether a training image with these labels is used at this step (MiB's filter_images:
    /// background does not count as a reason to use an image).
    public func usesForTraining(_ present: Set<Int>) -> Bool {
        let current = Set(task.classes(at: step)).subtracting([0])
        guard !present.intersection(current).isEmpty else { return false }
        if setting == .disjoint {
            let allowed = Set(task.seen(through: step)).union([0, 255])
            return present.isSubset(of: allowed)
        }
        return true
    }

    /// Training labels: classes outside this step's become background (255 stays).
    public func trainingLabels(_ mask: IndexMask) -> IndexMask {
        var lut = [UInt16](repeating: 0, count: 256)
        lut[255] = 255
        for c in task.classes(at: step) { lut[c] = UInt16(c) }
        return IndexMask(
            width: mask.width, height: mask.height, values: mask.values.map { $0 < 256 ? lut[Int($0)] : 255 })
    }

    /// Joint training labels (the upper bound): every class seen so far kept.
    public func jointLabels(_ mask: IndexMask) -> IndexMask { testLabels(mask) }

    /// Test labels: classes not seen yet become 255 (ignored).
    public func testLabels(_ mask: IndexMask) -> IndexMask {
        var lut = [UInt16](repeating: 255, count: 256)
        for c in task.seen(through: step) { lut[c] = UInt16(c) }
        return IndexMask(
            width: mask.width, height: mask.height, values: mask.values.map { $0 < 256 ? lut[Int($0)] : 255 })
    }

    /// The indices of `dataset` used for training at this step, from a cached list file when
    /// one exists (DATASET/.hrhf-lists/TASK-SETTING-stepT-SPLIT.txt, shareable), computed
    /// from the masks and cached otherwise.
    public func trainingIndices(_ dataset: SegmentationDataset, cacheDirectory: URL? = nil) throws -> [Int] {
        let dir = cacheDirectory ?? dataset.root.appendingPathComponent(".hrhf-lists")
        let file = dir.appendingPathComponent(
            "\(task.name.replacingOccurrences(of: ",", with: "_"))-\(setting.rawValue)-step\(step)-\(dataset.split).txt"
        )
        var byName: [String: Int] = [:]
        for i in 0..<dataset.count { byName[dataset.name(i)] = i }
        if FileManager.default.fileExists(atPath: file.path) {
            let cached = try readList(file)
            var indices: [Int] = []
            for name in cached {
                guard let i = byName[name] else {
                    throw DatasetError(
                        file: file.path, "lists \(name), which the dataset does not have: delete the stale list")
                }
                indices.append(i)
            }
            return indices
        }
        var keep = [Bool](repeating: false, count: dataset.count)
        let lock = NSLock()
        var failure: Error?
        DispatchQueue.concurrentPerform(iterations: ParallelConfig.threads) { worker in
            for i in stride(from: worker, to: dataset.count, by: ParallelConfig.threads) {
                do {
                    let present = Set(try dataset.readLabels(i).values.map(Int.init))
                    let use = usesForTraining(present)
                    lock.lock()
                    keep[i] = use
                    lock.unlock()
                } catch {
                    lock.lock()
                    failure = failure ?? error
                    lock.unlock()
                }
            }
        }
        if let failure { throw failure }
        let indices = keep.indices.filter { keep[$0] }
        // A cache: on a read-only dataset the list is computed again next time.
        try? FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        try? writeAtomically(Data((indices.map { dataset.name($0) }.joined(separator: "\n") + "\n").utf8), to: file)
        return indices
    }
}
