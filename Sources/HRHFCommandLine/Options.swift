import ArgumentParser
import Foundation
import HRHF

/// Threads for OpenBLAS and the toolkit's kernels, shared by every compute command.
public struct ComputeOptions: ParsableArguments {
    @Option(help: "Threads for OpenBLAS and the toolkit's kernels (default: all cores).")
    public var threads: Int = ProcessInfo.processInfo.activeProcessorCount

    public init() {}

    /// Sets the threads, and makes standard output line-buffered: redirected into one file with the
    /// progress lines (standard error), each log line then lands where it happened, not at exit.
    public func apply() {
        setvbuf(stdout, nil, _IOLBF, 0)
        setComputeThreads(threads)
    }
}

/// Parses "16,1,1,1,1".
public func parseIntList(_ text: String) throws -> [Int] {
    let parts = text.split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces) }
    let values = parts.compactMap { Int($0) }
    guard values.count == parts.count, !values.isEmpty else {
        throw ValidationError("expected a comma-separated list of integers, got \(text)")
    }
    return values
}

/// Parses "HxW" or a single size.
public func parseSize(_ text: String) throws -> (Int, Int) {
    let parts = text.lowercased().split(separator: "x").compactMap { Int($0) }
    if parts.count == 1 && parts[0] > 0 { return (parts[0], parts[0]) }
    guard parts.count == 2, parts.allSatisfy({ $0 > 0 }) else {
        throw ValidationError("expected a size HxW, got \(text)")
    }
    return (parts[0], parts[1])
}

/// Where the data is and which incremental protocol applies.
public struct DataOptions: ParsableArguments {
    @Option(help: "Dataset root directory.")
    public var data: String

    @Option(help: "Layout: shapes, voc, ade or cityscapes.")
    public var dataset: String = "shapes"

    @Option(help: "Task: 15-5, 15-1, 19-1, 10-1, 10-5-5, 100-50, ..., or class ranges such as 1-15,16-20.")
    public var task: String = "15-5"

    @Option(help: "overlap or disjoint.")
    public var setting: IncrementalSetting = .overlap

    public init() {}

    public func open(split: String) throws -> SegmentationDataset {
        try openDataset(dataset, root: URL(fileURLWithPath: data), split: split)
    }

    public func task(_ dataset: SegmentationDataset) throws -> IncrementalTask {
        let foreground = dataset.classNames.count - (dataset.classNames.first == "background" ? 1 : 0)
        return try IncrementalTask.named(task, foreground: foreground)
    }
}

extension IncrementalSetting: ExpressibleByArgument {}
