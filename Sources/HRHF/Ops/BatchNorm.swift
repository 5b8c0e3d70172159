import Foundation

// Batch normalisation over (N, H, W) per channel, as torch.nn.functional.batch_norm:
// training normalises with the biased batch variance and moves the running statistics by
// `momentum` using the unbiased variance; evaluation uses the running statistics.

/// Calls body(channel) for every channel, in parallel over channel blocks.
@inline(__always)
private func forEachChannel(_ n: Int, _ c: Int, _ plane: Int, _ body: (Int) -> Void) {
    parallelBlocks(c, minBlock: max(1, parallelGrain / max(n * plane, 1))) { r in
        for ch in r { body(ch) }
    }
}

public func batchNorm2d(_ x: Tensor, weight: Tensor?, bias: Tensor?, runningMean: Tensor?, runningVar: Tensor?,
                        training: Bool, momentum: Float = 0.1, eps: Float = 1e-5) -> Tensor {
    let (n, c, h, w) = nchw(x, "batch_norm")
    let plane = h * w, m = n * plane
    for t in [weight, bias, runningMean, runningVar].compactMap({ $0 }) {
        precondition(t.count == c, "batch_norm: parameter of shape \(t.shape) for \(c) channels")
    }
    precondition(training || (runningMean != nil && runningVar != nil),
                 "batch_norm in eval mode needs running statistics")
    precondition(!training || m > 1, "batch_norm in training needs more than one value per channel, got \(x.shape)")
    let meanT = Tensor(zeros: [c]), invStdT = Tensor(zeros: [c])
    let px = x.pointer, pmean = meanT.pointer, pinv = invStdT.pointer
    let out = Tensor(zeros: x.shape)
    let po = out.pointer
    let pw = weight?.pointer, pb = bias?.pointer
    forEachChannel(n, c, plane) { ch in
        var mu: Float, variance: Float
        if training {
            var s = 0.0, s2 = 0.0
            for b in 0..<n {
                let p = px + (b * c + ch) * plane
                var ps: Float = 0
                for i in 0..<plane { ps += p[i] }
                s += Double(ps)
            }
            let meanD = s / Double(m)
            for b in 0..<n {
                let p = px + (b * c + ch) * plane
                var ps: Float = 0
                let mf = Float(meanD)
                for i in 0..<plane { let d = p[i] - mf; ps += d * d }
                s2 += Double(ps)
            }
            mu = Float(meanD)
            variance = Float(s2 / Double(m))
            if let runningMean, let runningVar {
                runningMean.pointer[ch] = (1 - momentum) * runningMean.pointer[ch] + momentum * mu
                runningVar.pointer[ch] = (1 - momentum) * runningVar.pointer[ch]
                    + momentum * Float(s2 / Double(m - 1))
            }
        } else {
            mu = runningMean!.pointer[ch]
            variance = runningVar!.pointer[ch]
        }
        let inv = 1 / (variance + eps).squareRoot()
        pmean[ch] = mu
        pinv[ch] = inv
        let scale = (pw?[ch] ?? 1) * inv, shift = (pb?[ch] ?? 0) - mu * scale
        for b in 0..<n {
            let p = px + (b * c + ch) * plane, q = po + (b * c + ch) * plane
            for i in 0..<plane { q[i] = p[i] * scale + shift }
        }
    }

    let xd = x.detached(), wd = weight?.detached()
    let inputs = [x] + [weight, bias].compactMap { $0 }
    record(out, "batch_norm", inputs) { g in
        let pg = g.pointer, px = xd.pointer
        let pmean = meanT.pointer, pinv = invStdT.pointer
        let gx = x.requiresGrad ? Tensor(zeros: xd.shape) : nil
        let gw = Tensor(zeros: [c]), gb = Tensor(zeros: [c])
        let pgx = gx?.pointer, pgw = gw.pointer, pgb = gb.pointer, pw = wd?.pointer
        forEachChannel(n, c, plane) { ch in
            let mu = pmean[ch], inv = pinv[ch]
            var sumDy = 0.0, sumDyXhat = 0.0
            for b in 0..<n {
                let p = px + (b * c + ch) * plane, q = pg + (b * c + ch) * plane
                var s: Float = 0, sx: Float = 0
                for i in 0..<plane { s += q[i]; sx += q[i] * (p[i] - mu) }
                sumDy += Double(s)
                sumDyXhat += Double(sx) * Double(inv)
            }
            pgb[ch] = Float(sumDy)
            pgw[ch] = Float(sumDyXhat)
            guard let pgx else { return }
            let gamma = pw?[ch] ?? 1
            for b in 0..<n {
                let p = px + (b * c + ch) * plane, q = pg + (b * c + ch) * plane, r = pgx + (b * c + ch) * plane
                if training {
                    let k = gamma * inv
                    let meanDy = Float(sumDy / Double(m)), meanDyXhat = Float(sumDyXhat / Double(m))
                    for i in 0..<plane {
                        let xhat = (p[i] - mu) * inv
                        r[i] = k * (q[i] - meanDy - xhat * meanDyXhat)
                    }
                } else {
                    let k = gamma * inv
                    for i in 0..<plane { r[i] = q[i] * k }
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
