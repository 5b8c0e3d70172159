import Foundation

// Batch normalisation over (N, H, W) per channel, as torch.nn.functional.batch_norm:
// training normalises with the biased batch variance and moves the running statistics by
// `momentum` using the unbiased variance; evaluation uses the running statistics. An optional
// leaky ReLU (slope 0: ReLU) runs in the same pass, and its backward in the normalisation's:
// the pre-activation tensor is then never stored (one activation-sized tensor less per layer
// held for backward, and two passes over memory fewer).

/// Calls body(group) for every group of at most 8 consecutive channels, in parallel over blocks
/// of channels.
@inline(__always)
private func forEachChannelGroup(_ n: Int, _ c: Int, _ plane: Int, _ body: (Range<Int>) -> Void) {
    parallelBlocks(c, minBlock: max(1, parallelGrain / max(n * plane, 1))) { r in
        for first in stride(from: r.lowerBound, to: r.upperBound, by: 8) { body(first..<min(first + 8, r.upperBound)) }
    }
}

/// Element i of the planes of up to 8 consecutive channels of one image at once (lane j: channel
/// j; lanes past the group repeat its last channel, and their results are dropped). The channel
/// sums accumulate in SIMD lanes: each lane adds in the order of a loop over that channel alone,
/// so every sum is bit for bit that loop's, but eight independent chains of adds run instead of
/// one that waits on each previous add (the statistics passes were latency-bound).
struct ChannelLanes {
    let p0, p1, p2, p3, p4, p5, p6, p7: UnsafePointer<Float>

    init(_ first: UnsafePointer<Float>, plane: Int, lanes: Int) {
        func at(_ j: Int) -> UnsafePointer<Float> { first + min(j, lanes - 1) * plane }
        (p0, p1, p2, p3, p4, p5, p6, p7) = (at(0), at(1), at(2), at(3), at(4), at(5), at(6), at(7))
    }

    @inline(__always)
    subscript(i: Int) -> SIMD8<Float> { SIMD8(p0[i], p1[i], p2[i], p3[i], p4[i], p5[i], p6[i], p7[i]) }
}

