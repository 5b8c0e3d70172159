import Foundation

// Max pooling (PyTorch's max_pool2d, floor mode, -inf padding) and global average pooling.

/// `F.max_pool2d(x, kernel, stride, padding)`. The gradient goes to the first maximum of each
/// window in row-major order, as PyTorch's CPU kernel.
public func maxPool2d(_ x: Tensor, kernel: Int = 3, stride: Int = 2, padding: Int = 1) -> Tensor {
    let (n, c, h, w) = nchw(x, "max_pool2d")
    precondition(padding * 2 <= kernel, "max_pool2d: padding \(padding) larger than half the kernel \(kernel)")
    let oh = (h + 2 * padding - kernel) / stride + 1, ow = (w + 2 * padding - kernel) / stride + 1
    precondition(oh > 0 && ow > 0, "max_pool2d: input \(h)x\(w) too small")
    let out = Tensor(zeros: [n, c, oh, ow])
    var argmax = [Int32](repeating: 0, count: out.count)
    let px = x.pointer, po = out.pointer
    argmax.withUnsafeMutableBufferPointer { pa in
        let pa = pa.baseAddress!
        parallelBlocks(n * c, minBlock: max(1, parallelGrain / max(oh * ow * kernel * kernel, 1))) { r in
            for p in r {
                let src = px + p * h * w
                for oy in 0..<oh {
                    for ox in 0..<ow {
                        var best = -Float.infinity, bestIndex = -1
                        for ky in 0..<kernel {
                            let iy = oy * stride - padding + ky
                            if iy < 0 || iy >= h { continue }
                            for kx in 0..<kernel {
                                let ix = ox * stride - padding + kx
                                if ix < 0 || ix >= w { continue }
                                let v = src[iy * w + ix]
                                if v > best || v.isNaN || bestIndex < 0 {
                                    best = v
                                    bestIndex = iy * w + ix
                                }
                            }
                        }
                        let o = (p * oh + oy) * ow + ox
                        po[o] = best
                        pa[o] = Int32(bestIndex)
                    }
                }
            }
        }
    }
    let indices = argmax
    record(out, "max_pool2d", [x]) { g in
        let gx = Tensor(zeros: [n, c, h, w])
        let pg = g.pointer, pgx = gx.pointer
        indices.withUnsafeBufferPointer { pa in
            parallelBlocks(n * c) { r in
                for p in r {
                    for j in 0..<(oh * ow) {
                        pgx[p * h * w + Int(pa[p * oh * ow + j])] += pg[p * oh * ow + j]
                    }
                }
            }
        }
        return [gx]
    }
    return out
}

/// `F.adaptive_avg_pool2d(x, 1)`: the mean of each plane, N x C x 1 x 1.
public func adaptiveAvgPool1x1(_ x: Tensor) -> Tensor {
    _ = nchw(x, "adaptive_avg_pool2d")
    return mean(x, axes: [2, 3], keepDims: true)
}
