import Foundation

// Elementwise arithmetic with NumPy/PyTorch broadcasting (shapes aligned at the right, each
// dimension equal or 1), up to rank 4. Backward sums the gradient over broadcast dimensions.

/// The shape padded on the left with ones to rank 4.
@inline(__always)
func padded4(_ shape: [Int]) -> [Int] {
    precondition(shape.count <= 4, "broadcasting supports rank 4 at most, got \(shape)")
    return Array(repeating: 1, count: 4 - shape.count) + shape
}

/// Row-major strides of a rank-4 shape, with 0 where the dimension is broadcast to `out`.
@inline(__always)
func broadcastStrides(_ shape4: [Int], to out4: [Int]) -> [Int] {
    var strides = [0, 0, 0, 0]
    var s = 1
    for d in stride(from: 3, through: 0, by: -1) {
        strides[d] = (shape4[d] == 1 && out4[d] != 1) ? 0 : s
        s *= shape4[d]
    }
    return strides
}

public func broadcastShape(_ a: [Int], _ b: [Int]) -> [Int] {
    let rank = max(a.count, b.count)
    let pa = Array(repeating: 1, count: rank - a.count) + a
    let pb = Array(repeating: 1, count: rank - b.count) + b
    return (0..<rank).map { d in
        precondition(
            pa[d] == pb[d] || pa[d] == 1 || pb[d] == 1,
            "shapes \(a) and \(b) do not broadcast")
        return max(pa[d], pb[d])
    }
}

/// out[i] = body(a[i'], b[i'']) over the broadcast shape.
@inline(__always)
func broadcastBinary(_ a: Tensor, _ b: Tensor, _ body: (Float, Float) -> Float) -> Tensor {
    let outShape = broadcastShape(a.shape, b.shape)
    let out = Tensor(uninitialized: outShape)
    let pa = a.pointer, pb = b.pointer, po = out.pointer
    let n = out.count
    if a.shape == b.shape {
        parallelBlocks(n, minBlock: parallelGrain) { r in
            for i in r { po[i] = body(pa[i], pb[i]) }
        }
        return out
    }
    if b.count == 1 && a.count == n {
        let bv = pb[0]
        parallelBlocks(n, minBlock: parallelGrain) { r in
            for i in r { po[i] = body(pa[i], bv) }
        }
        return out
    }
    if a.count == 1 && b.count == n {
        let av = pa[0]
        parallelBlocks(n, minBlock: parallelGrain) { r in
            for i in r { po[i] = body(av, pb[i]) }
        }
        return out
    }
    let o4 = padded4(outShape)
    let sa = broadcastStrides(padded4(a.shape), to: o4)
    let sb = broadcastStrides(padded4(b.shape), to: o4)
    let rows = o4[0] * o4[1] * o4[2]
    parallelBlocks(rows, minBlock: max(1, parallelGrain / max(o4[3], 1))) { r in
        for row in r {
            let i2 = row % o4[2], i1 = (row / o4[2]) % o4[1], i0 = row / (o4[2] * o4[1])
            let baseA = i0 * sa[0] + i1 * sa[1] + i2 * sa[2]
            let baseB = i0 * sb[0] + i1 * sb[1] + i2 * sb[2]
            let baseO = row * o4[3]
            for i3 in 0..<o4[3] {
                po[baseO + i3] = body(pa[baseA + i3 * sa[3]], pb[baseB + i3 * sb[3]])
            }
        }
    }
    return out
}

/// Sums `g` down to `shape` (the reverse of broadcasting).
public func sumToShape(_ g: Tensor, _ shape: [Int]) -> Tensor {
    if g.shape == shape { return g }
    let g4 = padded4(g.shape), s4 = padded4(shape)
    let axes = (0..<4).filter { s4[$0] == 1 && g4[$0] != 1 }
    let reduced = reduceSum(Tensor(shape: g4, storage: g.storage), axes: axes)
    return Tensor(shape: shape, storage: reduced.storage)
}

/// Sum over `axes` of a tensor (rank at most 4) into a tensor whose reduced axes have size 1.
/// Accumulates in Double so long sums stay accurate.
func reduceSum(_ x: Tensor, axes: [Int]) -> Tensor {
    var outShape = x.shape
    for a in axes { outShape[a] = 1 }
    let out = Tensor(uninitialized: outShape)
    let x4 = padded4(x.shape)
    let os = broadcastStrides(padded4(outShape), to: x4)
    var acc = [Double](repeating: 0, count: out.count)
    let px = x.pointer
    // Parallel over output elements is awkward for arbitrary axes; reductions here are off the
    // hot path (batch norm and losses have their own kernels).
    acc.withUnsafeMutableBufferPointer { accp in
        var i = 0
        for i0 in 0..<x4[0] {
            for i1 in 0..<x4[1] {
                for i2 in 0..<x4[2] {
                    let base = i0 * os[0] + i1 * os[1] + i2 * os[2]
                    if os[3] == 0 {
                        var s = 0.0
                        for _ in 0..<x4[3] {
                            s += Double(px[i])
                            i += 1
                        }
                        accp[base] += s
                    } else {
                        for i3 in 0..<x4[3] {
                            accp[base + i3] += Double(px[i])
                            i += 1
                        }
                    }
                }
            }
        }
    }
    for j in 0..<out.count { out.pointer[j] = Float(acc[j]) }
    return out
}

/// `g` broadcast to `shape` into fresh memory.
public func broadcastTo(_ g: Tensor, _ shape: [Int]) -> Tensor {
    broadcastBinary(g, Tensor(zeros: shape)) { a, _ in a }
}

