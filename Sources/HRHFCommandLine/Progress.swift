import Foundation

/// A progress line with rate and ETA on a terminal (rewritten in place on stderr), plain log
/// lines elsewhere (every tenth of the work or every 30 seconds).
public final class ProgressLine {
    let label: String, unit: String, total: Int
    let start = Date()
    let isTerminal = isatty(STDERR_FILENO) != 0
    var lastLog = Date.distantPast
    var lastDecile = -1

    public init(_ label: String, total: Int, unit: String = "it") {
        self.label = label
        self.total = max(total, 1)
        self.unit = unit
    }

    /// `done` of `total` finished; `detail` is appended (a loss, a figure).
    public func update(_ done: Int, detail: String = "") {
        let elapsed = Date().timeIntervalSince(start)
        let rate = elapsed > 0 ? Double(done) / elapsed : 0
        let eta = rate > 0 ? Double(total - done) / rate : 0
        let text = String(format: "%@ %d/%d (%3.0f%%) %.2f %@/s ETA %@", label, done, total,
                          100 * Double(done) / Double(total), rate, unit, formatDuration(eta))
            + (detail.isEmpty ? "" : "  " + detail)
        if isTerminal {
            FileHandle.standardError.write(Data(("\r\u{1B}[K" + text).utf8))
        } else {
            let decile = done * 10 / total
            if decile != lastDecile || Date().timeIntervalSince(lastLog) > 30 || done == total {
                lastDecile = decile
                lastLog = Date()
                FileHandle.standardError.write(Data((text + "\n").utf8))
            }
        }
    }

    /// Ends the line; returns the elapsed seconds.
    @discardableResult
    public func finish() -> Double {
        if isTerminal { FileHandle.standardError.write(Data("\n".utf8)) }
        return Date().timeIntervalSince(start)
    }
}

public func formatDuration(_ seconds: Double) -> String {
    guard seconds.isFinite else { return "?" }
    let s = Int(seconds.rounded())
    return s >= 3600 ? String(format: "%d:%02d:%02d", s / 3600, s / 60 % 60, s % 60) : String(format: "%d:%02d", s / 60, s % 60)
}

/// Prints on standard error.
public func printError(_ text: String) {
    FileHandle.standardError.write(Data((text + "\n").utf8))
}
