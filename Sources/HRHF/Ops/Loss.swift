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
    channelSetLogSumExps(logits, merged: [merged], scale: scale)[0]
}

/// The log-sum-exps over all channels and over each of the sets `merged` (one or two), from one
/// exp per value: each bit for bit as if computed alone.
func channelSetLogSumExps(_ logits: Tensor, merged: [[Range<Int>]], scale: Float) -> [ChannelSetLogSumExps] {
    precondition(merged.count == 1 || merged.count == 2, "log-sum-exps over one or two sets, not \(merged.count)")
    let (n, c, inner) = channelLayout(logits, "log-sum-exps")
    let all = Tensor(uninitialized: [n * inner]), unions = merged.map { _ in Tensor(uninitialized: [n * inner]) }
    let px = logits.pointer, pa = all.pointer, pu = unions.map(\.pointer), runs = channelRuns(c: c, subset: merged[0])
    let member = merged.count == 2 ? (0..<c).map { k in merged[1].contains { $0.contains(k) } } : nil
    forEachPixelBlock(n: n, c: c, inner: inner) { b, i0, count in
        let j0 = b * inner + i0
        blockLogSumExps(
            px + b * c * inner + i0, runs: runs, subset: merged[0], scale: scale, inner: inner, count: count,
            all: pa + j0, union: pu[0] + j0, second: member.map { ($0, merged[1], pu[1] + j0) })
    }
    return zip(merged, unions).map {
        ChannelSetLogSumExps(all: all, union: $1, shape: logits.shape, merged: $0, scale: scale)
    }
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
    let nll = ChannelSetNLL(
        logits, target, merged: merged, kept: kept, ignoreIndex: ignoreIndex, pixelWeights: pixelWeights,
        logSumExps: given)
    let out = Tensor(scalar: nll.value)
    let ld = logits.detached()
    record(out, "merged_background_nll", [logits]) { g in
        let gx = Tensor(uninitialized: ld.shape)
        let (n, c, inner) = channelLayout(ld, "merged-background NLL")
        let px = ld.pointer, pgx = gx.pointer, upstream = g.item
        nll.labels.withUnsafeBufferPointer { labels in
            forEachPixelBlock(n: n, c: c, inner: inner) { b, i0, count in
                withUnsafeTemporaryAllocation(of: Float.self, capacity: ChannelSetNLL.BlockGradient.scratch) {
                    scratch in
                    let gradient = nll.blockGradient(
                        upstream: upstream, labels: labels, b, i0, count, scratch: scratch.baseAddress!)
                    let base = b * c * inner + i0
                    for k in 0..<c {
                        let row = px + base + k * inner, out = pgx + base + k * inner
                        let channel = gradient.channel(k, merged: nll.merged[k])
                        var i = 0
                        while i < count {
                            let lanes = min(8, count - i), x = loadLanes(row + i, lanes)
                            let s = simdExp(x - loadLanes(gradient.all + i, lanes))
                            storeLanes(channel(at: i, lanes, x: x, s: s), out + i, lanes)
                            i += 8
                        }
                    }
                }
            }
        }
        return [gx]
    }
    return out
}

/// `channelSetNLL`'s forward: its value and what its gradient reads.
struct ChannelSetNLL {
    let value: Float
    /// 1 / (pixels not ignored), 0 when none is.
    let scale: Float
    let labels: [Int32]
    let ignoreIndex: Int32
    let weights: Tensor?
    let sums: ChannelSetLogSumExps
    /// Per channel, whether it is among the merged ones.
    let merged: [Bool]

