import Foundation

// Softmax, log-softmax and logsumexp over the channel axis (dim 1) of N x C x ... tensors:
// for segmentation logits, one distribution per pixel.

/// (batch, channels, positions per channel) of an N x C x ... tensor.
@inline(__always)
func channelLayout(_ x: Tensor, _ op: String) -> (n: Int, c: Int, inner: Int) {
    precondition(x.rank >= 2, "\(op) expects N x C x ..., got \(x.shape)")
    return (x.shape[0], x.shape[1], x.shape[2...].reduce(1, *))
}

/// Calls body(pointer offset of the pixel's channel 0, stride between channels) for every
/// pixel, in parallel over pixel blocks.
@inline(__always)
func forEachPixel(n: Int, c: Int, inner: Int, _ body: (Int) -> Void) {
    parallelBlocks(n * inner, minBlock: max(1, parallelGrain / max(c, 1))) { r in
        for p in r {
            let b = p / inner, i = p % inner
            body(b * c * inner + i)
        }
    }
}

/// Max and log-sum-exp of one pixel's channel values.
@inline(__always)
func pixelLogSumExp(_ p: UnsafeMutablePointer<Float>, _ c: Int, _ stride: Int) -> Float {
    var m = -Float.infinity
    for k in 0..<c { m = max(m, p[k * stride]) }
    if m == -.infinity { return m }
    var s: Float = 0
    for k in 0..<c { s += Foundation.exp(p[k * stride] - m) }
    return m + Foundation.log(s)
}

public func softmax(_ x: Tensor) -> Tensor {
    let (n, c, inner) = channelLayout(x, "softmax")
    let out = Tensor(zeros: x.shape)
    let px = x.pointer, po = out.pointer
    forEachPixel(n: n, c: c, inner: inner) { o in
        let lse = pixelLogSumExp(px + o, c, inner)
        for k in 0..<c { po[o + k * inner] = Foundation.exp(px[o + k * inner] - lse) }
    }
    let od = out.detached()
    record(out, "softmax", [x]) { g in
        // dx = y * (g - sum_c g y)
        let gx = Tensor(zeros: g.shape)
        let pg = g.pointer, py = od.pointer, pgx = gx.pointer
        forEachPixel(n: n, c: c, inner: inner) { o in
            var dot: Float = 0
            for k in 0..<c { dot += pg[o + k * inner] * py[o + k * inner] }
            for k in 0..<c { pgx[o + k * inner] = py[o + k * inner] * (pg[o + k * inner] - dot) }
        }
        return [gx]
    }
    return out
}

public func logSoftmax(_ x: Tensor) -> Tensor {
    let (n, c, inner) = channelLayout(x, "log_softmax")
    let out = Tensor(zeros: x.shape)
    let px = x.pointer, po = out.pointer
    forEachPixel(n: n, c: c, inner: inner) { o in
        let lse = pixelLogSumExp(px + o, c, inner)
        for k in 0..<c { po[o + k * inner] = px[o + k * inner] - lse }
    }
    let od = out.detached()
    record(out, "log_softmax", [x]) { g in
        // dx = g - softmax * sum_c g
        let gx = Tensor(zeros: g.shape)
        let pg = g.pointer, py = od.pointer, pgx = gx.pointer
        forEachPixel(n: n, c: c, inner: inner) { o in
            var total: Float = 0
            for k in 0..<c { total += pg[o + k * inner] }
            for k in 0..<c {
                pgx[o + k * inner] = pg[o + k * inner] - Foundation.exp(py[o + k * inner]) * total
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
    forEachPixel(n: n, c: c, inner: inner) { o in
        po[(o / (c * inner)) * inner + o % inner] = pixelLogSumExp(px + o, c, inner)
    }
    let xd = x.detached(), od = out.detached()
    record(out, "logsumexp", [x]) { g in
        // dx = g * softmax(x)
        let gx = Tensor(zeros: xd.shape)
        let pg = g.pointer, pl = od.pointer, pgx = gx.pointer, pxd = xd.pointer
        forEachPixel(n: n, c: c, inner: inner) { o in
            let j = (o / (c * inner)) * inner + o % inner
            for k in 0..<c { pgx[o + k * inner] = pg[j] * Foundation.exp(pxd[o + k * inner] - pl[j]) }
        }
        return [gx]
    }
    return out
}
