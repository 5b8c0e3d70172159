import Foundation

// Max pooling (PyTorch's max_pool2d, floor mode, -inf padding) and global average pooling.

/// `F.max_pool2d(x, kernel, stride, padding)`. The gradient goes to the first maximum of each
/// window in row-major order, as PyTorch's CPU kernel.
public func maxPool2d(_ x: Tensor, kernel: Int = 3, stride: Int = 2, padding: Int = 1) -> Tensor {
    let (n, c, h, w) = nchw(x, "max_pool2d")
    precondition(padding * 2 <= kernel, "max_pool2d: padding \(padding) larger than half the kernel \(kernel)")
    let oh = (h + 2 * padding - kernel) / stride + 1, ow = (w + 2 * padding - kernel) / stride + 1
    precondition(oh > 0 && ow > 0, "max_pool2d: input \(h)x\(w) too small")
    let out = Tensor(uninitialized: [n, c, oh, ow])
    // Where each maximum came from, for the backward only.
    let recordsIndices = GradMode.isEnabled && x.requiresGrad
    let argmax = [Int32](unsafeUninitializedCapacity: recordsIndices ? out.count : 0) { pa, initialized in
        let px = x.pointer, po = out.pointer, pa = recordsIndices ? pa.baseAddress : nil
        parallelBlocks(n * c, minBlock: max(1, parallelGrain / max(oh * ow * kernel * kernel, 1))) { r in
            for p in r {
                let src = px + p * h * w, dst = po + p * oh * ow, index = pa.map { $0 + p * oh * ow }
                for oy in 0..<oh {
                    // The window clipped to the image: never empty (padding is at most half the kernel).
                    let y0 = max(oy * stride - padding, 0), y1 = min(oy * stride - padding + kernel, h)
                    for ox in 0..<ow {
                        let x0 = max(ox * stride - padding, 0), x1 = min(ox * stride - padding + kernel, w)
                        var bestIndex = y0 &* w &+ x0
                        var best = src[bestIndex]
                        for iy in y0..<y1 {
                            let rowStart = iy &* w
                            for ix in x0..<x1 {
                                let v = src[rowStart &+ ix]
                                if v > best || v.isNaN {
                                    best = v
                                    bestIndex = rowStart &+ ix
                                }
                            }
                        }
                        dst[oy &* ow &+ ox] = best
                        index?[oy &* ow &+ ox] = Int32(truncatingIfNeeded: bestIndex)
                    }
                }
            }
        }
        initialized = recordsIndices ? out.count : 0
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