    init(
        _ logits: Tensor, _ target: Labels, merged: [Range<Int>], kept: Int, ignoreIndex: Int32,
        pixelWeights: Tensor?, logSumExps given: ChannelSetLogSumExps?
    ) {
        let (n, c, inner) = channelLayout(logits, "merged-background NLL")
        precondition(target.count == n * inner, "nll_loss: target \(target.shape) does not match \(logits.shape)")
        precondition(
            merged.allSatisfy { $0.lowerBound >= 0 && $0.upperBound <= c } && kept <= c,
            "merged-background NLL: channels \(merged) and \(kept) kept of \(c)")
        if let pixelWeights {
            precondition(
                pixelWeights.count == n * inner, "nll_loss: weights \(pixelWeights.shape) for \(logits.shape)")
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
        precondition(
            sums.matches(logits, merged: merged, scale: 1), "merged-background NLL: log-sum-exps of other sets")
        let perPixel = Tensor(zeros: target.shape)
        let px = logits.pointer, pa = sums.all.pointer, pm = sums.union.pointer, pl = perPixel.pointer
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
        value = Float(total) * scale
        self.scale = scale
        self.labels = labels
        self.ignoreIndex = ignoreIndex
        weights = pixelWeights?.detached()
        self.sums = sums
        self.merged = (0..<c).map { k in merged.contains { $0.contains(k) } }
    }

    /// d/dx_k = coefficient (s_k - [k in the label's channels] softmax over them_k) on one
    /// pixel block, with s = softmax(x): per pixel, the coefficient (the upstream gradient, the
    /// scale and the pixel's weight; 0 where ignored) and the label as a float (-1 where ignored).
    struct BlockGradient {
        static let scratch = 3 * paddedBlock
        let coefficient: UnsafeMutablePointer<Float>, label: UnsafeMutablePointer<Float>
        let factor: UnsafeMutablePointer<Float>
        /// The block's log-sum-exps over all channels and over the merged ones.
        let all: UnsafePointer<Float>, union: UnsafePointer<Float>
        /// Whether the merged softmax takes its own exp (`subsetFactors`).
        let direct: Bool

        /// Channel k's gradient (`merged`: whether k is among the merged channels). The block
        /// holds pointers only, so its per-lane arithmetic inlines into the loops.
        @inline(__always)
        func channel(_ k: Int, merged: Bool) -> Channel { Channel(block: self, k: Float(k), merged: merged) }

        struct Channel {
            let block: BlockGradient
            let k: Float
            let merged: Bool

            /// The gradient at pixels i..<i+lanes of the block, from their logits and softmax
            /// (transparent: `@inline(__always)` left it a call per eight pixels).
            @_transparent
            func callAsFunction(at i: Int, _ lanes: Int, x: SIMD8<Float>, s: SIMD8<Float>) -> SIMD8<Float> {
                let y = load8(block.label + i)
                var own = SIMD8<Float>(repeating: 0)
                own.replace(with: 1, where: y .== k)
                if merged {
                    let union =
                        block.direct ? simdExp(x - loadLanes(block.union + i, lanes)) : s * load8(block.factor + i)
                    own.replace(with: union, where: y .== 0)
                }
                return load8(block.coefficient + i) * (s - own)
            }
        }
    }

    /// The gradient on the block of `count` pixels from pixel i0 of image b, its per-pixel
    /// values in `scratch` (`BlockGradient.scratch` floats).
    @inline(__always)
    func blockGradient(
        upstream g: Float, labels pt: UnsafeBufferPointer<Int32>, _ b: Int, _ i0: Int, _ count: Int,
        scratch: UnsafeMutablePointer<Float>
    ) -> BlockGradient {
        let inner = sums.shape.dropFirst(2).reduce(1, *), j0 = b * inner + i0
        let coefficient = scratch, label = coefficient + paddedBlock, factor = label + paddedBlock
        let pwd = weights?.pointer, upstream = g * scale
        // Labels as floats (exact below 2^24), -1 where ignored.
        for i in 0..<((count + 7) / 8 * 8) {
            let y = i < count ? pt[j0 + i] : ignoreIndex
            coefficient[i] = y == ignoreIndex ? 0 : upstream * (pwd?[j0 + i] ?? 1)
            label[i] = y == ignoreIndex ? -1 : Float(y)
        }
        let all = sums.all.pointer + j0, union = sums.union.pointer + j0
        let direct = subsetFactors(all: all, subset: union, count: count, into: factor)
        return BlockGradient(
            coefficient: coefficient, label: label, factor: factor, all: all, union: union, direct: direct)
    }
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
    let kd = UnbiasedKD(
        newLogits, oldLogits, temperature: temperature, mask: mask, logSumExps: given, oldSoftmax: oldSoftmax)
    let out = Tensor(scalar: kd.value)
    let xd = newLogits.detached()
    record(out, "unbiased_kd", [newLogits]) { g in
        let gx = Tensor(uninitialized: xd.shape)
        let (n, c, inner) = channelLayout(xd, "unbiased KD")
        let pgx = gx.pointer, pxd = xd.pointer, upstream = g.item
        forEachPixelBlock(n: n, c: c, inner: inner) { b, i0, count in
            withUnsafeTemporaryAllocation(of: Float.self, capacity: UnbiasedKD.BlockGradient.scratch) { scratch in
                let base = b * c * inner + i0
                let gradient = kd.blockGradient(
                    upstream: upstream, b, i0, count, rows: pgx + base, scratch: scratch.baseAddress!)
                for k in 0..<c {
                    let row = pxd + base + k * inner, out = pgx + base + k * inner, channel = gradient.channel(k)
                    var i = 0
                    while i < count {
                        let lanes = min(8, count - i), xs = loadLanes(row + i, lanes) * kd.inverse
                        let s = simdExp(xs - loadLanes(gradient.all + i, lanes))
                        storeLanes(channel(at: i, lanes, xs: xs, s: s, row: out), out + i, lanes)
                        i += 8
                    }
                }
            }
        }
        return [gx]
    }
    return out
}

/// `unbiasedDistillationLoss`'s forward: its value and what its gradient reads.
struct UnbiasedKD {
    let value: Float
    /// -1 / (pixels selected) / |old|, 0 when none is.
    let scale: Float
    let inverse: Float
    let old: Int
    let sums: ChannelSetLogSumExps
    /// Per pixel, logsumexp of the old logits / T (when q is not given).
    let lseOld: Tensor
    let oldLogits: Tensor, mask: Tensor?
    /// The given softmax's tensor is held until the backward has read it (its pointer alone is not).
    let oldSoftmax: (probabilities: Tensor, firstImage: Int)?

