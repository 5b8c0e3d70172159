import Foundation

/// Which of GSC's per-pixel distillation sums `gscTermSums` computes, and what each reads.
struct GSCTermRequest {
    /// Soft distillation against the old logits at this temperature.
    var softTemperature: Float?
    /// Sharpness: the pixels (N x 1 x ..., 0/1) whose entropy is averaged.
    var sharpMask: Tensor?
    /// Relation: each pixel's class among `classes` (-1 for none), and a constant (N x channels
    /// x ..., e.g. the old model's softmax) whose class means come out of the same pass.
    var relation: (assignment: [Int32], classes: Int, constant: Tensor?)?
}

/// What `gscTermSums` computed. `values` = [soft, entropy, class means (classes x channels)],
/// one tensor with one backward; each term reads its part through a slice, so the tape adds the
/// parts' gradients into it and the logits' gradient is written once for all the terms.
struct GSCTermSums {
    let values: Tensor
    let classes: Int, channels: Int
    /// Pixels per image times images (soft distillation's mean is over them).
    let pixels: Int
    /// The sharpness mask's pixels, and each class's pixels of the relation.
    let selected: Float
    let counts: [Float]
    let constantMeans: Tensor?

    /// T^2 KL(old || new) at temperature T over the old classes, mean over pixels.
    var soft: Tensor { reshape(sliceBatch(values, 0..<1), []) }
    /// The new model's entropy, mean over the masked pixels (0 when none is).
    var entropy: Tensor { reshape(sliceBatch(values, 1..<2), []) }
    /// Row a: the mean softmax over the first `channels` channels of the pixels of class a.
    var means: Tensor { reshape(sliceBatch(values, 2..<(2 + classes * channels)), [classes, channels]) }
}