public func batchNorm2d(
    _ x: Tensor, weight: Tensor?, bias: Tensor?, runningMean: Tensor?, runningVar: Tensor?,
    training: Bool, momentum: Float = 0.1, eps: Float = 1e-5, negativeSlope: Float? = nil
) -> Tensor {
    let (n, c, h, w) = nchw(x, "batch_norm")
    // The backward reads the activation's slope off the output's sign, which needs slope >= 0.
    precondition((negativeSlope ?? 0) >= 0, "batch_norm: activation slope \(negativeSlope ?? 0) must not be negative")
    let plane = h * w, m = n * plane
    for t in [weight, bias, runningMean, runningVar].compactMap({ $0 }) {
        precondition(t.count == c, "batch_norm: parameter of shape \(t.shape) for \(c) channels")
    }
    precondition(
        training || (runningMean != nil && runningVar != nil),
        "batch_norm in eval mode needs running statistics")
    let synchronized = training ? BatchNormSync.communicator.flatMap { $0.size > 1 ? $0 : nil } : nil
    precondition(
        !training || m > 1 || synchronized != nil,
        "batch_norm in training needs more than one value per channel, got \(x.shape)")
    let meanT = Tensor(zeros: [c]), invStdT = Tensor(zeros: [c])
    let px = x.pointer, pmean = meanT.pointer, pinv = invStdT.pointer
    let out = Tensor(uninitialized: x.shape)
    let po = out.pointer
    let pw = weight?.pointer, pb = bias?.pointer
    // Per-channel sums of one group of channels over this process's images, in Double from
    // per-image Float partial sums: of the values, then of squared deviations from `mean`.
    func groupLanes(_ group: Range<Int>, _ b: Int) -> ChannelLanes {
        ChannelLanes(px + (b * c + group.lowerBound) * plane, plane: plane, lanes: group.count)
    }
    func groupSum(_ group: Range<Int>) -> SIMD8<Double> {
        var s = SIMD8<Double>()
        for b in 0..<n {
            let p = groupLanes(group, b)
            var ps = SIMD8<Float>()
            for i in 0..<plane { ps += p[i] }
            s += SIMD8<Double>(ps)
        }
        return s
    }
    func groupSquaredDeviations(_ group: Range<Int>, _ mf: SIMD8<Float>) -> SIMD8<Double> {
        var s2 = SIMD8<Double>()
        for b in 0..<n {
            let p = groupLanes(group, b)
            var ps = SIMD8<Float>()
            for i in 0..<plane {
                let d = p[i] - mf
                ps += d * d
            }
            s2 += SIMD8<Double>(ps)
        }
        return s2
    }
    var global: (mean: [Double], squares: [Double], count: Double)?
    if let synchronized {
        var sums = channelValues(n, c, plane, width: 1) { [groupSum($0)] } + [Double(m)]
        synchronized.allreduceSum(&sums)
        let count = sums[c], mean = sums[0..<c].map { $0 / count }
        precondition(count > 1, "batch_norm in training needs more than one value per channel over all ranks")
        var squares = channelValues(n, c, plane, width: 1) { group in
            let lanes = (0..<8).map { Float(mean[group.lowerBound + min($0, group.count - 1)]) }
            return [groupSquaredDeviations(group, SIMD8<Float>(lanes))]
        }
        synchronized.allreduceSum(&squares)
        global = (mean, squares, count)
    }
    forEachChannelGroup(n, c, plane) { group in
        var mean = SIMD8<Double>(), variance = SIMD8<Double>(), unbiased = SIMD8<Double>()
        if let global {
            for (j, ch) in group.enumerated() {
                mean[j] = global.mean[ch]
                variance[j] = global.squares[ch] / global.count
                unbiased[j] = global.squares[ch] / (global.count - 1)
            }
        } else if training {
            mean = groupSum(group) / Double(m)
            let s2 = groupSquaredDeviations(group, SIMD8<Float>(mean))
            variance = s2 / Double(m)
            unbiased = s2 / Double(m - 1)
        }
        for (j, ch) in group.enumerated() {
            var mu: Float, v: Float
            if training {
                mu = Float(mean[j])
                v = Float(variance[j])
                if let runningMean, let runningVar {
                    runningMean.pointer[ch] = (1 - momentum) * runningMean.pointer[ch] + momentum * mu
                    runningVar.pointer[ch] = (1 - momentum) * runningVar.pointer[ch] + momentum * Float(unbiased[j])
                }
            } else {
                mu = runningMean!.pointer[ch]
                v = runningVar!.pointer[ch]
            }
            let inv = 1 / (v + eps).squareRoot()
            pmean[ch] = mu
            pinv[ch] = inv
            let scale = (pw?[ch] ?? 1) * inv, shift = (pb?[ch] ?? 0) - mu * scale
            for b in 0..<n {
                let p = px + (b * c + ch) * plane, q = po + (b * c + ch) * plane
                switch negativeSlope {
                case nil: for i in 0..<plane { q[i] = p[i] * scale + shift }
                case 0:
                    for i in 0..<plane {
                        let v = p[i] * scale + shift
                        q[i] = v > 0 ? v : 0
                    }
                case let slope?:
                    for i in 0..<plane {
                        let v = p[i] * scale + shift
                        q[i] = v > 0 ? v : v * slope
                    }
                }
            }
        }
    }

    // The output is kept only when the activation's backward needs it.
    let xd = x.detached(), wd = weight?.detached(), od = negativeSlope == nil ? nil : out.detached()
    let inputs = [x] + [weight, bias].compactMap { $0 }
    record(out, negativeSlope == nil ? "batch_norm" : "batch_norm_activation", inputs) { g in
        let pg = g.pointer, px = xd.pointer, po = od?.pointer ?? g.pointer // unread without an activation
        let through = ActivationGradient(negativeSlope: negativeSlope)
        let pmean = meanT.pointer, pinv = invStdT.pointer
        let gx = x.requiresGrad ? Tensor(uninitialized: xd.shape) : nil
        let gw = Tensor(zeros: [c]), gb = Tensor(zeros: [c])
        let pgx = gx?.pointer, pgw = gw.pointer, pgb = gb.pointer, pw = wd?.pointer
        func groupGradientSums(_ group: Range<Int>) -> [SIMD8<Double>] {
            let lanes = group.count
            var mu = SIMD8<Float>(), inv = SIMD8<Float>()
            for j in 0..<8 {
                let ch = group.lowerBound + min(j, lanes - 1)
                mu[j] = pmean[ch]
                inv[j] = pinv[ch]
            }
            var sumDy = SIMD8<Double>(), sumDyXhat = SIMD8<Double>()
            for b in 0..<n {
                let first = (b * c + group.lowerBound) * plane
                let p = ChannelLanes(px + first, plane: plane, lanes: lanes),
                    q = ChannelLanes(pg + first, plane: plane, lanes: lanes)
                let o = ChannelLanes(po + first, plane: plane, lanes: lanes)
                var s = SIMD8<Float>(), sx = SIMD8<Float>()
                for i in 0..<plane {
                    let dy = through(q[i], o[i])
                    s += dy
                    sx += dy * (p[i] - mu)
                }
                sumDy += SIMD8<Double>(s)
                sumDyXhat += SIMD8<Double>(sx) * SIMD8<Double>(inv)
            }
            return [sumDy, sumDyXhat]
        }
        // Channel ch's input gradient from the means of dy and dy * xhat over the batch.
        func writeInputGradient(_ pgx: UnsafeMutablePointer<Float>, _ ch: Int, meanDy: Float, meanDyXhat: Float) {
            let gamma = pw?[ch] ?? 1, mu = pmean[ch], inv = pinv[ch]
            let k = gamma * inv
            for b in 0..<n {
                let base = (b * c + ch) * plane
                let p = px + base, q = pg + base, o = po + base, r = pgx + base
                // Eight at a time, each element's arithmetic as the scalar tail's.
                let vectorEnd = plane & ~7
                if training {
                    for i in stride(from: 0, to: vectorEnd, by: 8) {
                        let xhat = (load8(p + i) - mu) * inv
                        store8(k * (through(load8(q + i), load8(o + i)) - meanDy - xhat * meanDyXhat), r + i)
                    }
                    for i in vectorEnd..<plane {
                        let xhat = (p[i] - mu) * inv
                        r[i] = k * (through(q[i], o[i]) - meanDy - xhat * meanDyXhat)
                    }
                } else {
                    for i in stride(from: 0, to: vectorEnd, by: 8) {
                        store8(through(load8(q + i), load8(o + i)) * k, r + i)
                    }
                    for i in vectorEnd..<plane { r[i] = through(q[i], o[i]) * k }
                }
            }
        }
        if let synchronized {
            // Weight and bias gradients stay this rank's (the gradient allreduce sums them); the
            // input gradient needs the means over every rank's images.
            let local = channelValues(n, c, plane, width: 2, groupGradientSums)
            var total = local + [Double(m)]
            synchronized.allreduceSum(&total)
            forEachChannelGroup(n, c, plane) { group in
                for ch in group {
                    pgb[ch] = Float(local[ch])
                    pgw[ch] = Float(local[c + ch])
                    guard let pgx else { continue }
                    writeInputGradient(
                        pgx, ch, meanDy: Float(total[ch] / total[2 * c]),
                        meanDyXhat: Float(total[c + ch] / total[2 * c]))
                }
            }
        } else {
            forEachChannelGroup(n, c, plane) { group in
                let sums = groupGradientSums(group)
                let sumDy = sums[0], sumDyXhat = sums[1]
                for (j, ch) in group.enumerated() {
                    pgb[ch] = Float(sumDy[j])
                    pgw[ch] = Float(sumDyXhat[j])
                    guard let pgx else { continue }
                    writeInputGradient(
                        pgx, ch, meanDy: Float(sumDy[j] / Double(m)),
                        meanDyXhat: Float(sumDyXhat[j] / Double(m)))
                }
            }
        }
        var grads: [Tensor?] = [gx]
        if let weight { grads.append(weight.requiresGrad ? gw : nil) }
        if let bias { grads.append(bias.requiresGrad ? gb : nil) }
        return grads
    }
    return out
}

