import Foundation

// Softmax, log-softmax and logsumexp over the channel axis (dim 1) of N x C x ... tensors:
// for segmentation logits, one distribution per pixel.

/// (batch, channels, positions per channel) of an N x C x ... tensor.
@inline(__always)
func channelLayout(_ x: Tensor, _ op: String) -> (n: Int, c: Int, inner: Int) {
    precondition(x.rank >= 2, "\(op) expects N x C x ..., got \(x.shape)")
    return (x.shape[0], x.shape[1], x.shape[2...].reduce(1, *))
}

/// Pixels per block of the channel-wise kernels: each block walks every channel's row of
/// contiguous pixels (unit stride), instead of striding across channels pixel by pixel.
let pixelBlock = 512

/// Calls body(image, first pixel, pixel count) over blocks of contiguous pixels, in parallel.
@inline(__always)
func forEachPixelBlock(n: Int, c: Int, inner: Int, _ body: (Int, Int, Int) -> Void) {
    let blocksPerImage = (inner + pixelBlock - 1) / pixelBlock
    parallelBlocks(n * blocksPerImage, minBlock: max(1, parallelGrain / max(c * pixelBlock, 1))) { r in
        for blk in r {
            let b = blk / blocksPerImage, i0 = (blk % blocksPerImage) * pixelBlock
            body(b, i0, min(pixelBlock, inner - i0))
        }
    }
}

/// Log-sum-exp over channels of `count` contiguous pixels starting at `base` (channel stride
/// `inner`), into `out`.
@inline(__always)
func blockLogSumExp(
    _ base: UnsafeMutablePointer<Float>, c: Int, inner: Int, count: Int, into out: UnsafeMutablePointer<Float>
) {
    blockLogSumExp(UnsafePointer(base), channels: [0..<c], scale: 1, inner: inner, count: count, into: out)
}

/// Log-sum-exp over the channels `channels` (ranges of channel indices) of `count` contiguous
/// pixels starting at `base` (channel stride `inner`), into `out`; `scale` multiplies every
/// value first (a temperature's 1 / T). Eight pixels at a time, each group's channels read
/// twice (maximum, then the sum of exp(x - max)) while they are in cache.
@inline(__always)
func blockLogSumExp(
    _ base: UnsafePointer<Float>, channels: [Range<Int>], scale: Float, inner: Int, count: Int,
    into out: UnsafeMutablePointer<Float>
) {
    var i = 0
    while i < count {
        let lanes = min(8, count - i)
        var peak = SIMD8<Float>(repeating: -.infinity)
        for range in channels {
            for k in range { peak = pointwiseMax(peak, loadLanes(base + k * inner + i, lanes) * scale) }
        }
        var sums = SIMD8<Float>(repeating: 0)
        for range in channels {
            for k in range { sums += simdExp(loadLanes(base + k * inner + i, lanes) * scale - peak) }
        }
        // A pixel whose channels are all -inf keeps -inf (its sums are NaN).
        for l in 0..<lanes { out[i + l] = peak[l] > -.infinity ? peak[l] + Foundation.log(sums[l]) : peak[l] }
        i += 8
    }
}

/// `lanes` (at most 8) floats from `p`, the remaining lanes 0.
@inline(__always)
func loadLanes(_ p: UnsafePointer<Float>, _ lanes: Int) -> SIMD8<Float> {
    if lanes == 8 { return UnsafeRawPointer(p).loadUnaligned(as: SIMD8<Float>.self) }
    var v = SIMD8<Float>(repeating: 0)
    for l in 0..<lanes { v[l] = p[l] }
    return v
}

/// Maximum over channels of `count` contiguous pixels starting at `base`, into `out`.
@inline(__always)
func blockChannelMax(
    _ base: UnsafeMutablePointer<Float>, c: Int, inner: Int, count: Int, into out: UnsafeMutablePointer<Float>
) {
    out.update(repeating: -.infinity, count: count)
    for k in 0..<c {
        let row = base + k * inner
        for i in 0..<count { out[i] = max(out[i], row[i]) }
    }
}