    init(
        _ newLogits: Tensor, _ oldLogits: Tensor, temperature: Float, mask: Tensor?,
        logSumExps given: ChannelSetLogSumExps?, oldSoftmax: (probabilities: Tensor, firstImage: Int)?
    ) {
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
        scale = selected > 0 ? -1 / Float(selected) / Float(old) : 0
        value = Float(total) * scale
        self.inverse = inverse
        self.old = old
        self.sums = sums
        self.lseOld = lseOld
        self.oldLogits = oldLogits.detached()
        self.mask = mask?.detached()
        self.oldSoftmax = oldSoftmax.map { ($0.probabilities.detached(), $0.firstImage) }
    }

    /// dl/dx_k times the coefficient (the upstream gradient, the scale, 1 / T and the pixel's
    /// mask) on one pixel block, with s = softmax(x / T). The rows 1..<old of the block's gradient
    /// hold q_k until each is overwritten with its gradient.
    struct BlockGradient {
        static let scratch = 4 * paddedBlock
        let coefficient: UnsafeMutablePointer<Float>, q0: UnsafeMutablePointer<Float>
        let qSum: UnsafeMutablePointer<Float>, factor: UnsafeMutablePointer<Float>
        /// The block's log-sum-exps of x / T over all channels and over background and the new ones.
        let all: UnsafePointer<Float>, union: UnsafePointer<Float>
        let direct: Bool
        let old: Int

        /// Channel k's gradient.
        @inline(__always)
        func channel(_ k: Int) -> Channel { Channel(block: self, merged: k == 0 || k >= old) }

        struct Channel {
            let block: BlockGradient
            let merged: Bool

            /// The gradient at pixels i..<i+lanes of the block, from x / T and s there; `row`
            /// is the channel's row of the block's gradient (q_k for an old channel k >= 1).
            @_transparent
            func callAsFunction(at i: Int, _ lanes: Int, xs: SIMD8<Float>, s: SIMD8<Float>, row: UnsafePointer<Float>)
                -> SIMD8<Float>
            {
                let own =
                    !merged
                    ? loadLanes(row + i, lanes)
                    : load8(block.q0 + i)
                        * (block.direct
                            ? simdExp(xs - loadLanes(block.union + i, lanes)) : s * load8(block.factor + i))
                return load8(block.coefficient + i) * (own - load8(block.qSum + i) * s)
            }
        }
    }

