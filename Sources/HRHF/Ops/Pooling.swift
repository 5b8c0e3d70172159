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
                    let vectorised =
                        stridedMaxPoolRow(
                            src, w: w, rows: y0..<y1, kernel: kernel, stride: stride, padding: padding, outWidth: ow,
                            into: dst + oy * ow, indices: index.map { $0 + oy * ow })
                    for ox in 0..<ow where !vectorised.contains(ox) {
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

/// One output row of the ResNet stem's max pool (3x3, stride 2, padding 1) on the output
/// columns whose window lies inside the image, eight at a time: each window row's three columns
/// are the odd, even and odd lanes of two 16-wide loads, taken in the scalar loop's order with
/// the same rule (a later value wins when greater or NaN), so values and indices are the same.
/// Returns the columns written (none for other pools or maps narrower than 18).
@inline(__always)
private func stridedMaxPoolRow(
    _ src: UnsafePointer<Float>, w: Int, rows: Range<Int>, kernel: Int, stride: Int, padding: Int, outWidth ow: Int,
    into dst: UnsafeMutablePointer<Float>, indices: UnsafeMutablePointer<Int32>?
) -> Range<Int> {
    // Columns 2 ox - 1 ... 2 ox + 1 inside for ox in 1...last; a group starting at ox reads 2 ox - 1 ... 2 ox + 15.
    let last = min(ow - 1, (w - 2) / 2), lastStart = (w - 16) / 2
    guard kernel == 3 && stride == 2 && padding == 1 && lastStart >= 1 && last >= 8 && !rows.isEmpty else {
        return 0..<0
    }
    let lanes = SIMD8<Int32>(0, 2, 4, 6, 8, 10, 12, 14)
    func group(_ ox: Int) {
        var best = SIMD8<Float>(repeating: 0), at = SIMD8<Int32>(repeating: 0), first = true
        for iy in rows {
            let row = src + iy * w, column = Int32(truncatingIfNeeded: iy * w + 2 * ox)
            let left = UnsafeRawPointer(row + 2 * ox - 1).loadUnaligned(as: SIMD16<Float>.self).evenHalf
            let pair = UnsafeRawPointer(row + 2 * ox).loadUnaligned(as: SIMD16<Float>.self)
            func take(_ v: SIMD8<Float>, _ dx: Int32) {
                let index = lanes &+ (column &+ dx)
                if first {
                    (best, at, first) = (v, index, false)
                } else {
                    let wins = (v .> best) .| (v .!= v)
                    best.replace(with: v, where: wins)
                    at.replace(with: index, where: wins)
                }
            }
            take(left, -1)
            take(pair.evenHalf, 0)
            take(pair.oddHalf, 1)
        }
        UnsafeMutableRawPointer(dst + ox).storeBytes(of: best, as: SIMD8<Float>.self)
        if let indices { UnsafeMutableRawPointer(indices + ox).storeBytes(of: at, as: SIMD8<Int32>.self) }
    }
    var ox = 1
    while ox + 7 <= last && ox <= lastStart {
        group(ox)
        ox += 8
    }
    // The last columns as a group overlapping the one before (the same values again) where it can read them.
    if ox <= last && last - 7 <= lastStart {
        group(last - 7)
        ox = last + 1
    }
    return 1..<ox
}

/// `F.adaptive_avg_pool2d(x, 1)`: the mean of each plane, N x C x 1 x 1.
public func adaptiveAvgPool1x1(_ x: Tensor) -> Tensor {
    _ = nchw(x, "adaptive_avg_pool2d")
    return mean(x, axes: [2, 3], keepDims: true)
}