public func softmax(_ x: Tensor) -> Tensor {
    let (n, c, inner) = channelLayout(x, "softmax")
    let out = Tensor(zeros: x.shape)
    let px = x.pointer, po = out.pointer
    forEachPixelBlock(n: n, c: c, inner: inner) { b, i0, count in
        let base = b * c * inner + i0
        // One exp per element: exp(x - max) into the output, then divide by the sum.
        withUnsafeTemporaryAllocation(of: Float.self, capacity: 2 * count) { scratch in
            let peak = scratch.baseAddress!, sums = peak + count
            blockChannelMax(px + base, c: c, inner: inner, count: count, into: peak)
            sums.update(repeating: 0, count: count)
            for k in 0..<c {
                let dst = po + base + k * inner
                vectorExp(px + base + k * inner, minus: peak, dst, count: count)
                for i in 0..<count { sums[i] += dst[i] }
            }
            for i in 0..<count { sums[i] = 1 / sums[i] }
            for k in 0..<c {
                let dst = po + base + k * inner
                for i in 0..<count { dst[i] *= sums[i] }
            }
        }
    }
    let od = out.detached()
    record(out, "softmax", [x]) { g in
        // dx = y * (g - sum_c g y)
        let gx = Tensor(zeros: g.shape)
        let pg = g.pointer, py = od.pointer, pgx = gx.pointer
        forEachPixelBlock(n: n, c: c, inner: inner) { b, i0, count in
            let base = b * c * inner + i0
            withUnsafeTemporaryAllocation(of: Float.self, capacity: count) { dot in
                dot.initialize(repeating: 0)
                for k in 0..<c {
                    let gr = pg + base + k * inner, yr = py + base + k * inner
                    for i in 0..<count { dot[i] += gr[i] * yr[i] }
                }
                for k in 0..<c {
                    let gr = pg + base + k * inner, yr = py + base + k * inner, r = pgx + base + k * inner
                    for i in 0..<count { r[i] = yr[i] * (gr[i] - dot[i]) }
                }
            }
        }
        return [gx]
    }
    return out
}

public func logSoftmax(_ x: Tensor) -> Tensor {
    let (n, c, inner) = channelLayout(x, "log_softmax")
    let out = Tensor(zeros: x.shape)
    let px = x.pointer, po = out.pointer
    forEachPixelBlock(n: n, c: c, inner: inner) { b, i0, count in
        let base = b * c * inner + i0
        withUnsafeTemporaryAllocation(of: Float.self, capacity: count) { lse in
            blockLogSumExp(px + base, c: c, inner: inner, count: count, into: lse.baseAddress!)
            for k in 0..<c {
                let src = px + base + k * inner, dst = po + base + k * inner
                for i in 0..<count { dst[i] = src[i] - lse[i] }
            }
        }
    }
    let od = out.detached()
    record(out, "log_softmax", [x]) { g in
        // dx = g - softmax * sum_c g
        let gx = Tensor(zeros: g.shape)
        let pg = g.pointer, py = od.pointer, pgx = gx.pointer
        forEachPixelBlock(n: n, c: c, inner: inner) { b, i0, count in
            let base = b * c * inner + i0
            withUnsafeTemporaryAllocation(of: Float.self, capacity: count) { total in
                total.initialize(repeating: 0)
                for k in 0..<c {
                    let gr = pg + base + k * inner
                    for i in 0..<count { total[i] += gr[i] }
                }
                for k in 0..<c {
                    let gr = pg + base + k * inner, yr = py + base + k * inner, r = pgx + base + k * inner
                    vectorExp(yr, r, count: count)
                    for i in 0..<count { r[i] = gr[i] - r[i] * total[i] }
                }
            }
        }
        return [gx]
    }
    return out
}