/// GSC's soft distillation, sharpness and relation sums on the same logits as one op: each
/// pixel block is read once for all the terms requested, and the backward writes one gradient
/// (their sum, in that order) instead of one logits-sized gradient per term that the tape then adds.
/// Per pixel, with x the new logits and `old` = `channels`:
/// - soft: p = softmax(x[0..<old] / T), q = softmax(old logits / T), l = sum_k q_k (log q_k - log p_k);
///   value T^2 (sum of l) / pixels, dl/dx_k = ((sum q) p_k - q_k) / T on the first `old` channels;
/// - entropy: H = -sum_k s_k log s_k over all channels (s = softmax x), value (sum of H mask) / (sum
///   of mask), dH/dx_k = -s_k (log s_k + H);
/// - relation: r = softmax(x[0..<old]); row a of the means is the mean r of the pixels of class a
///   (zero rows for classes without pixels); for a pixel of class a with G the rows' gradient,
///   g_k = G[a, k] / |a| and dx_k = r_k (g_k - sum_j g_j r_j) on the first `old` channels.
func gscTermSums(
    _ logits: Tensor, _ oldLogits: Tensor?, channels old: Int, _ request: GSCTermRequest
) -> GSCTermSums {
    let (n, c, inner) = channelLayout(logits, "GSC terms")
    precondition(old >= 1 && old <= c, "GSC terms: \(old) of \(c) channels")
    let temperature = request.softTemperature, mask = request.sharpMask, relation = request.relation
    if temperature != nil {
        precondition(
            oldLogits.map { $0.count == n * old * inner && $0.shape[0] == n } ?? false,
            "soft distillation: old logits \(oldLogits?.shape ?? []) for new \(logits.shape)")
    }
    if let mask { precondition(mask.count == n * inner, "entropy: mask \(mask.shape) for \(logits.shape)") }
    let k = relation?.classes ?? 0
    if let relation {
        precondition(
            relation.assignment.count == n * inner,
            "softmax class means: \(relation.assignment.count) assignments for \(n * inner)")
        precondition(
            relation.assignment.allSatisfy { $0 < relation.classes },
            "softmax class means: a class past \(relation.classes)")
        precondition(
            relation.constant.map { $0.count == n * old * inner && $0.shape[0] == n } ?? true,
            "softmax class means: constant \(relation.constant?.shape ?? []) for \(logits.shape)")
    }
    let inverse = 1 / (temperature ?? 1)
    let px = logits.pointer, po = oldLogits?.pointer
    let blocksPerImage = (inner + pixelBlock - 1) / pixelBlock
    // Soft: per pixel the log-sum-exp of x / T over the old channels and l, and q (kept for the
    // backward, which would exponentiate the old logits again).
    let soft = temperature.map { _ in
        (
            logSumExps: Tensor(uninitialized: [n * inner]), perPixel: Tensor(uninitialized: [n * inner]),
            targets: Tensor(uninitialized: [n, old, inner])
        )
    }
    // Entropy: the log-sum-exp over all channels and H, per pixel.
    let entropySums = mask.map { _ in
        (all: Tensor(uninitialized: [n * inner]), entropy: Tensor(uninitialized: [n * inner]))
    }
    // Relation: the softmax (kept for the backward) and each pixel block's class sums (of r, then
    // of the constant) and pixel counts, added in block order after: the same result whatever
    // the thread count.
    let probabilities = relation.map { _ in Tensor(uninitialized: [n, old, inner]) }
    // With the entropy too, r comes from the entropy's exps, and per pixel the ratio of the
    // old channels' exp sum to all channels' turns r back into s for the entropy's backward.
    let oldShares = relation != nil && mask != nil ? Tensor(uninitialized: [n * inner]) : nil
    let models = relation?.constant == nil ? 1 : 2, sumsPerBlock = models * k * old, stride = sumsPerBlock + k
    var partial = [Double](repeating: 0, count: relation == nil ? 0 : n * blocksPerImage * stride)
    let assignment = relation?.assignment ?? []
    assignment.withUnsafeBufferPointer { assigned in
        partial.withUnsafeMutableBufferPointer { partial in
            forEachPixelBlock(n: n, c: c, inner: inner) { b, i0, count in
                let j0 = b * inner + i0, x = px + b * c * inner + i0
                if let soft, let po {
                    let (pp, pl) = (soft.logSumExps.pointer, soft.perPixel.pointer), o = po + b * old * inner + i0
                    let q = soft.targets.pointer + b * old * inner + i0
                    blockLogSumExp(x, channels: [0..<old], scale: inverse, inner: inner, count: count, into: pp + j0)
                    withUnsafeTemporaryAllocation(of: Float.self, capacity: paddedBlock) { pq in
                        let pq = pq.baseAddress!
                        blockSoftmax(
                            o, channels: old, scale: inverse, inner: inner, count: count, into: q, logSumExp: pq)
                        (pl + j0).update(repeating: 0, count: count)
                        for k in 0..<old {
                            var i = 0
                            while i < count {
                                let lanes = min(8, count - i)
                                let logQ = loadLanes(o + k * inner + i, lanes) * inverse - loadLanes(pq + i, lanes)
                                let logP = loadLanes(x + k * inner + i, lanes) * inverse - loadLanes(pp + j0 + i, lanes)
                                storeLanes(
                                    loadLanes(pl + j0 + i, lanes) + loadLanes(q + k * inner + i, lanes) * (logQ - logP),
                                    pl + j0 + i, lanes)
                                i += 8
                            }
                        }
                    }
                }
                let y = probabilities.map { $0.pointer + b * old * inner + i0 }
                var softmaxDone = false
                if let entropySums {
                    softmaxDone = blockEntropy(
                        x, c: c, inner: inner, count: count, lse: entropySums.all.pointer + j0,
                        entropy: entropySums.entropy.pointer + j0,
                        softmax: y.map { ($0, old, oldShares!.pointer + j0) })
                }
                if let y {
                    if !softmaxDone { blockSoftmax(x, channels: old, scale: 1, inner: inner, count: count, into: y) }
                    let sums = partial.baseAddress! + (b * blocksPerImage + i0 / pixelBlock) * stride
                    forEachLabelRun(assigned.baseAddress! + b * inner + i0, count: count) { a, run in
                        addRunSums(
                            y + run.lowerBound, channels: old, inner: inner, count: run.count, into: sums + a * old)
                        if let pc = relation?.constant?.pointer {
                            addRunSums(
                                pc + b * old * inner + i0 + run.lowerBound, channels: old, inner: inner,
                                count: run.count, into: sums + (k + a) * old)
                        }
                        sums[sumsPerBlock + a] += Double(run.count)
                    }
                }
            }
        }
    }
    var values = [Float](repeating: 0, count: 2 + k * old)
    let softScale = (temperature ?? 0) * (temperature ?? 0) / Float(n * inner)
    if let pl = soft?.perPixel.pointer {
        var total = 0.0
        for j in 0..<(n * inner) { total += Double(pl[j]) }
        values[0] = Float(total) * softScale
    }
    var selected: Float = 0
    if let mask, let ph = entropySums?.entropy.pointer {
        let pm = mask.pointer
        var total = 0.0
        for j in 0..<(n * inner) {
            total += Double(ph[j] * pm[j])
            selected += pm[j]
        }
        values[1] = Float(total) * (selected > 0 ? 1 / selected : 0)
    }
    let entropyScale: Float = selected > 0 ? 1 / selected : 0
    var totals = [Double](repeating: 0, count: relation == nil ? 0 : stride)
    for block in 0..<(relation == nil ? 0 : n * blocksPerImage) {
        for e in 0..<stride { totals[e] += partial[block * stride + e] }
    }
    let counts = relation == nil ? [] : totals[sumsPerBlock...].map { Float($0) }
    func means(_ model: Int) -> [Float] {
        (0..<(k * old)).map { e in
            counts[e / old] > 0 ? Float(totals[model * k * old + e] / Double(counts[e / old])) : 0
        }
    }
    if relation != nil { values.replaceSubrange(2..., with: means(0)) }
    let out = Tensor(shape: [2 + k * old], values: values)
    let xd = logits.detached(), md = mask?.detached()
    record(out, "gsc_terms", [logits]) { g in
        let gx = Tensor(uninitialized: xd.shape)
        let pgx = gx.pointer, pxd = xd.pointer, pmd = md?.pointer, pg = g.pointer
        let softCoefficient = pg[0] * softScale * inverse, entropyUpstream = pg[1] * entropyScale
        // Each class-mean row's gradient shared by its pixels: G[a, k] / |a|.
        let share = (0..<(k * old)).map { e in counts[e / old] > 0 ? pg[2 + e] / counts[e / old] : 0 }
        assignment.withUnsafeBufferPointer { assigned in
            forEachPixelBlock(n: n, c: c, inner: inner) { b, i0, count in
                let j0 = b * inner + i0, x = pxd + b * c * inner + i0, r = pgx + b * c * inner + i0
                var zeroFrom = 0
                if let soft {
                    softGradient(
                        x, soft.targets.pointer + b * old * inner + i0, channels: old, inner: inner, count: count,
                        lseNew: soft.logSumExps.pointer + j0, inverse: inverse, coefficient: softCoefficient, into: r)
                    zeroFrom = old
                }
                for ch in zeroFrom..<c { (r + ch * inner).update(repeating: 0, count: count) }
                if let entropySums, let pmd {
                    let (pa, ph) = (entropySums.all.pointer + j0, entropySums.entropy.pointer + j0)
                    let y = probabilities.map { $0.pointer + b * old * inner + i0 }, shares = oldShares?.pointer
                    for ch in 0..<c {
                        let fromSoftmax = ch < old && shares != nil
                        var i = 0
                        while i < count {
                            let lanes = min(8, count - i),
                                coefficient = -entropyUpstream * loadLanes(pmd + j0 + i, lanes)
                            let logP = loadLanes(x + ch * inner + i, lanes) - loadLanes(pa + i, lanes)
                            // s = r times the old channels' share where r was kept, else exp(log s).
                            let p =
                                fromSoftmax
                                ? loadLanes(y! + ch * inner + i, lanes) * loadLanes(shares! + j0 + i, lanes)
                                : simdExp(logP)
                            let term = coefficient * p * (logP + loadLanes(ph + i, lanes))
                            storeLanes(loadLanes(r + ch * inner + i, lanes) + term, r + ch * inner + i, lanes)
                            i += 8
                        }
                    }
                }
                if let probabilities {
                    let y = probabilities.pointer + b * old * inner + i0
                    withUnsafeTemporaryAllocation(of: Float.self, capacity: paddedBlock) { dot in
                        let dot = dot.baseAddress!
                        forEachLabelRun(assigned.baseAddress! + b * inner + i0, count: count) { a, run in
                            // The class mean's gradient g_ch = G[a, ch] / |a| on each pixel of the run,
                            // then softmax's backward over it.
                            let (first, pixels) = (run.lowerBound, run.count)
                            (dot + first).update(repeating: 0, count: pixels)
                            for ch in 0..<old {
                                let g = SIMD8<Float>(repeating: share[a * old + ch]), yr = y + ch * inner + first
                                var i = 0
                                while i < pixels {
                                    let lanes = min(8, pixels - i)
                                    storeLanes(
                                        loadLanes(dot + first + i, lanes) + g * loadLanes(yr + i, lanes),
                                        dot + first + i, lanes)
                                    i += 8
                                }
                            }
                            for ch in 0..<old {
                                let g = SIMD8<Float>(repeating: share[a * old + ch])
                                let yr = y + ch * inner + first, gr = r + ch * inner + first
                                var i = 0
                                while i < pixels {
                                    let lanes = min(8, pixels - i)
                                    let term = loadLanes(yr + i, lanes) * (g - loadLanes(dot + first + i, lanes))
                                    storeLanes(loadLanes(gr + i, lanes) + term, gr + i, lanes)
                                    i += 8
                                }
                            }
                        }
                    }
                }
            }
        }
        return [gx]
    }
    return GSCTermSums(
        values: out, classes: k, channels: old, pixels: n * inner, selected: selected, counts: counts,
        constantMeans: relation?.constant == nil ? nil : Tensor(shape: [k, old], values: means(1)))
}

