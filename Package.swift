// swift-tools-version:6.0
import Foundation
import PackageDescription

// The core library's SIMD8 loops run on 256-bit AVX2 registers when the building machine has
// AVX2 (as -march=native would; Swift's default target is SSE2, which splits each SIMD8 in two).
// LLVM neither fuses multiply-adds nor reorders float sums without fast-math, so results are the
// same bit for bit. HRHF_PORTABLE=1 builds for any x86-64 (binaries for other machines).
let hostHasAVX2 =
    (try? String(contentsOfFile: "/proc/cpuinfo", encoding: .utf8))?.split(separator: "\n")
    .first { $0.hasPrefix("flags") }?.split(separator: " ").contains("avx2") ?? false
let portable = ProcessInfo.processInfo.environment["HRHF_PORTABLE"] == "1"
let vectorSettings: [SwiftSetting] =
    hostHasAVX2 && !portable ? [.unsafeFlags(["-target-cpu", "haswell"], .when(platforms: [.linux]))] : []

// C libraries come from Debian packages (see .ci/run); each is a system-library target
// found through pkg-config.
let package = Package(
    name: "HRHF",
    platforms: [.macOS(.v13)],
    products: [
        .library(name: "HRHF", targets: ["HRHF"]),
        .executable(name: "hrhf-bench", targets: ["hrhf-bench"]),
        .executable(name: "hrhf-convert", targets: ["hrhf-convert"]),
        .executable(name: "hrhf-predict", targets: ["hrhf-predict"]),
        .executable(name: "hrhf-data", targets: ["hrhf-data"]),
        .executable(name: "hrhf-train", targets: ["hrhf-train"]),
        .executable(name: "hrhf-eval", targets: ["hrhf-eval"]),
        .executable(name: "hrhf-synth", targets: ["hrhf-synth"]),
        .executable(name: "hrhf-pack", targets: ["hrhf-pack"]),
        .executable(name: "hrhf-distill", targets: ["hrhf-distill"]),
        .executable(name: "hrhf-fuzz", targets: ["hrhf-fuzz"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0"),
        .package(url: "https://github.com/apple/swift-crypto", from: "3.12.0"),
    ],
    targets: [
        .systemLibrary(
            name: "COpenBLAS", pkgConfig: "openblas",
            providers: [.apt(["libopenblas-dev"])]),
        .systemLibrary(name: "CPNG", pkgConfig: "libpng16", providers: [.apt(["libpng-dev"])]),
        .systemLibrary(name: "CJPEG", pkgConfig: "libjpeg", providers: [.apt(["libjpeg-dev"])]),
        .systemLibrary(
            name: "CArchive", pkgConfig: "libarchive",
            providers: [.apt(["libarchive-dev"])]),
        .systemLibrary(name: "CMPI", pkgConfig: "ompi-c", providers: [.apt(["libopenmpi-dev", "openmpi-bin"])]),
        // setjmp/longjmp error handling for libpng and libjpeg stays inside C.
        .target(name: "CImageIO", dependencies: ["CPNG", "CJPEG"]),
        // libFuzzer's driver, declared for hrhf-fuzz (linked only by -sanitize=fuzzer).
        .systemLibrary(name: "CLibFuzzer"),
        // glibc's malloc tuning (mallopt is not in Swift's Glibc module).
        .target(name: "CMemory"),
        .target(
            name: "HRHF",
            dependencies: [
                "COpenBLAS", "CArchive", "CPNG", "CJPEG", "CImageIO", "CMemory", "CMPI",
                .product(name: "Crypto", package: "swift-crypto"),
            ],
            swiftSettings: vectorSettings
        ),
        .target(
            name: "HRHFCommandLine",
            dependencies: ["HRHF", .product(name: "ArgumentParser", package: "swift-argument-parser")]
        ),
        .executableTarget(name: "hrhf-bench", dependencies: ["HRHFCommandLine"]),
        .executableTarget(name: "hrhf-convert", dependencies: ["HRHFCommandLine"]),
        .executableTarget(name: "hrhf-predict", dependencies: ["HRHFCommandLine"]),
        .executableTarget(name: "hrhf-data", dependencies: ["HRHFCommandLine"]),
        .executableTarget(name: "hrhf-train", dependencies: ["HRHFCommandLine"]),
        .executableTarget(name: "hrhf-eval", dependencies: ["HRHFCommandLine"]),
        .executableTarget(name: "hrhf-synth", dependencies: ["HRHFCommandLine"]),
        .executableTarget(name: "hrhf-pack", dependencies: ["HRHFCommandLine"]),
        .executableTarget(name: "hrhf-distill", dependencies: ["HRHFCommandLine"]),
        // libFuzzer's entry point with -DFUZZING (tools/fuzz.sh), otherwise a replayer of inputs.
        .executableTarget(name: "hrhf-fuzz", dependencies: ["HRHF", "CLibFuzzer"]),
        .testTarget(name: "HRHFTests", dependencies: ["HRHF", "HRHFCommandLine"], exclude: ["Fixtures"]),
    ],
    swiftLanguageModes: [.v5]
)
