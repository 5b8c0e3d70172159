import Foundation
import HRHF

/// Writes an evaluation's JSON and appends its PLOP-format CSV line, when asked.
public func writeReport(_ report: IoUReport, json: String?, csv: String?, classCount: Int) throws {
    if let json { try writeAtomically(try report.json(), to: URL(fileURLWithPath: json)) }
    if let csv {
        let url = URL(fileURLWithPath: csv)
        var text = (try? String(contentsOf: url, encoding: .utf8)) ?? ""
        text += report.plopCSVLine(classCount: classCount) + "\n"
        try writeAtomically(Data(text.utf8), to: url)
    }
}

/// The command line that started this process, for model cards.
public var invocation: String {
    CommandLine.arguments.map { $0.contains(" ") ? "'\($0)'" : $0 }.joined(separator: " ")
}
