import Foundation

/// A plain-text table with columns padded to their widest cell (first column left-aligned,
/// the others right-aligned, as numbers read best).
public func formatTable(header: [String], rows: [[String]]) -> String {
    let all = [header] + rows
    let widths = (0..<header.count).map { col in all.map { $0.count > col ? $0[col].count : 0 }.max() ?? 0 }
    func line(_ cells: [String]) -> String {
        cells.enumerated().map { i, cell in
            let pad = String(repeating: " ", count: max(0, widths[i] - cell.count))
            return i == 0 ? cell + pad : pad + cell
        }.joined(separator: "  ")
    }
    let rule = widths.map { String(repeating: "-", count: $0) }.joined(separator: "  ")
    return ([line(header), rule] + rows.map(line)).joined(separator: "\n")
}
