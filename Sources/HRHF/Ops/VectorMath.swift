import Foundation

// A vectorised exp for the channel kernels (softmax, log-softmax, logsumexp and their
// gradients), where glibc's scalar expf was the largest single cost of a distillation
// iteration. Cephes' single-precision polynomial on a Cody-Waite reduced argument, 8 lanes
// at a time: relative error a few 1e-7 over the normal range (tested against Foundation.exp);
// 0 below -87.3 where expf returns denormals (an absolute difference under 1.2e-38); +inf
// above 88.4; NaN stays NaN.

private let expHi: Float = 88.3762626647949
private let expLo: Float = -87.3365447504
private let log2e: Float = 1.44269504088896341
private let ln2Hi: Float = 0.693359375
private let ln2Lo: Float = -2.12194440e-4

/// 1.5 * 2^23: adding it rounds a float to an integer held in the low mantissa bits (the
/// generic SIMD float-to-int conversions are not vectorised: they cost more than expf itself).
private let roundingMagic: Float = 12582912.0
private let roundingMagicBits: Int32 = 0x4B40_0000

// Transparent: inlined before optimisation, so a large caller still gets it in line (the
// optimiser's inliner stops at a caller size, and a call spills every live vector register).
@_transparent
func simdExp(_ x: SIMD8<Float>) -> SIMD8<Float> {
    var c = x
    c.replace(with: SIMD8(repeating: expLo), where: x .< expLo)
    c.replace(with: SIMD8(repeating: expHi), where: x .> expHi)
    // n = round(x / ln 2), r = x - n ln 2 (in two parts for precision), exp(x) = 2^n exp(r).
    let t = c * log2e + roundingMagic
    let n = t - roundingMagic
    var r = c - n * ln2Hi
    r = r - n * ln2Lo
    var p = SIMD8<Float>(repeating: 1.9875691500e-4)
    p = p * r + 1.3981999507e-3
    p = p * r + 8.3334519073e-3
    p = p * r + 4.1665795894e-2
    p = p * r + 1.6666665459e-1
    p = p * r + 5.0000001201e-1
    p = p * (r * r) + r + 1
    // 2^n through the exponent bits: t's bit pattern is the magic's plus n.
    let bits = (unsafeBitCast(t, to: SIMD8<Int32>.self) &- roundingMagicBits &+ 127) &<< 23
    var y = p * unsafeBitCast(bits, to: SIMD8<Float>.self)
    y.replace(with: 0, where: x .< expLo)
    y.replace(with: .infinity, where: x .> expHi)
    y.replace(with: x, where: x .!= x)
    return y
}

/// y[i] = exp(x[i]) for i < count (x and y may be the same buffer).
@inline(__always)
func vectorExp(_ x: UnsafePointer<Float>, _ y: UnsafeMutablePointer<Float>, count: Int) {
    var i = 0
    while i + 8 <= count {
        let v = UnsafeRawPointer(x + i).loadUnaligned(as: SIMD8<Float>.self)
        UnsafeMutableRawPointer(y + i).storeBytes(of: simdExp(v), as: SIMD8<Float>.self)
        i += 8
    }
    if i < count {
        var v = SIMD8<Float>(repeating: 0)
        for k in 0..<(count - i) { v[k] = x[i + k] }
        let e = simdExp(v)
        for k in 0..<(count - i) { y[i + k] = e[k] }
    }
}

/// y[i] = exp(x[i] - shift[i]) for i < count.
@inline(__always)
func vectorExp(
    _ x: UnsafePointer<Float>, minus shift: UnsafePointer<Float>, _ y: UnsafeMutablePointer<Float>, count: Int
) {
    var i = 0
    while i + 8 <= count {
        let v = UnsafeRawPointer(x + i).loadUnaligned(as: SIMD8<Float>.self)
        let s = UnsafeRawPointer(shift + i).loadUnaligned(as: SIMD8<Float>.self)
        UnsafeMutableRawPointer(y + i).storeBytes(of: simdExp(v - s), as: SIMD8<Float>.self)
        i += 8
    }
    if i < count {
        var v = SIMD8<Float>(repeating: 0)
        for k in 0..<(count - i) { v[k] = x[i + k] - shift[i + k] }
        let e = simdExp(v)
        for k in 0..<(count - i) { y[i + k] = e[k] }
    }
}

// A vectorised natural log for the log-sum-exps of the channel kernels: Cephes' single-precision
// polynomial on the mantissa in [sqrt(1/2), sqrt(2)), 8 lanes at a time; a group holding a
// value outside the positive normal range (0, denormals, negatives, inf, NaN) goes through
// Foundation.log lane by lane, so those keep glibc's results.

private let sqrtHalf: Float = 0.707106781186547524

@_transparent
func simdLog(_ x: SIMD8<Float>) -> SIMD8<Float> {
    let outside = (x .< Float.leastNormalMagnitude) .| (x .> Float.greatestFiniteMagnitude) .| (x .!= x)
    if any(outside) {
        var y = x
        for l in 0..<8 { y[l] = Foundation.log(x[l]) }
        return y
    }
    // x = m 2^e with m in [0.5, 1), then m in [sqrt(1/2), sqrt(2)) and f = m - 1.
    let bits = unsafeBitCast(x, to: SIMD8<Int32>.self)
    var e = (bits &>> 23) &- 126
    var m = unsafeBitCast((bits & 0x007F_FFFF) | 0x3F00_0000, to: SIMD8<Float>.self)
    let low = m .< sqrtHalf
    e.replace(with: e &- 1, where: low)
    m.replace(with: m + m, where: low)
    let f = m - 1
    let exponent = unsafeBitCast(e &+ roundingMagicBits, to: SIMD8<Float>.self) - roundingMagic
    let z = f * f
    var p = SIMD8<Float>(repeating: 7.0376836292e-2)
    p = p * f - 1.1514610310e-1
    p = p * f + 1.1676998740e-1
    p = p * f - 1.2420140846e-1
    p = p * f + 1.4249322787e-1
    p = p * f - 1.6668057665e-1
    p = p * f + 2.0000714765e-1
    p = p * f - 2.4999993993e-1
    p = p * f + 3.3333331174e-1
    var y = p * f * z
    y = y + exponent * ln2Lo
    y = y - 0.5 * z
    return f + y + exponent * ln2Hi
}
