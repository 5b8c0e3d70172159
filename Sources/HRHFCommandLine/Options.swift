import ArgumentParser
import Foundation
import HRHF

/// Threads for OpenBLAS and the toolkit's kernels, shared by every compute command.
public struct ComputeOptions: ParsableArguments {
    @Option(help: "Threads for OpenBLAS and the toolkit's kernels (default: all cores).")
    public var threads: Int = ProcessInfo.processInfo.activeProcessorCount

    public init() {}

    public func apply() { setComputeThreads(threads) }
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
    guard parts.count == 2, parts.allSatisfy({ $0 > 0 }) else { throw ValidationError("expected a size HxW, got \(text)") }
    return (parts[0], parts[1])
}