/// Per pixel of a block (channel stride `inner`): the log-sum-exp over the `c` channels into
/// `lse` and the entropy of their softmax into `entropy`. With e_k = exp(x_k - peak) and
/// S = sum e: H = log S - (sum_k e_k (x_k - peak)) / S. With `softmax`, the softmax over the
/// first `channels` channels from the same exps goes into `rows` and, per pixel, their exp sum
/// over S into `share`; returns false (rows not written) when a pixel's sum over those channels
/// is below the normal floats (they lie far below the others), for a softmax of their own.
private func blockEntropy(
    _ x: UnsafePointer<Float>, c: Int, inner: Int, count: Int, lse: UnsafeMutablePointer<Float>,
    entropy: UnsafeMutablePointer<Float>,
    softmax: (rows: UnsafeMutablePointer<Float>, channels: Int, share: UnsafeMutablePointer<Float>)?
) -> Bool {
    withUnsafeTemporaryAllocation(of: Float.self, capacity: 4 * paddedBlock) { scratch in
        let peak = scratch.baseAddress!, sum = peak + paddedBlock, weighted = sum + paddedBlock
        let partSum = weighted + paddedBlock
        blockPeak(x, rows: 0..<c, scale: 1, inner: inner, count: count, into: peak)
        sum.update(repeating: 0, count: 3 * paddedBlock)
        let kept = softmax?.channels ?? 0
        for k in 0..<c {
            var i = 0
            while i < count {
                let lanes = min(8, count - i)
                let d = loadLanes(x + k * inner + i, lanes) - load8(peak + i), e = simdExp(d)
                store8(load8(sum + i) + e, sum + i)
                store8(load8(weighted + i) + e * d, weighted + i)
                if k < kept {
                    storeLanes(e, softmax!.rows + k * inner + i, lanes)
                    store8(load8(partSum + i) + e, partSum + i)
                }
                i += 8
            }
        }
        var i = 0, normal = true
        while i < count {
            let lanes = min(8, count - i), m = load8(peak + i), total = load8(sum + i), logSum = simdLog(total)
            var logSumAll = m + logSum
            logSumAll.replace(with: -.infinity, where: m .== -.infinity)
            storeLanes(logSumAll, lse + i, lanes)
            storeLanes(logSum - load8(weighted + i) / total, entropy + i, lanes)
            if let softmax {
                let part = loadLanes(partSum + i, lanes)
                storeLanes(part / total, softmax.share + i, lanes)
                var padded = part
                padded.replace(with: 1, where: SIMD8<Int32>(0, 1, 2, 3, 4, 5, 6, 7) .>= Int32(lanes))
                normal = normal && all(padded .>= Float.leastNormalMagnitude)
            }
            i += 8
        }
        guard let softmax, normal else { return false }
        for k in 0..<kept {
            let row = softmax.rows + k * inner
            var i = 0
            while i < count {
                let lanes = min(8, count - i)
                storeLanes(loadLanes(row + i, lanes) * (1 / load8(partSum + i)), row + i, lanes)
                i += 8
            }
        }
        return true
    }
}

