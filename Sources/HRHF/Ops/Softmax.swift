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
/// value first (a temperature's 1 / T).
@inline(__always)
func blockLogSumExp(
    _ base: UnsafePointer<Float>, channels: [Range<Int>], scale: Float, inner: Int, count: Int,
    into out: UnsafeMutablePointer<Float>
) {
    withUnsafeTemporaryAllocation(of: Float.self, capacity: 2 * paddedBlock) { scratch in
        let peak = scratch.baseAddress!, sum = peak + paddedBlock
        blockExpSums(
            base, runs: channels.map { ($0, false) }, scale: scale, inner: inner, count: count, peak: peak,
            sumAll: sum, sumSubset: nil)
        var i = 0
        while i < count {
            storeLanes(laneLogSumExp(peak: load8(peak + i), sum: load8(sum + i)), out + i, min(8, count - i))
            i += 8
        }
    }
}

/// A pixel block's per-pixel scratch rows hold this many floats (whole groups of 8).
let paddedBlock = (pixelBlock + 7) / 8 * 8

/// Per pixel of a block of `count` (channel stride `inner`): the peak of `scale` x over the
/// channels `rows` into `peak` (whole groups of 8), or of those and the peaks already there
/// when not `resetting`; a NaN is passed over, as `pointwiseMax` does.
@inline(__always)
func blockPeak(
    _ p: UnsafePointer<Float>, rows: Range<Int>, scale: Float, inner: Int, count: Int,
    into peak: UnsafeMutablePointer<Float>, resetting: Bool = true
) {
    if resetting { peak.update(repeating: -.infinity, count: (count + 7) / 8 * 8) }
    for k in rows {
        let row = p + k * inner
        var i = 0
        while i < count {
            let v = loadLanes(row + i, min(8, count - i)) * scale
            var m = load8(peak + i)
            m.replace(with: v, where: v .> m)
            store8(m, peak + i)
            i += 8
        }
    }
}

/// Per pixel of a block of `count` (channel stride `inner`): the peak of `scale` x over the
/// channels of `runs` and the sum of exp(scale x - peak) over them, and over the runs in the
/// subset into `sumSubset`. Channel by channel along contiguous rows (one exp per value), so
/// the hardware prefetcher follows; the per-pixel rows stay in L1.
@inline(__always)
func blockExpSums(
    _ p: UnsafePointer<Float>, runs: [(channels: Range<Int>, inSubset: Bool)], scale: Float, inner: Int, count: Int,
    peak: UnsafeMutablePointer<Float>, sumAll: UnsafeMutablePointer<Float>, sumSubset: UnsafeMutablePointer<Float>?,
    second: (member: [Bool], sum: UnsafeMutablePointer<Float>)? = nil
) {
    let padded = (count + 7) / 8 * 8
    peak.update(repeating: -.infinity, count: padded)
    sumAll.update(repeating: 0, count: padded)
    sumSubset?.update(repeating: 0, count: padded)
    second?.sum.update(repeating: 0, count: padded)
    for run in runs {
        blockPeak(p, rows: run.channels, scale: scale, inner: inner, count: count, into: peak, resetting: false)
    }
    for run in runs {
        for k in run.channels {
            let row = p + k * inner, sumSecond = second.flatMap { $0.member[k] ? $0.sum : nil }
            var i = 0
            while i < count {
                let e = simdExp(loadLanes(row + i, min(8, count - i)) * scale - load8(peak + i))
                store8(load8(sumAll + i) + e, sumAll + i)
                if run.inSubset, let sumSubset { store8(load8(sumSubset + i) + e, sumSubset + i) }
                if let sumSecond { store8(load8(sumSecond + i) + e, sumSecond + i) }
                i += 8
            }
        }
    }
}

/// `lanes` (at most 8) floats from `p`, the remaining lanes 0.
@_transparent
func loadLanes(_ p: UnsafePointer<Float>, _ lanes: Int) -> SIMD8<Float> {
    lanes == 8 ? UnsafeRawPointer(p).loadUnaligned(as: SIMD8<Float>.self) : loadPartialLanes(p, lanes)
}

