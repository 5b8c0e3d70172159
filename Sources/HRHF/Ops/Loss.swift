import Foundation

/// Integer class labels, one per pixel (N x H x W), as PyTorch's long target tensors.
/// 255 is the ignore label by convention.
public struct Labels: Sendable, Equatable {
    public var shape: [Int]
    public var values: [Int32]

    public init(shape: [Int], values: [Int32]) {
        precondition(
            shape.reduce(1, *) == values.count,
            "labels shape \(shape) needs \(shape.reduce(1, *)) values, got \(values.count)")
        self.shape = shape
        self.values = values
    }

    public init(shape: [Int], repeating value: Int32) {
        self.init(shape: shape, values: [Int32](repeating: value, count: shape.reduce(1, *)))
    }

    public var count: Int { values.count }
}

public enum Reduction: Sendable {
    /// Mean over the pixels that are not ignored (PyTorch's default with ignore_index).
    case mean
    case sum
    /// Per-pixel losses, N x H x W, zero where ignored.
    case none
}

/// Cross-entropy of logits N x C x H x W (or N x C) against `target` (N x H x W, or N) with
/// an ignore index, optionally weighting each pixel: mean reduction is
/// sum_i w_i CE_i / (number of pixels not ignored), METHOD.md's `mean_i w_i CE_i`.
/// A batch with no valid pixel gives 0 and a zero gradient (PyTorch would give NaN).
public func crossEntropy(
    _ logits: Tensor, _ target: Labels, ignoreIndex: Int32 = 255,
    pixelWeights: Tensor? = nil, reduction: Reduction = .mean
) -> Tensor {
    let (n, c, inner) = channelLayout(logits, "cross_entropy")
    precondition(
        target.count == n * inner,
        "cross_entropy: target \(target.shape) does not match logits \(logits.shape)")
    if let pixelWeights {
        precondition(
            pixelWeights.count == n * inner,
            "cross_entropy: weights \(pixelWeights.shape) do not match logits \(logits.shape)")
    }
    let pw = pixelWeights?.pointer
    let perPixel = Tensor(zeros: target.shape)
    let lses = Tensor(zeros: target.shape)
    let px = logits.pointer, pl = perPixel.pointer, plse = lses.pointer
    target.values.withUnsafeBufferPointer { pt in
        for y in pt where y != ignoreIndex {
            precondition(y >= 0 && Int(y) < c, "cross_entropy: label \(y) outside 0..<\(c) (ignore is \(ignoreIndex))")
        }
        forEachPixelBlock(n: n, c: c, inner: inner) { b, i0, count in
            let j0 = b * inner + i0, base = b * c * inner + i0
            blockLogSumExp(px + base, c: c, inner: inner, count: count, into: plse + j0)
            for i in 0..<count {
                let y = pt[j0 + i]
                guard y != ignoreIndex else { continue }
                pl[j0 + i] = (plse[j0 + i] - px[base + Int(y) * inner + i]) * (pw?[j0 + i] ?? 1)
            }
        }
    }
    let valid = target.values.reduce(0) { $0 + ($1 == ignoreIndex ? 0 : 1) }
    let out: Tensor
    let scale: Float
    switch reduction {
    case .none:
        out = perPixel
        scale = 1
    case .sum, .mean:
        var total = 0.0
        for j in 0..<perPixel.count { total += Double(pl[j]) }
        scale = reduction == .sum ? 1 : (valid > 0 ? 1 / Float(valid) : 0)
        out = Tensor(scalar: Float(total) * scale)
    }
    let labels = target.values, ld = logits.detached()
    let weights = pixelWeights?.detached()
    record(out, "cross_entropy", [logits]) { g in
        // d/dx_k = w * (softmax_k - [k == y]) * upstream
        let gx = Tensor(zeros: ld.shape)
        let pg = g.pointer, pgx = gx.pointer, pxd = ld.pointer, pwd = weights?.pointer
        let plse = lses.pointer
        labels.withUnsafeBufferPointer { pt in
            forEachPixelBlock(n: n, c: c, inner: inner) { b, i0, count in
                let j0 = b * inner + i0, base = b * c * inner + i0
                withUnsafeTemporaryAllocation(of: Float.self, capacity: count) { up in
                    for i in 0..<count {
                        let y = pt[j0 + i]
                        up[i] =
                            y == ignoreIndex
                            ? 0 : (reduction == .none ? pg[j0 + i] : pg[0] * scale) * (pwd?[j0 + i] ?? 1)
                    }
                    for k in 0..<c {
                        let xr = pxd + base + k * inner, r = pgx + base + k * inner
                        vectorExp(xr, minus: plse + j0, r, count: count)
                        for i in 0..<count { r[i] = up[i] != 0 ? up[i] * r[i] : 0 }
                    }
                    for i in 0..<count where up[i] != 0 { pgx[base + Int(pt[j0 + i]) * inner + i] -= up[i] }
                }
            }
        }
        return [gx]
    }
    return out
}

