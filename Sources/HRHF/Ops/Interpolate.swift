import Foundation

// Bilinear resize with align_corners=False, sampling exactly as PyTorch's
// `F.interpolate(x, size=(oh, ow), mode="bilinear", align_corners=False)`:
// source = (dst + 0.5) * in/out - 0.5, clamped at 0 from below; the upper neighbour is
// clamped to the last row or column.

/// Per output coordinate: the two source indices and their weights.
struct LinearTaps {
    var i0: [Int], i1: [Int], w0: [Float], w1: [Float]

    init(inSize: Int, outSize: Int) {
        let scale = Float(inSize) / Float(outSize)
        i0 = []
        i1 = []
        w0 = []
        w1 = []
        for d in 0..<outSize {
            let src = max(scale * (Float(d) + 0.5) - 0.5, 0)
            let lo = min(Int(src), inSize - 1)
            let hi = lo + (lo < inSize - 1 ? 1 : 0)
            let l1 = min(max(src - Float(lo), 0), 1)
            i0.append(lo)
            i1.append(hi)
            w0.append(1 - l1)
            w1.append(l1)
        }
    }
}

private func resizeForward(_ x: Tensor, _ oh: Int, _ ow: Int, _ ty: LinearTaps, _ tx: LinearTaps) -> Tensor {
    let (n, c, h, w) = nchw(x, "interpolate")
    let out = Tensor(zeros: [n, c, oh, ow])
    let px = x.pointer, po = out.pointer
    parallelBlocks(n * c, minBlock: max(1, parallelGrain / max(oh * ow, 1))) { r in
        for p in r {
            let src = px + p * h * w, dst = po + p * oh * ow
            for oy in 0..<oh {
                let r0 = src + ty.i0[oy] * w, r1 = src + ty.i1[oy] * w
                let wy0 = ty.w0[oy], wy1 = ty.w1[oy]
                for ox in 0..<ow {
                    let a = tx.i0[ox], b = tx.i1[ox]
                    dst[oy * ow + ox] =
                        wy0 * (tx.w0[ox] * r0[a] + tx.w1[ox] * r0[b])
                        + wy1 * (tx.w0[ox] * r1[a] + tx.w1[ox] * r1[b])
                }
            }
        }
    }
    return out
}

/// Bilinear resize of an NCHW tensor to `size` (height, width), up or down.
public func resizeBilinear(_ x: Tensor, size: (Int, Int)) -> Tensor {
    let (n, c, h, w) = nchw(x, "interpolate")
    let (oh, ow) = size
    precondition(oh > 0 && ow > 0, "interpolate: output size \(size) must be positive")
    if oh == h && ow == w { return x }
    let ty = LinearTaps(inSize: h, outSize: oh), tx = LinearTaps(inSize: w, outSize: ow)
    let out = resizeForward(x, oh, ow, ty, tx)
    record(out, "interpolate_bilinear", [x]) { g in
        let gx = Tensor(zeros: [n, c, h, w])
        let pg = g.pointer, pgx = gx.pointer
        parallelBlocks(n * c) { r in
            for p in r {
                let src = pg + p * oh * ow, dst = pgx + p * h * w
                for oy in 0..<oh {
                    let r0 = dst + ty.i0[oy] * w, r1 = dst + ty.i1[oy] * w
                    let wy0 = ty.w0[oy], wy1 = ty.w1[oy]
                    for ox in 0..<ow {
                        let v = src[oy * ow + ox]
                        let a = tx.i0[ox], b = tx.i1[ox]
                        r0[a] += wy0 * tx.w0[ox] * v
                        r0[b] += wy0 * tx.w1[ox] * v
                        r1[a] += wy1 * tx.w0[ox] * v
                        r1[b] += wy1 * tx.w1[ox] * v
                    }
                }
            }
        }
        return [gx]
    }
    return out
}
