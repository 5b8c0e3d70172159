import Foundation
import XCTest

@testable import HRHF

/// OpenBLAS's kernels are chosen again when it took the CPU for its Prescott fallback.
final class BLASKernelTests: XCTestCase {
    func testOnlyThePrescottFallbackIsReplacedByTheWidestKernelsTheCPUCanRun() {
        let avx512: Set = ["sse3", "avx2", "fma", "avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"]
        XCTAssertEqual(OpenBLASKernels.replacement(detected: "Prescott", cpuFlags: avx512), "SkylakeX")
        XCTAssertEqual(OpenBLASKernels.replacement(detected: "Prescott", cpuFlags: ["sse3", "avx2", "fma"]), "Haswell")
        // AVX-512 without byte/word instructions is not SkylakeX's set (Knights Landing).
        let knights: Set = ["avx2", "fma", "avx512f", "avx512cd"]
        XCTAssertEqual(OpenBLASKernels.replacement(detected: "Prescott", cpuFlags: knights), "Haswell")
        XCTAssertNil(OpenBLASKernels.replacement(detected: "Prescott", cpuFlags: ["sse3", "avx"]))
        XCTAssertNil(OpenBLASKernels.replacement(detected: "Haswell", cpuFlags: avx512))
        XCTAssertNil(OpenBLASKernels.replacement(detected: "SkylakeX", cpuFlags: avx512))
    }

    func testThisProcessRunsTheKernelsTheCPUFlagsCallFor() throws {
        let flags = OpenBLASKernels.cpuFlags()
        try XCTSkipIf(flags.isEmpty, "no /proc/cpuinfo")
        try XCTSkipIf(ProcessInfo.processInfo.environment["OPENBLAS_CORETYPE"] != nil, "kernels set by the user")
        let name = OpenBLASKernels.coreName
        XCTAssertNil(OpenBLASKernels.replacement(detected: name, cpuFlags: flags), "still on \(name)")
        // The product is right on the kernels chosen.
        let a: [Float] = [1, 2, 3, 4, 5, 6], b: [Float] = [7, 8, 9, 10, 11, 12]
        var c = [Float](repeating: 0, count: 4)
        sgemm(m: 2, n: 2, k: 3, a: a, lda: 3, b: b, ldb: 2, c: &c, ldc: 2)
        XCTAssertEqual(c, [58, 64, 139, 154])
    }
}
