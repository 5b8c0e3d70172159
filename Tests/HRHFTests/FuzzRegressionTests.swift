import Foundation
import XCTest

@testable import HRHF

/// Replays the committed fuzz inputs through the very harnesses libFuzzer drives (`FuzzTarget`),
/// without a sanitizer. Fixtures/fuzz-seeds/TARGET holds the seeds (tools/fuzz.sh --make-seeds);
/// Fixtures/fuzz-regressions/TARGET every crash the fuzzer found (tools/fuzz.sh TARGET).
final class FuzzRegressionTests: XCTestCase {
    static let seeds = Fixtures.directory.appendingPathComponent("fuzz-seeds")
    static let regressions = Fixtures.directory.appendingPathComponent("fuzz-regressions")

    /// The files of FOLDER/TARGET, by target; a subfolder that names no target fails the test.
    func inputs(_ folder: URL) throws -> [FuzzTarget: [URL]] {
        let manager = FileManager.default
        guard manager.fileExists(atPath: folder.path) else { return [:] }
        var result: [FuzzTarget: [URL]] = [:]
        for sub in try manager.contentsOfDirectory(atPath: folder.path).sorted() {
            guard let target = FuzzTarget(rawValue: sub) else {
                XCTFail("\(folder.lastPathComponent)/\(sub) is not a fuzz target's folder")
                continue
            }
            let dir = folder.appendingPathComponent(sub)
            result[target] = try manager.contentsOfDirectory(atPath: dir.path).sorted()
                .filter { !$0.hasPrefix(".") }.map { dir.appendingPathComponent($0) }
        }
        return result
    }

    /// Asserts `file` is refused with an error that names it.
    func assertRefused(_ target: FuzzTarget, _ file: URL, line: UInt = #line) throws {
        let outcome = target.run(try Data(contentsOf: file), name: file.lastPathComponent)
        guard case .refused(let message) = outcome else {
            return XCTFail("\(target) \(file.lastPathComponent): \(outcome), expected a refusal", line: line)
        }
        XCTAssertTrue(message.contains(file.lastPathComponent), "\(target): \(message)", line: line)
    }

    func testSeedsAreAcceptedUnlessNamedRefused() throws {
        let seeds = try inputs(Self.seeds)
        // Every harness that has hand-made or tool-made seeds reaches its accepting end with them.
        XCTAssertEqual(Set(seeds.keys), [.pickle, .pth, .safetensors, .pack, .list, .npy])
        for (target, files) in seeds {
            let accepted = files.filter { !$0.lastPathComponent.hasPrefix("refused-") }
            XCTAssertFalse(accepted.isEmpty, "\(target) has no seed it accepts")
            for file in accepted {
                XCTAssertEqual(
                    target.run(try Data(contentsOf: file), name: file.lastPathComponent), .accepted,
                    "\(target) \(file.lastPathComponent)")
            }
            for file in files where file.lastPathComponent.hasPrefix("refused-") {
                try assertRefused(target, file)
            }
        }
    }

    func testRegressionsAreRefusedNamingTheFile() throws {
        for (target, files) in try inputs(Self.regressions) {
            for file in files { try assertRefused(target, file) }
        }
    }

    /// The harnesses' own rules, on inputs built here: what they must flag as a violation.
    func testHarnessFlagsUnsafeDatasetNamesAndKeepsItsFolderClean() throws {
        // A line reaching existing files through ".." gives a name with "/": refused by the reader or
        // flagged by the harness, never accepted.
        let outcome = FuzzTarget.list.run(Data("../SegmentationClass/a\n".utf8), name: "dotdot.txt")
        XCTAssertNotEqual(outcome, .accepted)
        XCTAssertEqual(FuzzTarget.list.run(Data("a\nb\n".utf8), name: "plain.txt"), .accepted)
        let shm = (try? FileManager.default.contentsOfDirectory(atPath: "/dev/shm")) ?? []
        XCTAssertFalse(shm.contains { $0.hasPrefix("hrhf-fuzz-\(getpid())-") }, "scratch folders left: \(shm)")
    }
}
