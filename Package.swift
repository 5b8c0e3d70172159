// swift-tools-version:6.0
import PackageDescription

// C libraries come from Debian packages (see .ci/run); each is a system-library target
// found through pkg-config.
let package = Package(
    name: "HRHF",
    platforms: [.macOS(.v13)],
    products: [
        .library(name: "HRHF", targets: ["HRHF"]),
        .executable(name: "hrhf-bench", targets: ["hrhf-bench"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0"),
    ],
    targets: [
        .systemLibrary(name: "COpenBLAS", pkgConfig: "openblas",
                       providers: [.apt(["libopenblas-dev"])]),
        .systemLibrary(name: "CPNG", pkgConfig: "libpng16", providers: [.apt(["libpng-dev"])]),
        .systemLibrary(name: "CJPEG", pkgConfig: "libjpeg", providers: [.apt(["libjpeg-dev"])]),
        .systemLibrary(name: "CArchive", pkgConfig: "libarchive",
                       providers: [.apt(["libarchive-dev"])]),
        .target(
            name: "HRHF",
            dependencies: ["COpenBLAS"],
            swiftSettings: [.unsafeFlags(["-Ounchecked"], .when(configuration: .release))]
        ),
        .executableTarget(
            name: "hrhf-bench",
            dependencies: ["HRHF", .product(name: "ArgumentParser", package: "swift-argument-parser")]
        ),
        .testTarget(name: "HRHFTests", dependencies: ["HRHF"], exclude: ["Fixtures"]),
    ],
    swiftLanguageModes: [.v5]
)