/// Stores the first `lanes` (at most 8) lanes of `v` at `p`.
@_transparent
func storeLanes(_ v: SIMD8<Float>, _ p: UnsafeMutablePointer<Float>, _ lanes: Int) {
    if lanes == 8 {
        UnsafeMutableRawPointer(p).storeBytes(of: v, as: SIMD8<Float>.self)
    } else {
        storePartialLanes(v, p, lanes)
    }
}

// The partial groups out of line: a kernel's hot loop stays small enough for the optimiser to inline into.
@inline(never)
func loadPartialLanes(_ p: UnsafePointer<Float>, _ lanes: Int) -> SIMD8<Float> {
    var v = SIMD8<Float>(repeating: 0)
    for l in 0..<lanes { v[l] = p[l] }
    return v
}

@inline(never)
func storePartialLanes(_ v: SIMD8<Float>, _ p: UnsafeMutablePointer<Float>, _ lanes: Int) {
    for l in 0..<lanes { p[l] = v[l] }
}

/// peak + log(sum), -inf where the peak is (every channel -inf).
@_transparent
func laneLogSumExp(peak: SIMD8<Float>, sum: SIMD8<Float>) -> SIMD8<Float> {
    var out = peak + simdLog(sum)
    out.replace(with: -.infinity, where: peak .== -.infinity)
    return out
}

/// The channels 0..<c cut into runs that are all inside or all outside `subset`.
func channelRuns(c: Int, subset: [Range<Int>]) -> [(channels: Range<Int>, inSubset: Bool)] {
    var runs: [(channels: Range<Int>, inSubset: Bool)] = []
    for k in 0..<c {
        let inside = subset.contains { $0.contains(k) }
        if let last = runs.last, last.inSubset == inside {
            runs[runs.count - 1].channels = last.channels.lowerBound..<(k + 1)
        } else {
            runs.append((k..<(k + 1), inside))
        }
    }
    return runs
}

/// Log-sum-exp of `scale` x over all channels and over a subset of them (`runs` from
/// `channelRuns`, `subset` its ranges) for a block of `count` pixels, into `all` and `union`,
/// from one exp per value shifted by the overall peak; with `second`, over another subset
/// (`member`: per channel, whether in it) into its `union` from the same exps. A group of
/// pixels whose subset sum is not safely above underflow (the subset far below the peak) takes
/// the subset's own peak, so each matches a separate log-sum-exp bit for bit.
@inline(__always)
func blockLogSumExps(
    _ p: UnsafePointer<Float>, runs: [(channels: Range<Int>, inSubset: Bool)], subset: [Range<Int>], scale: Float,
    inner: Int, count: Int, all: UnsafeMutablePointer<Float>, union: UnsafeMutablePointer<Float>,
    second: (member: [Bool], subset: [Range<Int>], union: UnsafeMutablePointer<Float>)? = nil
) {
    withUnsafeTemporaryAllocation(of: Float.self, capacity: 4 * paddedBlock) { scratch in
        let peak = scratch.baseAddress!, sumAll = peak + paddedBlock, sumSubset = sumAll + paddedBlock
        let sumSecond = sumSubset + paddedBlock
        blockExpSums(
            p, runs: runs, scale: scale, inner: inner, count: count, peak: peak, sumAll: sumAll, sumSubset: sumSubset,
            second: second.map { ($0.member, sumSecond) })
        var i = 0
        while i < count {
            let lanes = min(8, count - i), m = load8(peak + i)
            storeLanes(laneLogSumExp(peak: m, sum: load8(sumAll + i)), all + i, lanes)
            func finish(
                _ sums: UnsafeMutablePointer<Float>, _ channels: [Range<Int>], _ out: UnsafeMutablePointer<Float>
            ) {
                let subsetSum = load8(sums + i)
                if any(.!(subsetSum .>= 1e-25)) {
                    blockLogSumExp(p + i, channels: channels, scale: scale, inner: inner, count: lanes, into: out + i)
                } else {
                    storeLanes(laneLogSumExp(peak: m, sum: subsetSum), out + i, lanes)
                }
            }
            finish(sumSubset, subset, union)
            if let second { finish(sumSecond, second.subset, second.union) }
            i += 8
        }
    }
}