@inline(__always)
func load8(_ p: UnsafePointer<Float>) -> SIMD8<Float> { UnsafeRawPointer(p).loadUnaligned(as: SIMD8<Float>.self) }

@inline(__always)
func store8(_ v: SIMD8<Float>, _ p: UnsafeMutablePointer<Float>) {
    UnsafeMutableRawPointer(p).storeBytes(of: v, as: SIMD8<Float>.self)
}

/// The gradient through an activation fused after an op, from the op's output: leaky ReLU's
/// (slope 0: ReLU's, exactly 0 where the output is not positive) or, without one, the gradient
/// itself. Written as relu's and leaky_relu's own backward so fused and unfused runs agree bit
/// for bit.
struct ActivationGradient {
    let negativeSlope: Float?

    @inline(__always)
    func callAsFunction(_ g: Float, _ output: Float) -> Float {
        guard let slope = negativeSlope else { return g }
        return output > 0 ? g : (slope == 0 ? 0 : g * slope)
    }

    @inline(__always)
    func callAsFunction(_ g: SIMD8<Float>, _ output: SIMD8<Float>) -> SIMD8<Float> {
        guard let slope = negativeSlope else { return g }
        let cut = slope == 0 ? SIMD8<Float>() : g * slope
        return cut.replacing(with: g, where: output .> 0)
    }
}

/// Which processes batch norm in training takes its statistics over: nil (or one rank) for this
/// process's images alone, as PyTorch's BatchNorm2d under DDP; a communicator of several ranks
/// for all their images, as SyncBatchNorm and inplace-ABN's InPlaceABNSync. Process-wide, set by
/// data-parallel training before its first forward pass.
public enum BatchNormSync {
    nonisolated(unsafe) public static var communicator: Communicator?
}

/// `width` per-channel values of every group of channels, laid out as `width` blocks of `c`.
private func channelValues(
    _ n: Int, _ c: Int, _ plane: Int, width: Int,
    _ body: (Range<Int>) -> [SIMD8<Double>]
) -> [Double] {
    var values = [Double](repeating: 0, count: width * c)
    values.withUnsafeMutableBufferPointer { out in
        let p = out.baseAddress!
        forEachChannelGroup(n, c, plane) { group in
            let lanes = body(group)
            for k in 0..<width { for (j, ch) in group.enumerated() { p[k * c + ch] = lanes[k][j] } }
        }
    }
    return values
}