    /// The gradient on the block of `count` pixels from pixel i0 of image b: q_k into `rows`
    /// (the block's gradient, channel stride as the logits') for the old channels k >= 1 and
    /// the per-pixel values into `scratch` (`BlockGradient.scratch` floats).
    @inline(__always)
    func blockGradient(
        upstream g: Float, _ b: Int, _ i0: Int, _ count: Int, rows r: UnsafeMutablePointer<Float>,
        scratch: UnsafeMutablePointer<Float>
    ) -> BlockGradient {
        let inner = sums.shape.dropFirst(2).reduce(1, *), j0 = b * inner + i0
        let o = oldLogits.pointer + b * old * inner + i0, pq = lseOld.pointer, pmd = mask?.pointer
        let coefficient = scratch, q0 = coefficient + paddedBlock, qSum = q0 + paddedBlock
        let factor = qSum + paddedBlock
        let upstream = g * scale * inverse
        for i in 0..<count { coefficient[i] = upstream * (pmd?[j0 + i] ?? 1) }
        qSum.update(repeating: 0, count: paddedBlock)
        // q_k into q0 and the gradient's rows 1..<old first, then q_k - (sum q) s_k once the sum is known.
        let given = oldSoftmax.map { $0.probabilities.pointer + ($0.firstImage + b) * old * inner + i0 }
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
        let all = sums.all.pointer + j0, union = sums.union.pointer + j0
        let direct = subsetFactors(all: all, subset: union, count: count, into: factor)
        return BlockGradient(
            coefficient: coefficient, q0: q0, qSum: qSum, factor: factor, all: all, union: union, direct: direct,
            old: old)
    }
}

/// `channelSetNLL` and `unbiasedDistillationLoss` at temperature 1 on the same logits as one op,
/// [nll, kd]: a half's cross-entropy and unbiased KD both take the softmax over all channels, so
/// the backward exponentiates each logit once and writes one gradient (the two ops' gradients
/// summed, as the tape would add them) instead of two exps and two logits-sized gradients. Each
/// term reads its part through a slice, as with `gscTermSums`. `logSumExps` and
/// `distillationLogSumExps`, when given, are over the cross-entropy's and the KD's sets.
func channelSetNLLAndUnbiasedKD(
    _ logits: Tensor, _ target: Labels, merged: [Range<Int>], kept: Int, pixelWeights: Tensor?,
    logSumExps: ChannelSetLogSumExps?, oldLogits: Tensor, oldSoftmax: (probabilities: Tensor, firstImage: Int)?,
    distillationLogSumExps: ChannelSetLogSumExps? = nil
) -> Tensor {
    let nll = ChannelSetNLL(
        logits, target, merged: merged, kept: kept, ignoreIndex: 255, pixelWeights: pixelWeights,
        logSumExps: logSumExps)
    let folded = foldedBackground(oldClasses: oldLogits.shape[1], classes: logits.shape[1])
    let kd = UnbiasedKD(
        logits, oldLogits, temperature: 1, mask: nil,
        logSumExps: nll.sums.matches(logits, merged: folded, scale: 1) ? nll.sums : distillationLogSumExps,
        oldSoftmax: oldSoftmax)
    let out = Tensor(shape: [2], values: [nll.value, kd.value])
    let ld = logits.detached()
    record(out, "merged_background_nll_and_unbiased_kd", [logits]) { g in
        let gx = Tensor(uninitialized: ld.shape)
        let (n, c, inner) = channelLayout(ld, "merged-background NLL and unbiased KD")
        let px = ld.pointer, pgx = gx.pointer, upstream = (g.pointer[0], g.pointer[1])
        nll.labels.withUnsafeBufferPointer { labels in
            forEachPixelBlock(n: n, c: c, inner: inner) { b, i0, count in
                let scratchSize = ChannelSetNLL.BlockGradient.scratch + UnbiasedKD.BlockGradient.scratch
                withUnsafeTemporaryAllocation(of: Float.self, capacity: scratchSize) { scratch in
                    let base = b * c * inner + i0
                    let ceGradient = nll.blockGradient(
                        upstream: upstream.0, labels: labels, b, i0, count, scratch: scratch.baseAddress!)
                    let kdGradient = kd.blockGradient(
                        upstream: upstream.1, b, i0, count, rows: pgx + base,
                        scratch: scratch.baseAddress! + ChannelSetNLL.BlockGradient.scratch)
                    // Both softmaxes over all channels are exp(x - the same log-sum-exp), bit for bit.
                    for k in 0..<c {
                        let row = px + base + k * inner, out = pgx + base + k * inner
                        let (ce, kdChannel) = (ceGradient.channel(k, merged: nll.merged[k]), kdGradient.channel(k))
                        var i = 0
                        while i < count {
                            let lanes = min(8, count - i), x = loadLanes(row + i, lanes)
                            let s = simdExp(x - loadLanes(ceGradient.all + i, lanes))
                            let sum = ce(at: i, lanes, x: x, s: s) + kdChannel(at: i, lanes, xs: x, s: s, row: out)
                            storeLanes(sum, out + i, lanes)
                            i += 8
                        }
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