/// Softmax over the channels of `x` into `out`, channel by channel along a pixel block's rows
/// with one exp per value; with `argmax`, also each pixel's most probable channel (first
/// maximum wins, as `channelArgmax` of the result) and its probability, indexed by
/// image * pixels + pixel.
func softmaxForward(
    _ x: Tensor, into out: Tensor, argmax: (indices: UnsafeMutablePointer<Int32>, values: UnsafeMutablePointer<Float>)?
) {
    let (n, c, inner) = channelLayout(x, "softmax")
    let px = x.pointer, po = out.pointer
    forEachPixelBlock(n: n, c: c, inner: inner) { b, i0, count in
        let base = b * c * inner + i0
        blockSoftmax(px + base, channels: c, scale: 1, inner: inner, count: count, into: po + base)
        guard let argmax else { return }
        withUnsafeTemporaryAllocation(of: Float.self, capacity: 2 * paddedBlock) { scratch in
            // The best probability so far and its channel as a float (exact below 2^24).
            let best = scratch.baseAddress!, index = best + paddedBlock
            for k in 0..<c {
                let row = po + base + k * inner
                var i = 0
                while i < count {
                    let y = loadLanes(row + i, min(8, count - i))
                    var top = load8(best + i), channel = load8(index + i)
                    let better = k == 0 ? SIMDMask(repeating: true) : y .> top
                    top.replace(with: y, where: better)
                    channel.replace(with: Float(k), where: better)
                    store8(top, best + i)
                    store8(channel, index + i)
                    i += 8
                }
            }
            let j = b * inner + i0
            (argmax.values + j).update(from: best, count: count)
            for i in 0..<count { argmax.indices[j + i] = Int32(index[i]) }
        }
    }
}

/// softmax's arithmetic over the first `channels` channels of a pixel block at `scale`:
/// exp(scale x - max) per channel, then times 1 / their sum, into `y` (channel stride `inner`),
/// with the log-sum-exp of scale x into `logSumExp` when given.
func blockSoftmax(
    _ x: UnsafePointer<Float>, channels: Int, scale: Float, inner: Int, count: Int, into y: UnsafeMutablePointer<Float>,
    logSumExp: UnsafeMutablePointer<Float>? = nil
) {
    withUnsafeTemporaryAllocation(of: Float.self, capacity: 2 * paddedBlock) { scratch in
        let peak = scratch.baseAddress!, sums = peak + paddedBlock
        blockPeak(x, rows: 0..<channels, scale: scale, inner: inner, count: count, into: peak)
        sums.update(repeating: 0, count: paddedBlock)
        for ch in 0..<channels {
            let row = y + ch * inner, source = x + ch * inner
            var i = 0
            while i < count {
                let lanes = min(8, count - i), e = simdExp(loadLanes(source + i, lanes) * scale - load8(peak + i))
                storeLanes(e, row + i, lanes)
                store8(load8(sums + i) + e, sums + i)
                i += 8
            }
        }
        if let logSumExp {
            var i = 0
            while i < count {
                storeLanes(laneLogSumExp(peak: load8(peak + i), sum: load8(sums + i)), logSumExp + i, min(8, count - i))
                i += 8
            }
        }
        var i = 0
        while i < count {
            store8(1 / load8(sums + i), sums + i)
            i += 8
        }
        for ch in 0..<channels {
            let row = y + ch * inner
            var i = 0
            while i < count {
                let lanes = min(8, count - i)
                storeLanes(loadLanes(row + i, lanes) * load8(sums + i), row + i, lanes)
                i += 8
            }
        }
    }
}

/// Records the backward of `out` = softmax(`x`): dx = y * (g - sum_c g y).
func recordSoftmax(_ out: Tensor, of x: Tensor) {
    let (n, c, inner) = channelLayout(x, "softmax")
    let od = out.detached()
    record(out, "softmax", [x]) { g in
        let gx = Tensor(uninitialized: g.shape)
        let pg = g.pointer, py = od.pointer, pgx = gx.pointer
        forEachPixelBlock(n: n, c: c, inner: inner) { b, i0, count in
            let base = b * c * inner + i0
            withUnsafeTemporaryAllocation(of: Float.self, capacity: paddedBlock) { dot in
                let dot = dot.baseAddress!
                dot.update(repeating: 0, count: paddedBlock)
                for k in 0..<c {
                    let gr = pg + base + k * inner, yr = py + base + k * inner
                    var i = 0
                    while i < count {
                        let lanes = min(8, count - i)
                        store8(load8(dot + i) + loadLanes(gr + i, lanes) * loadLanes(yr + i, lanes), dot + i)
                        i += 8
                    }
                }
                for k in 0..<c {
                    let gr = pg + base + k * inner, yr = py + base + k * inner, r = pgx + base + k * inner
                    var i = 0
                    while i < count {
                        let lanes = min(8, count - i)
                        storeLanes(loadLanes(yr + i, lanes) * (loadLanes(gr + i, lanes) - load8(dot + i)), r + i, lanes)
                        i += 8
                    }
                }
            }
        }
        return [gx]
    }
}