/// Negative log-likelihood of logits N x C x ... in which label 0 stands for the union of the
/// channels `merged` (channel 0 among them) and labels 1..<kept for their own channels, as one
/// op: log p(y) = logsumexp over the label's channels - logsumexp over all, weighted per pixel,
/// mean over the pixels not ignored (0 and a zero gradient when there are none). The
/// composition of logsumexp, slices, a concatenation and `nllLoss` computes the same, through
/// five logits-sized intermediates; here one pass forward and one backward.
func channelSetNLL(
    _ logits: Tensor, _ target: Labels, merged: [Range<Int>], kept: Int, ignoreIndex: Int32 = 255,
    pixelWeights: Tensor?, logSumExps given: ChannelSetLogSumExps? = nil
) -> Tensor {
    let (n, c, inner) = channelLayout(logits, "merged-background NLL")
    precondition(target.count == n * inner, "nll_loss: target \(target.shape) does not match \(logits.shape)")
    precondition(
        merged.allSatisfy { $0.lowerBound >= 0 && $0.upperBound <= c } && kept <= c,
        "merged-background NLL: channels \(merged) and \(kept) kept of \(c)")
    if let pixelWeights {
        precondition(pixelWeights.count == n * inner, "nll_loss: weights \(pixelWeights.shape) for \(logits.shape)")
    }
    let labels = target.values
    var valid = 0
    for y in labels where y != ignoreIndex {
        precondition(y >= 0 && Int(y) < kept, "nll_loss: label \(y) outside 0..<\(kept)")
        valid += 1
    }
    let scale = valid > 0 ? 1 / Float(valid) : 0
    // Per pixel: logsumexp over all channels and over the merged ones (kept for the backward).
    let sums = given ?? channelSetLogSumExps(logits, merged: merged, scale: 1)
    precondition(sums.matches(logits, merged: merged, scale: 1), "merged-background NLL: log-sum-exps of other sets")
    let (lseAll, lseMerged, runs) = (sums.all, sums.union, channelRuns(c: c, subset: merged))
    let perPixel = Tensor(zeros: target.shape)
    let px = logits.pointer, pa = lseAll.pointer, pm = lseMerged.pointer, pl = perPixel.pointer
    let pw = pixelWeights?.pointer
    labels.withUnsafeBufferPointer { pt in
        forEachPixelBlock(n: n, c: c, inner: inner) { b, i0, count in
            let j0 = b * inner + i0, base = px + b * c * inner + i0
            for i in 0..<count {
                let y = pt[j0 + i]
                guard y != ignoreIndex else { continue }
                let logP = y == 0 ? pm[j0 + i] - pa[j0 + i] : base[Int(y) * inner + i] - pa[j0 + i]
                pl[j0 + i] = -logP * (pw?[j0 + i] ?? 1)
            }
        }
    }
    var total = 0.0
    for j in 0..<perPixel.count { total += Double(pl[j]) }
    let out = Tensor(scalar: Float(total) * scale)
    let ld = logits.detached(), weights = pixelWeights?.detached()
    record(out, "merged_background_nll", [logits]) { g in
        // d/dx_k = coefficient * (softmax_k - [k in the label's channels] softmax over them).
        let gx = Tensor(uninitialized: ld.shape)
        let pgx = gx.pointer, pxd = ld.pointer, pwd = weights?.pointer, upstream = g.item * scale
        let pa = lseAll.pointer, pm = lseMerged.pointer
        labels.withUnsafeBufferPointer { pt in
            forEachPixelBlock(n: n, c: c, inner: inner) { b, i0, count in
                let j0 = b * inner + i0, base = b * c * inner + i0
                withUnsafeTemporaryAllocation(of: Float.self, capacity: 3 * paddedBlock) { scratch in
                    let coefficient = scratch.baseAddress!, label = coefficient + paddedBlock
                    let factor = label + paddedBlock
                    // Labels as floats (exact below 2^24), -1 where ignored.
                    for i in 0..<((count + 7) / 8 * 8) {
                        let y = i < count ? pt[j0 + i] : ignoreIndex
                        coefficient[i] = y == ignoreIndex ? 0 : upstream * (pwd?[j0 + i] ?? 1)
                        label[i] = y == ignoreIndex ? -1 : Float(y)
                    }
                    let direct = subsetFactors(all: pa + j0, subset: pm + j0, count: count, into: factor)
                    for run in runs {
                        for k in run.channels {
                            let row = pxd + base + k * inner, out = pgx + base + k * inner
                            var i = 0
                            while i < count {
                                let lanes = min(8, count - i), y = load8(label + i)
                                let x = loadLanes(row + i, lanes), s = simdExp(x - loadLanes(pa + j0 + i, lanes))
                                var own = SIMD8<Float>(repeating: 0)
                                own.replace(with: 1, where: y .== Float(k))
                                if run.inSubset {
                                    let union =
                                        direct ? simdExp(x - loadLanes(pm + j0 + i, lanes)) : s * load8(factor + i)
                                    own.replace(with: union, where: y .== 0)
                                }
                                storeLanes(load8(coefficient + i) * (s - own), out + i, lanes)
                                i += 8
                            }
                        }
                    }
                }
            }
        }
        return [gx]
    }
    return out
}

