import XCTest

@testable import HRHF

final class VectorMathTests: XCTestCase {
    /// The vectorised exp against glibc's expf over the whole float range that softmax meets:
    /// relative error at most 5e-7 (a few ulp; the Cephes polynomial's documented bound is
    /// about 2 ulp), exactly 0 below the underflow threshold, inf above overflow, NaN kept, and
    /// the tail of a length that is not a multiple of 8 handled like the rest.
    func testVectorExpMatchesFoundation() {
        var xs: [Float] = stride(from: Float(-87), through: 88, by: 0.0137).map { $0 }
        xs += [0, -0.0, 1e-8, -1e-8, 0.5, -0.5, 88.3, -87.3]
        var worst: Float = 0
        xs.withUnsafeBufferPointer { px in
            var ys = [Float](repeating: 0, count: xs.count)
            ys.withUnsafeMutableBufferPointer { py in vectorExp(px.baseAddress!, py.baseAddress!, count: xs.count) }
            for (x, y) in zip(xs, ys) {
                let ref = Foundation.exp(x)
                worst = max(worst, Swift.abs(y - ref) / ref)
            }
        }
        XCTAssertLessThanOrEqual(worst, 5e-7)
        let edges: [Float] = [-.infinity, -200, -90, 89, 200, .infinity, .nan]
        var out = [Float](repeating: -1, count: edges.count)
        edges.withUnsafeBufferPointer { px in
            out.withUnsafeMutableBufferPointer { py in vectorExp(px.baseAddress!, py.baseAddress!, count: edges.count) }
        }
        XCTAssertEqual(Array(out[0..<3]), [0, 0, 0])
        XCTAssertEqual(Array(out[3..<6]), [.infinity, .infinity, .infinity])
        XCTAssertTrue(out[6].isNaN)
        // The shifted form: exp(x - s) per element.
        let x: [Float] = (0..<13).map { Float($0) * 0.7 - 3 }, s: [Float] = (0..<13).map { Float($0) * 0.2 }
        var y = [Float](repeating: 0, count: 13)
        x.withUnsafeBufferPointer { px in
            s.withUnsafeBufferPointer { ps in
                y.withUnsafeMutableBufferPointer { py in
                    vectorExp(px.baseAddress!, minus: ps.baseAddress!, py.baseAddress!, count: 13)
                }
            }
        }
        for i in 0..<13 {
            XCTAssertEqual(y[i], Foundation.exp(x[i] - s[i]), accuracy: 5e-7 * Foundation.exp(x[i] - s[i]))
        }
    }

    /// The vectorised log against glibc's logf from 1e-38 to 3e38 and around 1 (where log is
    /// near 0): error at most 1.5e-7 times max(1, |log x|); values outside the positive normal
    /// range (0, denormals, negatives, inf, NaN) give exactly glibc's results.
    func testVectorLogMatchesFoundation() {
        var xs: [Float] = stride(from: Float(-87.3), through: 88.7, by: 0.0113).map { Foundation.exp($0) }
        xs += stride(from: Float(0.99), through: 1.01, by: 1e-5).map { $0 } + [1, 0.5, 2, 0.70710677, 0.7071068]
        xs += [Float.leastNormalMagnitude, Float.greatestFiniteMagnitude]
        var worst: Float = 0
        for start in stride(from: 0, to: xs.count - 7, by: 8) {
            let y = simdLog(SIMD8(xs[start..<(start + 8)]))
            for l in 0..<8 {
                let ref = Foundation.log(xs[start + l])
                worst = max(worst, Swift.abs(y[l] - ref) / max(1, Swift.abs(ref)))
            }
        }
        XCTAssertLessThanOrEqual(worst, 1.5e-7)
        let denormal = Float.leastNonzeroMagnitude * 1000
        let edges = SIMD8<Float>(0, -0.0, denormal, -1, .infinity, -.infinity, .nan, 3)
        let y = simdLog(edges)
        XCTAssertEqual(
            [y[0], y[1], y[2], y[4], y[7]],
            [-.infinity, -.infinity, Foundation.log(denormal), .infinity, Foundation.log(3)])
        XCTAssertTrue(y[3].isNaN && y[5].isNaN && y[6].isNaN)
    }
}
