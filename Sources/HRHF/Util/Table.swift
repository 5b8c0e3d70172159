import Foundation

/// A plain-text table with columns padded to their widest cell. The first column is
/// left-aligned and the others right-aligned (numbers read best so), unless `leftAligned`.
public func formatTable(header: [String], rows: [[String]], leftAligned: Bool = false) -> String {
    let all = [header] + rows
    let widths = (0..<header.count).map { col in all.map { $0.count > col ? $0[col].count : 0 }.max() ?? 0 }
    func line(_ cells: [String]) -> String {
        cells.enumerated().map { i, cell in
            let pad = String(repeating: " ", count: max(0, widths[i] - cell.count))
            return i == 0 || leftAligned ? cell + pad : pad + cell
        }.joined(separator: "  ")
    }
    let rule = widths.map { String(repeating: "-", count: $0) }.joined(separator: "  ")
    return ([line(header), rule] + rows.map(line)).joined(separator: "\n")
}