/// Per pixel of logits N x C x ...: the log-sum-exp of `scale` x over all channels and over the
/// channels `merged`, from one exp per value (`blockLogSumExps`). A step computes them once per
/// half for the terms that read the same sets (compensation weights, cross-entropy, unbiased KD).
struct ChannelSetLogSumExps {
    /// Over all channels and over `merged`, N x ... each.
    let all: Tensor, union: Tensor
    let shape: [Int], merged: [Range<Int>], scale: Float

    /// Whether these are the log-sum-exps of `logits`' shape over the same channels (as a set) and scale.
    func matches(_ logits: Tensor, merged sets: [Range<Int>], scale factor: Float) -> Bool {
        let c = logits.shape[1]
        return logits.shape == shape && scale == factor
            && channelRuns(c: c, subset: merged).elementsEqual(channelRuns(c: c, subset: sets)) { $0 == $1 }
    }
}

func channelSetLogSumExps(_ logits: Tensor, merged: [Range<Int>], scale: Float) -> ChannelSetLogSumExps {
    let (n, c, inner) = channelLayout(logits, "log-sum-exps")
    let all = Tensor(uninitialized: [n * inner]), union = Tensor(uninitialized: [n * inner])
    let px = logits.pointer, pa = all.pointer, pu = union.pointer, runs = channelRuns(c: c, subset: merged)
    forEachPixelBlock(n: n, c: c, inner: inner) { b, i0, count in
        let j0 = b * inner + i0
        blockLogSumExps(
            px + b * c * inner + i0, runs: runs, subset: merged, scale: scale, inner: inner, count: count,
            all: pa + j0, union: pu + j0)
    }
    return ChannelSetLogSumExps(all: all, union: union, shape: logits.shape, merged: merged, scale: scale)
}

