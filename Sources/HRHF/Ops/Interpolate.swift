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

    /// The four arrays' storage, for loops that index them per element.
    func withPointers<R>(
        _ body: (UnsafePointer<Int>, UnsafePointer<Int>, UnsafePointer<Float>, UnsafePointer<Float>) -> R
    ) -> R {
        i0.withUnsafeBufferPointer { i0 in
            i1.withUnsafeBufferPointer { i1 in
                w0.withUnsafeBufferPointer { w0 in
                    w1.withUnsafeBufferPointer { w1 in
                        body(i0.baseAddress!, i1.baseAddress!, w0.baseAddress!, w1.baseAddress!)
                    }
                }
            }
        }
    }
}

/// A new N x C x `size` tensor whose every plane body(source plane, its plane, scratch, i0, i1,
/// w0, w1) writes in full, planes in parallel, with `tx`'s taps as pointers and a scratch of
/// `scratchCount` floats per worker.
private func mapPlanes(
    _ x: Tensor, to size: (Int, Int), scratchCount: Int, _ tx: LinearTaps,
    _ body: (
        UnsafePointer<Float>, UnsafeMutablePointer<Float>, UnsafeMutablePointer<Float>, UnsafePointer<Int>,
        UnsafePointer<Int>, UnsafePointer<Float>, UnsafePointer<Float>
    ) -> Void
) -> Tensor {
    let (n, c, h, w) = nchw(x, "interpolate")
    let out = Tensor(uninitialized: [n, c, size.0, size.1])
    let px = x.pointer, po = out.pointer, outPlane = size.0 * size.1
    parallelBlocks(n * c, minBlock: max(1, parallelGrain / max(max(outPlane, h * w), 1))) { r in
        let scratch = UnsafeMutablePointer<Float>.allocate(capacity: scratchCount)
        defer { scratch.deallocate() }
        tx.withPointers { i0, i1, w0, w1 in
            for p in r { body(px + p * h * w, po + p * outPlane, scratch, i0, i1, w0, w1) }
        }
    }
    return out
}

/// Separable: each input row resized along x once, then each output row a blend of two of
/// those (the same products and sums as blending four pixels per output).
private func resizeForward(_ x: Tensor, _ oh: Int, _ ow: Int, _ ty: LinearTaps, _ tx: LinearTaps) -> Tensor {
    let (h, w) = (x.shape[2], x.shape[3])
    return mapPlanes(x, to: (oh, ow), scratchCount: h * ow, tx) { src, dst, rowsAlongX, i0, i1, w0, w1 in
        for iy in 0..<h {
            let s = src + iy * w, d = rowsAlongX + iy * ow
            for ox in 0..<ow { d[ox] = w0[ox] * s[i0[ox]] + w1[ox] * s[i1[ox]] }
        }
        for oy in 0..<oh {
            let r0 = rowsAlongX + ty.i0[oy] * ow, r1 = rowsAlongX + ty.i1[oy] * ow
            let wy0 = ty.w0[oy], wy1 = ty.w1[oy], d = dst + oy * ow
            for ox in 0..<ow { d[ox] = wy0 * r0[ox] + wy1 * r1[ox] }
        }
    }
}

/// The adjoint of `resizeForward`, separable too: output-gradient rows summed into the input
/// rows they blend (along y, whole rows), then each of those folded back along x.
private func resizeBackward(_ g: Tensor, _ h: Int, _ w: Int, _ ty: LinearTaps, _ tx: LinearTaps) -> Tensor {
    let (oh, ow) = (g.shape[2], g.shape[3])
    return mapPlanes(g, to: (h, w), scratchCount: h * ow, tx) { src, dst, rowsAlongY, i0, i1, w0, w1 in
        rowsAlongY.update(repeating: 0, count: h * ow)
        for oy in 0..<oh {
            let r0 = rowsAlongY + ty.i0[oy] * ow, r1 = rowsAlongY + ty.i1[oy] * ow
            let wy0 = ty.w0[oy], wy1 = ty.w1[oy], s = src + oy * ow
            for ox in 0..<ow { r0[ox] += wy0 * s[ox] }
            for ox in 0..<ow { r1[ox] += wy1 * s[ox] }
        }
        dst.update(repeating: 0, count: h * w)
        for iy in 0..<h {
            let s = rowsAlongY + iy * ow, d = dst + iy * w
            for ox in 0..<ow {
                d[i0[ox]] += w0[ox] * s[ox]
                d[i1[ox]] += w1[ox] * s[ox]
            }
        }
    }
}

/// Bilinear resize of an NCHW tensor to `size` (height, width), up or down.
public func resizeBilinear(_ x: Tensor, size: (Int, Int)) -> Tensor {
    let (_, _, h, w) = nchw(x, "interpolate")
    let (oh, ow) = size
    precondition(oh > 0 && ow > 0, "interpolate: output size \(size) must be positive")
    if oh == h && ow == w { return x }
    let ty = LinearTaps(inSize: h, outSize: oh), tx = LinearTaps(inSize: w, outSize: ow)
    let out = resizeForward(x, oh, ow, ty, tx)
    record(out, "interpolate_bilinear", [x]) { g in [resizeBackward(g, h, w, ty, tx)] }
    return out
}
