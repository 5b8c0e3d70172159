import Foundation
import HRHF

/// A progress line with rate and ETA on a terminal (rewritten in place on stderr), plain log
/// lines elsewhere (every tenth of the work or every 30 seconds).
public final class ProgressLine {
    let label: String, unit: String, total: Int
    /// Work an interrupted run had finished before this process began: the rate leaves it out.
    let alreadyDone: Int
    let clock: () -> Date
    let start: Date
    let isTerminal = isatty(STDERR_FILENO) != 0
    var lastLog = Date.distantPast
    var lastDecile = -1

    /// `clock` is injectable so tests can fix the elapsed time.
    public init(
        _ label: String, total: Int, unit: String = "it", alreadyDone: Int = 0,
        clock: @escaping () -> Date = Date.init
    ) {
        self.label = label
        self.total = max(total, 1)
        self.unit = unit
        self.alreadyDone = alreadyDone
        self.clock = clock
        start = clock()
    }

    /// The line for `done` of `total`: rate and ETA from the work done in this process only
    /// (a resumed run's earlier work took no time here); "?" until some is done.
    public func text(_ done: Int, detail: String = "") -> String {
        let elapsed = clock().timeIntervalSince(start)
        let worked = done - alreadyDone
        let rate = elapsed > 0 && worked > 0 ? Double(worked) / elapsed : 0
        let eta = rate > 0 ? Double(total - done) / rate : .infinity
        return String(
            format: "%@ %d/%d (%3.0f%%) %.2f %@/s ETA %@", label, done, total,
            100 * Double(done) / Double(total), rate, unit, formatDuration(eta))
            + (detail.isEmpty ? "" : "  " + detail)
    }

    /// `done` of `total` finished; `detail` is appended (a loss, a figure).
    public func update(_ done: Int, detail: String = "") {
        let text = text(done, detail: detail)
        if isTerminal {
            FileHandle.standardError.write(Data(("\r\u{1B}[K" + text).utf8))
        } else {
            let decile = done * 10 / total
            if decile != lastDecile || clock().timeIntervalSince(lastLog) > 30 || done == total {
                lastDecile = decile
                lastLog = clock()
                FileHandle.standardError.write(Data((text + "\n").utf8))
            }
        }
    }

    /// Ends the line; returns the elapsed seconds.
    @discardableResult
    public func finish() -> Double {
        if isTerminal { FileHandle.standardError.write(Data("\n".utf8)) }
        return clock().timeIntervalSince(start)
    }
}

public func formatDuration(_ seconds: Double) -> String {
    guard seconds.isFinite else { return "?" }
    let s = Int(seconds.rounded())
    return s >= 3600
        ? String(format: "%d:%02d:%02d", s / 3600, s / 60 % 60, s % 60) : String(format: "%d:%02d", s / 60, s % 60)
}

/// The first line of a resumed training run: which checkpoint, how far it had got.
public func resumeLine(checkpoint: URL, iterationsDone: Int, of total: Int) -> String {
    "resuming from \(checkpoint.path): iterations 1-\(iterationsDone) of \(total) already done"
}

/// The first line of a resumed synthesis run: its work directory and the batches finished there.
public func resumeLine(_ work: SynthesisJob.ResumedWork, batchesInRun: Int) -> String {
    "resuming from \(work.directory.path): \(work.batches.count) of \(batchesInRun) batches already done"
        + (work.batches.isEmpty ? "" : " (batches \(rangeList(work.batches)), \(work.images) images)")
}

/// Sorted integers as ranges: [0, 1, 2, 5, 7, 8] -> "0-2,5,7-8".
public func rangeList(_ values: [Int]) -> String {
    var parts: [String] = []
    var i = 0
    while i < values.count {
        var j = i
        while j + 1 < values.count && values[j + 1] == values[j] + 1 { j += 1 }
        parts.append(i == j ? "\(values[i])" : "\(values[i])-\(values[j])")
        i = j + 1
    }
    return parts.joined(separator: ",")
}