/// log(sum_c exp(x_c)) per pixel, keeping the channel axis with size 1.
public func logSumExp(_ x: Tensor) -> Tensor {
    let (n, c, inner) = channelLayout(x, "logsumexp")
    var shape = x.shape
    shape[1] = 1
    let out = Tensor(zeros: shape)
    let px = x.pointer, po = out.pointer
    forEachPixelBlock(n: n, c: c, inner: inner) { b, i0, count in
        blockLogSumExp(px + b * c * inner + i0, c: c, inner: inner, count: count, into: po + b * inner + i0)
    }
    let xd = x.detached(), od = out.detached()
    record(out, "logsumexp", [x]) { g in
        // dx = g * softmax(x)
        let gx = Tensor(zeros: xd.shape)
        let pg = g.pointer, pl = od.pointer, pgx = gx.pointer, pxd = xd.pointer
        forEachPixelBlock(n: n, c: c, inner: inner) { b, i0, count in
            let base = b * c * inner + i0, j = b * inner + i0
            for k in 0..<c {
                let xr = pxd + base + k * inner, r = pgx + base + k * inner
                vectorExp(xr, minus: pl + j, r, count: count)
                for i in 0..<count { r[i] *= pg[j + i] }
            }
        }
        return [gx]
    }
    return out
}

/// The channel with the largest value at every pixel, and that value (first maximum wins).
public func channelArgmax(_ x: Tensor) -> (indices: [Int32], values: [Float]) {
    let (n, c, inner) = channelLayout(x, "argmax")
    var indices = [Int32](repeating: 0, count: n * inner), values = [Float](repeating: 0, count: n * inner)
    let px = x.pointer
    indices.withUnsafeMutableBufferPointer { pi in
        values.withUnsafeMutableBufferPointer { pv in
            let pi = pi.baseAddress!, pv = pv.baseAddress!
            forEachPixelBlock(n: n, c: c, inner: inner) { b, i0, count in
                let j0 = b * inner + i0, base = b * c * inner + i0
                (pv + j0).update(from: px + base, count: count)
                (pi + j0).update(repeating: 0, count: count)
                for k in 1..<max(c, 1) {
                    let row = px + base + k * inner
                    for i in 0..<count where row[i] > pv[j0 + i] {
                        pv[j0 + i] = row[i]
                        pi[j0 + i] = Int32(k)
                    }
                }
            }
        }
    }
    return (indices, values)
}

/// Row k of the result is the mean of the channel vectors of the pixels assigned to class k
/// (`assignment[n * H * W + i]`, -1 for none): K x C out, zero rows for classes without
/// pixels. The gradient of a row is shared equally by its pixels.
public func classConditionalMeans(_ x: Tensor, assignment: [Int32], classes k: Int) -> Tensor {
    let (n, c, inner) = channelLayout(x, "class means")
    precondition(assignment.count == n * inner, "class means: \(assignment.count) assignments for \(n * inner) pixels")
    var counts = [Float](repeating: 0, count: k)
    for a in assignment where a >= 0 { counts[Int(a)] += 1 }
    let out = Tensor(zeros: [k, c])
    let px = x.pointer, po = out.pointer
    // Parallel over channels: each channel's sums are its own.
    parallelBlocks(c) { r in
        for ch in r {
            var sums = [Double](repeating: 0, count: k)
            for b in 0..<n {
                let row = px + (b * c + ch) * inner
                for i in 0..<inner {
                    let a = Int(assignment[b * inner + i])
                    if a >= 0 { sums[a] += Double(row[i]) }
                }
            }
            for q in 0..<k where counts[q] > 0 { po[q * c + ch] = Float(sums[q] / Double(counts[q])) }
        }
    }
    let shape = x.shape
    record(out, "class_means", [x]) { g in
        let gx = Tensor(zeros: shape)
        let pg = g.pointer, pgx = gx.pointer
        parallelBlocks(c) { r in
            for ch in r {
                for b in 0..<n {
                    let row = pgx + (b * c + ch) * inner
                    for i in 0..<inner {
                        let a = Int(assignment[b * inner + i])
                        if a >= 0 { row[i] = pg[a * c + ch] / counts[a] }
                    }
                }
            }
        }
        return [gx]
    }
    return out
}