public func softmax(_ x: Tensor) -> Tensor {
    let out = Tensor(uninitialized: x.shape)
    softmaxForward(x, into: out, argmax: nil)
    recordSoftmax(out, of: x)
    return out
}

/// `softmax(x)` and `channelArgmax` of it in one pass: the probabilities (differentiable, as
/// softmax's), each pixel's most probable channel and that probability, equal to the two ops'.
public func softmaxWithArgmax(_ x: Tensor) -> (probabilities: Tensor, indices: [Int32], values: [Float]) {
    let (n, _, inner) = channelLayout(x, "softmax")
    let out = Tensor(uninitialized: x.shape)
    var indices = [Int32](repeating: 0, count: n * inner), values = [Float](repeating: 0, count: n * inner)
    indices.withUnsafeMutableBufferPointer { pi in
        values.withUnsafeMutableBufferPointer { pv in
            softmaxForward(x, into: out, argmax: (pi.baseAddress!, pv.baseAddress!))
        }
    }
    recordSoftmax(out, of: x)
    return (out, indices, values)
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
        let gx = Tensor(uninitialized: g.shape)
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
        let gx = Tensor(uninitialized: xd.shape)
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
                let j0 = b * inner + i0, base = px + b * c * inner + i0
                // The channel of the maximum so far as a float (exact below 2^24).
                withUnsafeTemporaryAllocation(of: Float.self, capacity: paddedBlock) { index in
                    let index = index.baseAddress!
                    index.update(repeating: 0, count: paddedBlock)
                    (pv + j0).update(from: base, count: count)
                    for k in 1..<max(c, 1) {
                        let row = base + k * inner
                        var i = 0
                        while i < count {
                            let lanes = min(8, count - i), v = loadLanes(row + i, lanes)
                            var best = loadLanes(pv + j0 + i, lanes), channel = load8(index + i)
                            let better = v .> best
                            best.replace(with: v, where: better)
                            channel.replace(with: Float(k), where: better)
                            storeLanes(best, pv + j0 + i, lanes)
                            store8(channel, index + i)
                            i += 8
                        }
                    }
                    for i in 0..<count { pi[j0 + i] = Int32(index[i]) }
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
    assignment.withUnsafeBufferPointer { pa in
        parallelBlocks(c) { r in
            withUnsafeTemporaryAllocation(of: Double.self, capacity: k) { sums in
                for ch in r {
                    sums.initialize(repeating: 0)
                    for b in 0..<n {
                        let row = px + (b * c + ch) * inner, labels = pa.baseAddress! + b * inner
                        for i in 0..<inner where labels[i] >= 0 { sums[Int(labels[i])] += Double(row[i]) }
                    }
                    for q in 0..<k where counts[q] > 0 { po[q * c + ch] = Float(sums[q] / Double(counts[q])) }
                }
            }
        }
    }
    let shape = x.shape
    record(out, "class_means", [x]) { g in
        // Every pixel written: its class's share of the row's gradient, 0 for no class.
        let gx = Tensor(uninitialized: shape)
        let pg = g.pointer, pgx = gx.pointer
        assignment.withUnsafeBufferPointer { pa in
            parallelBlocks(c) { r in
                withUnsafeTemporaryAllocation(of: Float.self, capacity: k) { share in
                    for ch in r {
                        for q in 0..<k { share[q] = counts[q] > 0 ? pg[q * c + ch] / counts[q] : 0 }
                        for b in 0..<n {
                            let row = pgx + (b * c + ch) * inner, labels = pa.baseAddress! + b * inner
                            for i in 0..<inner { row[i] = labels[i] >= 0 ? share[Int(labels[i])] : 0 }
                        }
                    }
                }
            }
        }
        return [gx]
    }
    return out
}