// MARK: - Binary operators

public func + (a: Tensor, b: Tensor) -> Tensor {
    let out = broadcastBinary(a, b) { $0 + $1 }
    record(out, "add", [a, b]) { g in
        [a.requiresGrad ? sumToShape(g, a.shape) : nil, b.requiresGrad ? sumToShape(g, b.shape) : nil]
    }
    return out
}

public func - (a: Tensor, b: Tensor) -> Tensor {
    let out = broadcastBinary(a, b) { $0 - $1 }
    record(out, "sub", [a, b]) { g in
        [
            a.requiresGrad ? sumToShape(g, a.shape) : nil,
            b.requiresGrad ? sumToShape(mapValues(g) { -$0 }, b.shape) : nil,
        ]
    }
    return out
}

public func * (a: Tensor, b: Tensor) -> Tensor {
    let out = broadcastBinary(a, b) { $0 * $1 }
    let ad = a.detached(), bd = b.detached()
    record(out, "mul", [a, b]) { g in
        [
            a.requiresGrad ? sumToShape(broadcastBinary(g, bd) { $0 * $1 }, a.shape) : nil,
            b.requiresGrad ? sumToShape(broadcastBinary(g, ad) { $0 * $1 }, b.shape) : nil,
        ]
    }
    return out
}

public func / (a: Tensor, b: Tensor) -> Tensor {
    let out = broadcastBinary(a, b) { $0 / $1 }
    let bd = b.detached(), od = out.detached()
    record(out, "div", [a, b]) { g in
        let ga = broadcastBinary(g, bd) { $0 / $1 }
        return [
            a.requiresGrad ? sumToShape(ga, a.shape) : nil,
            b.requiresGrad ? sumToShape(broadcastBinary(ga, od) { -$0 * $1 }, b.shape) : nil,
        ]
    }
    return out
}

public func + (a: Tensor, s: Float) -> Tensor {
    let out = mapValues(a) { $0 + s }
    record(out, "add_scalar", [a]) { g in [g] }
    return out
}

public func - (a: Tensor, s: Float) -> Tensor { a + (-s) }
public func + (s: Float, a: Tensor) -> Tensor { a + s }
public func - (s: Float, a: Tensor) -> Tensor { (-a) + s }

public func * (a: Tensor, s: Float) -> Tensor {
    let out = mapValues(a) { $0 * s }
    record(out, "mul_scalar", [a]) { g in [mapValues(g) { $0 * s }] }
    return out
}

public func * (s: Float, a: Tensor) -> Tensor { a * s }
public func / (a: Tensor, s: Float) -> Tensor { a * (1 / s) }

public prefix func - (a: Tensor) -> Tensor { a * -1 }

// MARK: - Unary maps

/// body applied to every value, into fresh memory; outside autograd.
@inline(__always)
func mapValues(_ x: Tensor, _ body: (Float) -> Float) -> Tensor {
    let out = Tensor(uninitialized: x.shape)
    let px = x.pointer, po = out.pointer
    parallelBlocks(x.count, minBlock: parallelGrain) { r in
        for i in r { po[i] = body(px[i]) }
    }
    return out
}

/// body(a[i], b[i]) for same-shape tensors, into fresh memory; outside autograd.
@inline(__always)
func zipValues(_ a: Tensor, _ b: Tensor, _ body: (Float, Float) -> Float) -> Tensor {
    precondition(a.shape == b.shape, "shape mismatch \(a.shape) vs \(b.shape)")
    return broadcastBinary(a, b, body)
}

public func exp(_ x: Tensor) -> Tensor {
    let out = Tensor(uninitialized: x.shape)
    let px = x.pointer, po = out.pointer
    parallelBlocks(x.count, minBlock: parallelGrain) { r in
        vectorExp(px + r.lowerBound, po + r.lowerBound, count: r.count)
    }
    let od = out.detached()
    record(out, "exp", [x]) { g in [zipValues(g, od) { $0 * $1 }] }
    return out
}

public func log(_ x: Tensor) -> Tensor {
    let out = mapValues(x) { Foundation.log($0) }
    let xd = x.detached()
    record(out, "log", [x]) { g in [zipValues(g, xd) { $0 / $1 }] }
    return out
}

public func sqrt(_ x: Tensor) -> Tensor {
    let out = mapValues(x) { $0.squareRoot() }
    let od = out.detached()
    record(out, "sqrt", [x]) { g in [zipValues(g, od) { $0 * 0.5 / $1 }] }
    return out
}

public func square(_ x: Tensor) -> Tensor {
    let out = mapValues(x) { $0 * $0 }
    let xd = x.detached()
    record(out, "square", [x]) { g in [zipValues(g, xd) { 2 * $0 * $1 }] }
    return out
}

/// |x|, with gradient sign(x) (0 at 0, as PyTorch).
public func abs(_ x: Tensor) -> Tensor {
    let out = mapValues(x) { Swift.abs($0) }
    let xd = x.detached()
    record(out, "abs", [x]) { g in
        [zipValues(g, xd) { $1 > 0 ? $0 : ($1 < 0 ? -$0 : 0) }]
    }
    return out
}

/// x^p for a constant exponent.
public func pow(_ x: Tensor, _ p: Float) -> Tensor {
    let out = mapValues(x) { Foundation.pow($0, p) }
    let xd = x.detached()
    record(out, "pow", [x]) { g in [zipValues(g, xd) { $0 * p * Foundation.pow($1, p - 1) }] }
    return out
}
