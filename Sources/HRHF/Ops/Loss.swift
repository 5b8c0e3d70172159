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