/// Calls body(class, pixels) for each maximal run of pixels of a block with the same class,
/// in order, passing over pixels labelled -1 (a class's pixels mostly lie side by side).
@inline(__always)
private func forEachLabelRun(_ labels: UnsafePointer<Int32>, count: Int, _ body: (Int, Range<Int>) -> Void) {
    var start = 0
    while start < count {
        let a = labels[start]
        var end = start + 1
        while end < count && labels[end] == a { end += 1 }
        if a >= 0 { body(Int(a), start..<end) }
        start = end
    }
}

/// Adds the sum of each channel's `count` values (channel stride `inner`) into `classSums[ch]`:
/// eight lanes in float along the run, their total in double.
private func addRunSums(
    _ values: UnsafePointer<Float>, channels: Int, inner: Int, count: Int, into classSums: UnsafeMutablePointer<Double>
) {
    for ch in 0..<channels {
        let row = values + ch * inner
        var lanes8 = SIMD8<Float>(repeating: 0)
        var i = 0
        while i < count {
            lanes8 += loadLanes(row + i, min(8, count - i))
            i += 8
        }
        classSums[ch] += Double(lanes8.sum())
    }
}

/// Soft distillation's gradient on a pixel block's first `channels` rows of `r`:
/// coefficient ((sum q) p_k - q_k), with q the forward's.
private func softGradient(
    _ x: UnsafePointer<Float>, _ q: UnsafePointer<Float>, channels old: Int, inner: Int, count: Int,
    lseNew pp: UnsafePointer<Float>, inverse: Float, coefficient: Float, into r: UnsafeMutablePointer<Float>
) {
    withUnsafeTemporaryAllocation(of: Float.self, capacity: paddedBlock) { qSum in
        let qSum = qSum.baseAddress!
        qSum.update(repeating: 0, count: paddedBlock)
        for k in 0..<old {
            var i = 0
            while i < count {
                store8(load8(qSum + i) + loadLanes(q + k * inner + i, min(8, count - i)), qSum + i)
                i += 8
            }
        }
        for k in 0..<old {
            var i = 0
            while i < count {
                let lanes = min(8, count - i)
                let p = simdExp(loadLanes(x + k * inner + i, lanes) * inverse - loadLanes(pp + i, lanes))
                let value = coefficient * (load8(qSum + i) * p - loadLanes(q + k * inner + i, lanes))
                storeLanes(value, r + k * inner + i, lanes)
                i += 8
            }
        }
    }
}

/// The per-pixel work of GSC's relation term: `classConditionalMeans(softmax(sliceChannels(logits,
/// 0..<channels)), assignment:, classes:)`, with `constant`'s class means alongside (no gradient)
/// and each class's pixel count.
func softmaxClassMeans(
    _ logits: Tensor, channels: Int, assignment: [Int32], classes: Int, alongside constant: Tensor? = nil
) -> (means: Tensor, constantMeans: Tensor?, counts: [Float]) {
    let sums = gscTermSums(
        logits, nil, channels: channels,
        GSCTermRequest(relation: (assignment: assignment, classes: classes, constant: constant)))
    return (sums.means, sums.constantMeans, sums.counts)
}
