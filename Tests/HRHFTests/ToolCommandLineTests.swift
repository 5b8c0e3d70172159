import XCTest

/// What every tool's command line promises: `--help` (on standard output, status 0, naming the
/// tool, without doing any work) and logs that read in order when redirected into one file.
final class ToolCommandLineTests: XCTestCase {
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

    /// A log redirected into one file (`> log 2>&1`, as the benchmark's runs are) holds the
    /// tool's lines where they happened: the header before the progress lines, the summary after.
    func testLogLinesKeepTheirPlaceBesideTheProgressLines() throws {
        let (teacher, _, _) = try SynthesisTests.tinyTeacher()
        let out = temporaryDirectory().appendingPathComponent("p.tar")
        let command = [
            try toolURL("hrhf-synth").path, "--model", teacher.path, "--classes", "1-2", "--count", "2",
            "--synth-iterations", "2", "--resolution", "16", "--threads", "1", "--out", out.path,
        ].map { "'\($0)'" }.joined(separator: " ")
        let r = try runProcess(URL(fileURLWithPath: "/bin/sh"), ["-c", command + " 2>&1"])
        XCTAssertEqual(r.status, 0, r.stdout)
        let lines = r.stdout.split(separator: "\n").map(String.init)
        let header = try XCTUnwrap(lines.firstIndex { $0.hasPrefix("inverting ") }, r.stdout)
        let firstProgress = try XCTUnwrap(lines.firstIndex { $0.hasPrefix("synth 1/2") }, r.stdout)
        let summary = try XCTUnwrap(lines.firstIndex { $0.hasPrefix("synthetic pack") }, r.stdout)
        XCTAssertLessThan(header, firstProgress, r.stdout)
        XCTAssertLessThan(firstProgress, summary, r.stdout)
    }
}
