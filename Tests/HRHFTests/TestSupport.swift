import Foundation
import XCTest

@testable import HRHF

/// The committed fixtures written by the scripts in tools/.
enum Fixtures {
    static let directory = URL(fileURLWithPath: #filePath).deletingLastPathComponent().appendingPathComponent(
        "Fixtures")

    private static var cache: [String: SafeTensorsFile] = [:]
    private static let lock = NSLock()

    static func file(_ name: String) throws -> SafeTensorsFile {
        lock.lock()
        defer { lock.unlock() }
        if let f = cache[name] { return f }
        let f = try SafeTensorsFile.read(directory.appendingPathComponent(name))
        cache[name] = f
        return f
    }

    static func tensor(_ file: String, _ key: String) throws -> Tensor {
        guard let t = try Fixtures.file(file)[key] else {
            throw WeightFileError(file: file, key: key, "fixture missing: regenerate with tools/")
        }
        return t.copy()
    }
}

/// Largest |a - b| divided by the largest |b| (at least `floor`): the relative error of a whole
/// tensor, the measure the parity tolerances are stated in.
func relativeError(_ a: Tensor, _ b: Tensor, floor: Float = 1e-6) -> Float {
    precondition(a.count == b.count, "comparing \(a.shape) with \(b.shape)")
    var diff: Float = 0, scale: Float = floor
    for i in 0..<a.count {
        diff = max(diff, Swift.abs(a.pointer[i] - b.pointer[i]))
        scale = max(scale, Swift.abs(b.pointer[i]))
    }
    return diff / scale
}

func assertClose(
    _ a: Tensor?, _ b: Tensor, tolerance: Float = 1e-4, _ what: String,
    file: StaticString = #filePath, line: UInt = #line
) {
    guard let a else {
        XCTFail("\(what): no value", file: file, line: line)
        return
    }
    XCTAssertEqual(a.count, b.count, "\(what): shape \(a.shape) vs \(b.shape)", file: file, line: line)
    guard a.count == b.count else { return }
    let err = relativeError(a, b)
    XCTAssertLessThanOrEqual(err, tolerance, "\(what): relative error \(err)", file: file, line: line)
}

/// Checks reverse-mode gradients of `f` against central finite differences of the scalar
/// L = sum(f(inputs) * r) for a fixed random r, at `samples` coordinates of each input.
/// float32 rounding bounds how close the two can be: with step h = 1e-2 the difference quotient
/// carries about eps_f32 * |L| / h ~ 1e-4 of noise and O(h^2) truncation, hence the stated
/// tolerance |numeric - analytic| <= atol + rtol * |analytic| (defaults 1e-3 and 3e-3).
func checkGradients(
    _ inputs: [Tensor], samples: Int = 10, step h: Float = 1e-2, atol: Float = 1e-3,
    rtol: Float = 3e-3, seed: UInt64 = 99, file: StaticString = #filePath, line: UInt = #line,
    _ f: ([Tensor]) -> Tensor
) {
    var rng = SeededGenerator(seed: seed)
    for x in inputs {
        x.requiresGrad = true
        x.grad = nil
    }
    let y = f(inputs)
    let r = Tensor.randn(y.shape, rng: &rng)
    let loss = sum(y * r)
    loss.backward()
    func evaluate() -> Double {
        withNoGrad {
            let out = f(inputs)
            var s = 0.0
            for i in 0..<out.count { s += Double(out.pointer[i]) * Double(r.pointer[i]) }
            return s
        }
    }
    for (k, x) in inputs.enumerated() {
        guard let g = x.grad else {
            XCTFail("input \(k) got no gradient", file: file, line: line)
            continue
        }
        let picks =
            x.count <= samples ? Array(0..<x.count) : (0..<samples).map { _ in Int(rng.next() % UInt64(x.count)) }
        for j in picks {
            let saved = x.pointer[j]
            x.pointer[j] = saved + h
            let plus = evaluate()
            x.pointer[j] = saved - h
            let minus = evaluate()
            x.pointer[j] = saved
            let numeric = Float((plus - minus) / Double(2 * h))
            let analytic = g.pointer[j]
            XCTAssertLessThanOrEqual(
                Swift.abs(numeric - analytic), atol + rtol * Swift.abs(analytic),
                "input \(k)[\(j)]: numeric \(numeric) vs analytic \(analytic)",
                file: file, line: line)
        }
    }
}

/// Value and gradient of `loss` at `x`.
func valueAndGradient(_ x: Tensor, _ loss: (Tensor) -> Tensor) -> (Float, [Float]) {
    x.grad = nil
    x.requiresGrad = true
    let value = loss(x)
    value.backward()
    return (value.item, x.grad!.array)
}

func randn(_ shape: [Int], seed: UInt64, std: Float = 1) -> Tensor {
    var rng = SeededGenerator(seed: seed)
    return Tensor.randn(shape, std: std, rng: &rng)
}

func labels(from t: Tensor) -> Labels {
    Labels(shape: t.shape, values: t.array.map { Int32($0) })
}

func temporaryDirectory() -> URL {
    let url = FileManager.default.temporaryDirectory.appendingPathComponent("hrhf-tests-\(UUID().uuidString)")
    try? FileManager.default.createDirectory(at: url, withIntermediateDirectories: true)
    return url
}

/// One of the package's executables, built beside the test bundle.
func toolURL(_ name: String) throws -> URL {
    let candidates = [
        Bundle.main.bundleURL, Bundle.main.bundleURL.deletingLastPathComponent(),
        URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent(),
    ]
    guard
        let dir = candidates.first(where: {
            FileManager.default.isExecutableFile(atPath: $0.appendingPathComponent(name).path)
        })
    else {
        throw XCTSkip("\(name) is not built beside the tests")
    }
    return dir.appendingPathComponent(name)
}

/// Runs one of the package's executables (built beside the test bundle) and returns its exit
/// status, standard output and standard error.
func runTool(_ name: String, _ arguments: [String]) throws -> (status: Int32, stdout: String, stderr: String) {
    try runProcess(try toolURL(name), arguments)
}

/// Runs a program (with `environment` added to this process's) and returns its exit status,
/// standard output and standard error.
func runProcess(
    _ executable: URL, _ arguments: [String],
    environment: [String: String] = [:]
) throws -> (status: Int32, stdout: String, stderr: String) {
    let process = Process()
    process.executableURL = executable
    process.arguments = arguments
    if !environment.isEmpty { process.environment = ProcessInfo.processInfo.environment.merging(environment) { $1 } }
    let out = Pipe(), err = Pipe()
    process.standardOutput = out
    process.standardError = err
    try process.run()
    let stdout = out.fileHandleForReading.readDataToEndOfFile(), stderr = err.fileHandleForReading.readDataToEndOfFile()
    process.waitUntilExit()
    return (process.terminationStatus, String(decoding: stdout, as: UTF8.self), String(decoding: stderr, as: UTF8.self))
}

/// Asserts a command failed cleanly: status 1, stderr naming `names`, nothing at `out`.
func assertFailed(
    _ r: (status: Int32, stdout: String, stderr: String), naming names: [String], out: URL? = nil,
    file: StaticString = #filePath, line: UInt = #line
) {
    XCTAssertEqual(r.status, 1, r.stderr, file: file, line: line)
    for name in names {
        XCTAssertTrue(r.stderr.contains(name), "\(name) not in: \(r.stderr)", file: file, line: line)
    }
    if let out {
        XCTAssertFalse(FileManager.default.fileExists(atPath: out.path), file: file, line: line)
        XCTAssertFalse(FileManager.default.fileExists(atPath: out.path + ".partial"), file: file, line: line)
    }
}
