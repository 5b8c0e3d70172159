import XCTest

/// The README promises `--help` on every tool: each answers it on standard output with status 0
/// and names itself, without doing any work.
final class ToolHelpTests: XCTestCase {
    static let tools = [
        "hrhf-bench", "hrhf-convert", "hrhf-predict", "hrhf-data", "hrhf-train", "hrhf-eval", "hrhf-synth",
        "hrhf-pack", "hrhf-distill", "hrhf-fuzz",
    ]

    func testEveryToolAnswersHelp() throws {
        for tool in Self.tools {
            let r = try runTool(tool, ["--help"])
            XCTAssertEqual(r.status, 0, "\(tool) --help: \(r.stderr)")
            XCTAssertTrue(r.stdout.contains(tool), "\(tool) --help does not name itself: \(r.stdout)")
            XCTAssertTrue(r.stdout.lowercased().contains("usage"), "\(tool) --help has no usage line: \(r.stdout)")
        }
    }

    func testFuzzReplayWithoutFilesIsAUsageError() throws {
        let r = try runTool("hrhf-fuzz", ["png"])
        XCTAssertEqual(r.status, 2)
        XCTAssertTrue(r.stderr.hasPrefix("usage: hrhf-fuzz "), r.stderr)
    }
}