/// MiB's unbiased knowledge distillation (`unbiasedDistillation`) as one op: per pixel, with
/// x = new logits / T, s = softmax(x) and q = softmax(old logits / T) over the old classes,
/// l = q_0 (logsumexp over background and new channels of x - logsumexp x)
///     + sum over old k >= 1 of q_k (x_k - logsumexp x);
/// the loss is -(sum of l over the pixels where `mask` is 1) / (their count) / |old|, and
/// dl/dx_k = q_0 [k background or new] softmax over those_k + [1 <= k < old] q_k - (sum q) s_k.
/// `oldSoftmax`, at temperature 1, is q already computed: images `firstImage...` of its tensor
/// (the old model's prediction on a whole batch, of which these logits are a part).
func unbiasedDistillationLoss(
    _ newLogits: Tensor, _ oldLogits: Tensor, temperature: Float, mask: Tensor?,
    logSumExps given: ChannelSetLogSumExps? = nil, oldSoftmax: (probabilities: Tensor, firstImage: Int)? = nil
) -> Tensor {
    let (n, c, inner) = channelLayout(newLogits, "unbiased KD")
    let old = oldLogits.shape[1]
    precondition(
        oldLogits.shape[0] == n && oldLogits.count == n * old * inner && old < c,
        "unbiased KD: old logits \(oldLogits.shape) for new \(newLogits.shape)")
    if let mask { precondition(mask.count == n * inner, "unbiased KD: mask \(mask.shape) for \(newLogits.shape)") }
    if let oldSoftmax {
        let (q, first) = oldSoftmax
        precondition(
            temperature == 1 && q.shape.count == 4 && q.shape[1] == old && q.count / q.shape[0] == old * inner
                && first >= 0 && first + n <= q.shape[0],
            "unbiased KD: old softmax \(q.shape) from image \(first) for \(oldLogits.shape) at T \(temperature)")
    }
    let qs = oldSoftmax.map { $0.probabilities.pointer + $0.firstImage * old * inner }
    let inverse = 1 / temperature
    let merged = foldedBackground(oldClasses: old, classes: c)
    // Per pixel: logsumexp of x over all channels and over the merged ones, and of old / T.
    let sums = given ?? channelSetLogSumExps(newLogits, merged: merged, scale: inverse)
    precondition(sums.matches(newLogits, merged: merged, scale: inverse), "unbiased KD: log-sum-exps of other sets")
    let (lseAll, lseMerged) = (sums.all, sums.union)
    let lseOld = Tensor(uninitialized: [n * inner]), perPixel = Tensor(uninitialized: [n * inner])
    let px = newLogits.pointer, po = oldLogits.pointer, pmask = mask?.pointer
    let (pa, pm, pq, pl) = (lseAll.pointer, lseMerged.pointer, lseOld.pointer, perPixel.pointer)
    forEachPixelBlock(n: n, c: c, inner: inner) { b, i0, count in
        let j0 = b * inner + i0, x = px + b * c * inner + i0, o = po + b * old * inner + i0
        // With e_k = exp(old_k / T - peak), q_k = e_k / sum e: l = (sum_k e_k term_k) / sum e
        // (or, with q given, e = q and sum e = 1).
        let q = qs.map { $0 + b * old * inner + i0 }
        withUnsafeTemporaryAllocation(of: Float.self, capacity: 3 * paddedBlock) { scratch in
            let peak = scratch.baseAddress!, sum = peak + paddedBlock, weighted = sum + paddedBlock
            if q == nil { blockPeak(o, rows: 0..<old, scale: inverse, inner: inner, count: count, into: peak) }
            sum.update(repeating: 0, count: 2 * paddedBlock)
            for k in 0..<old {
                var i = 0
                while i < count {
                    let lanes = min(8, count - i), all = loadLanes(pa + j0 + i, lanes)
                    let e =
                        q.map { loadLanes($0 + k * inner + i, lanes) }
                        ?? simdExp(loadLanes(o + k * inner + i, lanes) * inverse - load8(peak + i))
                    store8(load8(sum + i) + e, sum + i)
                    let term =
                        k == 0
                        ? loadLanes(pm + j0 + i, lanes) - all : loadLanes(x + k * inner + i, lanes) * inverse - all
                    store8(load8(weighted + i) + e * term, weighted + i)
                    i += 8
                }
            }
            var i = 0
            while i < count {
                let lanes = min(8, count - i), m = load8(peak + i), total = load8(sum + i)
                if q == nil { storeLanes(laneLogSumExp(peak: m, sum: total), pq + j0 + i, lanes) }
                storeLanes(q == nil ? load8(weighted + i) / total : load8(weighted + i), pl + j0 + i, lanes)
                i += 8
            }
        }
    }
    var total = 0.0, selected = 0.0
    for j in 0..<(n * inner) {
        let m = pmask?[j] ?? 1
        total += Double(pl[j] * m)
        selected += Double(m)
    }
    let scale: Float = selected > 0 ? -1 / Float(selected) / Float(old) : 0
    let out = Tensor(scalar: Float(total) * scale)
    let xd = newLogits.detached(), od = oldLogits.detached(), md = mask?.detached()
    // The given softmax's tensor is held until the backward has read it (its pointer alone is not).
    let qd = oldSoftmax.map { ($0.probabilities.detached(), $0.firstImage) }
    record(out, "unbiased_kd", [newLogits]) { g in
        let gx = Tensor(uninitialized: xd.shape)
        let pgx = gx.pointer, pxd = xd.pointer, pod = od.pointer, pmd = md?.pointer
        let qs = qd.map { $0.0.pointer + $0.1 * old * inner }
        let (pa, pm, pq) = (lseAll.pointer, lseMerged.pointer, lseOld.pointer)
        let upstream = g.item * scale * inverse
        forEachPixelBlock(n: n, c: c, inner: inner) { b, i0, count in
            let j0 = b * inner + i0, x = pxd + b * c * inner + i0, o = pod + b * old * inner + i0
            let r = pgx + b * c * inner + i0
            withUnsafeTemporaryAllocation(of: Float.self, capacity: 4 * paddedBlock) { scratch in
                let coefficient = scratch.baseAddress!, q0 = coefficient + paddedBlock, qSum = q0 + paddedBlock
                let factor = qSum + paddedBlock
                for i in 0..<count { coefficient[i] = upstream * (pmd?[j0 + i] ?? 1) }
                qSum.update(repeating: 0, count: paddedBlock)
                // q_k into q0 and the gradient's rows 1..<old first, then q_k - (sum q) s_k once the sum is known.
                let given = qs.map { $0 + b * old * inner + i0 }
                for k in 0..<old {
                    let row = o + k * inner, out = k == 0 ? q0 : r + k * inner
                    var i = 0
                    while i < count {
                        let lanes = min(8, count - i)
                        let q =
                            given.map { loadLanes($0 + k * inner + i, lanes) }
                            ?? simdExp(loadLanes(row + i, lanes) * inverse - loadLanes(pq + j0 + i, lanes))
                        storeLanes(q, out + i, lanes)
                        store8(load8(qSum + i) + q, qSum + i)
                        i += 8
                    }
                }
                let direct = subsetFactors(all: pa + j0, subset: pm + j0, count: count, into: factor)
                for k in 0..<c {
                    let row = r + k * inner, merged = k == 0 || k >= old
                    var i = 0
                    while i < count {
                        let lanes = min(8, count - i)
                        let xs = loadLanes(x + k * inner + i, lanes) * inverse
                        let s = simdExp(xs - loadLanes(pa + j0 + i, lanes))
                        let own =
                            !merged
                            ? loadLanes(row + i, lanes)
                            : load8(q0 + i)
                                * (direct ? simdExp(xs - loadLanes(pm + j0 + i, lanes)) : s * load8(factor + i))
                        storeLanes(load8(coefficient + i) * (own - load8(qSum + i) * s), row + i, lanes)
                        i += 8
                    }
                }
            }
        }
        return [gx]
    }
    return out
}

/// exp(all - subset) per pixel of a block into `factor`, which turns the softmax over all
/// channels (exp(x - all)) into the one over a subset (exp(x - subset)). Returns whether the
/// block must take the subset's softmax from its own exp instead: a pixel's gap could overflow
/// the factor or underflow the softmax over all (the subset far below the rest).
@inline(__always)
func subsetFactors(
    all: UnsafePointer<Float>, subset: UnsafePointer<Float>, count: Int, into factor: UnsafeMutablePointer<Float>
) -> Bool {
    var direct = false
    var i = 0
    while i < count {
        let lanes = min(8, count - i), gap = loadLanes(all + i, lanes) - loadLanes(subset + i, lanes)
        direct = direct || any(gap .> 60)
        store8(simdExp(gap), factor + i)
        i += 8
    }
    return direct
}
