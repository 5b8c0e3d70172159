import Foundation

// Convolutions as one product per kernel tap, each over just the output rectangle where that
// tap reads the image. A dilated 3x3 whose reach is a large part of the map (DeepLab's ASPP:
// rates 12 and 24 on a 32x32 map) spends most of an im2col product on padding: 44% of rate 12's
// multiply-adds and 75% of rate 24's read zeros. Per tap the products are Cout x Cin x (its
// rectangle), deep enough (Cin) to run at the full sgemm rate, and the rows a tap reads whole
// need no copy at all. Forward, input gradient and weight gradient side by side; stride 1 and
// one group only (where the waste is).

/// When convolutions take the per-tap path: `auto` by the geometry (`Conv2dGeometry.runsPerTap`),
/// or always / never where the geometry allows (tests compare the two paths).
enum PerTapProducts {
    enum Mode { case auto, always, never }
    nonisolated(unsafe) static var mode = Mode.auto
}

/// One live tap and the output rectangle over which it reads the image; at stride 1 output
/// (oy, ox) reads input (oy + dy, ox + dx) (the per-tap passes; other strides use the rectangle
/// only to count work).
struct TapRect {
    let tap: Int
    let rows: Range<Int>, cols: Range<Int>
    let dy: Int, dx: Int
}

extension Conv2dGeometry {
    /// Output positions o in 0..<outSize at which kernel index k reads inside the input
    /// (o * stride + k * dilation - pad in 0..<inSize); empty for a tap on padding only.
    static func liveOutputs(_ k: Int, stride: Int, pad: Int, dilation: Int, inSize: Int, outSize: Int) -> Range<Int> {
        let offset = k * dilation - pad
        let lo = min(outSize, offset >= 0 ? 0 : (-offset + stride - 1) / stride)
        let hi = inSize - 1 - offset < 0 ? 0 : (inSize - 1 - offset) / stride + 1
        return lo..<max(lo, min(hi, outSize))
    }

    /// Every tap that reads at least one pixel, with its rectangle, in kernel order.
    var tapRects: [TapRect] {
        var rects: [TapRect] = []
        for ki in 0..<kernelH {
            let rows = Self.liveOutputs(ki, stride: strideH, pad: padH, dilation: dilationH, inSize: inH, outSize: outH)
            for kj in 0..<kernelW {
                let cols = Self.liveOutputs(
                    kj, stride: strideW, pad: padW, dilation: dilationW, inSize: inW, outSize: outW)
                if !rows.isEmpty && !cols.isEmpty {
                    rects.append(
                        TapRect(
                            tap: ki * kernelW + kj, rows: rows, cols: cols,
                            dy: ki * dilationH - padH, dx: kj * dilationW - padW))
                }
            }
        }
        return rects
    }

    /// Output positions summed over the taps at which a tap reads the image: the multiply-adds
    /// that are not products with padding, per input-output channel pair.
    var imageReadingTapPositions: Int { tapRects.reduce(0) { $0 + $1.rows.count * $1.cols.count } }

    /// The share of an im2col product's multiply-adds that read the image.
    var imageReadingShare: Double {
        Double(imageReadingTapPositions) / Double(max(1, kernelH * kernelW * outH * outW))
    }

    /// Whether this convolution runs one product per tap: stride 1 and one group, at least 256
    /// input channels (each product's depth; 128 and 64 measured no faster) and more than 5%
    /// of the im2col product on padding, or at least 128 input channels and more than half of
    /// it on padding. Measured on DeepLabV3-ResNet50 at 256x256: the bound at 95% (ASPP plus
    /// the rate-2 and rate-4 3x3 layers, 92% and 84%) trained 3-4% faster than at 80% (ASPP
    /// only). The zoo model's ASPP (128 channels on 16x16 maps; rate 12 reads the image in 25%
    /// of the im2col product, rates 24 and 36 in 11%) cut the sgemm samples of a MiB iteration
    /// by 17%.
    var runsPerTap: Bool {
        guard groups == 1 && strideH == 1 && strideW == 1 && !isPointwise else { return false }
        switch PerTapProducts.mode {
        case .never: return false
        case .always: return true
        case .auto:
            return (inChannels >= 256 && imageReadingShare <= 0.95) || (inChannels >= 128 && imageReadingShare <= 0.5)
        }
    }
}

/// The weight as one Cout x Cin matrix per live tap, tap after tap.
private func tapMajorWeight(_ weight: UnsafePointer<Float>, _ geo: Conv2dGeometry, _ rects: [TapRect])
    -> UnsafeMutablePointer<Float>
{
    let cin = geo.inChannels, cout = geo.outChannels, all = geo.kernelH * geo.kernelW
    let out = UnsafeMutablePointer<Float>.allocate(capacity: rects.count * cout * cin)
    parallelBlocks(cout) { r in
        for co in r {
            for (j, rect) in rects.enumerated() {
                let dst = out + (j * cout + co) * cin, src = weight + co * cin * all + rect.tap
                for ci in 0..<cin { dst[ci] = src[ci * all] }
            }
        }
    }
    return out
}

/// Output rows of `rect` in `rows`, cut into blocks of at most `limit` rows.
private func rowBlocks(_ rect: TapRect, within rows: Range<Int>, limit: Int) -> [Range<Int>] {
    let lo = max(rect.rows.lowerBound, rows.lowerBound), hi = min(rect.rows.upperBound, rows.upperBound)
    return lo < hi ? blocks(of: lo..<hi, width: limit) : []
}

/// How many output rows one product of a tap covers: its copied operands (`depth` channels by
/// the rows' columns) stay within the im2col block limit.
private func rowsPerProduct(depth: Int, _ rect: TapRect) -> Int {
    max(1, Im2colBlocking.floats / max(1, depth * rect.cols.count))
}

/// Copies a rectangle of `channels` planes of `src` (each `planeW` wide, `plane` long): rows
/// `rows` shifted by `dy`, columns `cols` shifted by `dx`, into `dst` as channels x
/// (rows.count * cols.count).
private func copyRect(
    _ src: UnsafePointer<Float>, plane: Int, planeW: Int, channels: Int, rows: Range<Int>, cols: Range<Int>,
    dy: Int, dx: Int, into dst: UnsafeMutablePointer<Float>
) {
    let width = cols.count, n = rows.count * width
    for c in 0..<channels {
        for (i, oy) in rows.enumerated() {
            (dst + c * n + i * width).update(
                from: src + c * plane + (oy + dy) * planeW + cols.lowerBound + dx, count: width)
        }
    }
}

/// The inverse of `copyRect`, adding: `dst`'s rectangle += `src` (channels x rows.count * cols.count).
private func addRect(
    _ src: UnsafePointer<Float>, into dst: UnsafeMutablePointer<Float>, plane: Int, planeW: Int, channels: Int,
    rows: Range<Int>, cols: Range<Int>, dy: Int, dx: Int
) {
    let width = cols.count, n = rows.count * width
    for c in 0..<channels {
        for (i, oy) in rows.enumerated() {
            let d = dst + c * plane + (oy + dy) * planeW + cols.lowerBound + dx, s = src + c * n + i * width
            for x in 0..<width { d[x] += s[x] }
        }
    }
}

/// A product's operand over output rows `block` of `rect`: `channels` planes of `src` (the
/// input, read where the tap reads it when `shifted`; else the output-shaped gradient), in
/// place when the rectangle spans whole rows, otherwise copied into the worker's `scratch`.
/// Returns the operand and its row stride.
private func rectOperand(
    _ src: UnsafePointer<Float>, plane: Int, planeW: Int, channels: Int, rect: TapRect, block: Range<Int>,
    shifted: Bool, wholeRows: Bool, scratch: WorkerScratch, worker: Int
) -> (UnsafePointer<Float>, Int) {
    let (dy, dx) = shifted ? (rect.dy, rect.dx) : (0, 0)
    if wholeRows { return (src + (block.lowerBound + dy) * planeW, plane) }
    let n = block.count * rect.cols.count
    let copy = scratch.get(worker: worker, channels * n)
    copyRect(
        src, plane: plane, planeW: planeW, channels: channels, rows: block, cols: rect.cols, dy: dy, dx: dx, into: copy)
    return (UnsafePointer(copy), n)
}

/// What the three per-tap passes share: sizes, the tap rectangles, the weight tap-major (for
/// the passes that read it), the work counted, and the walk over the products.
private struct PerTapPass {
    let rects: [TapRect]
    let plane: Int, inPlane: Int, ow: Int, cin: Int, cout: Int
    let tapWeights: UnsafeMutablePointer<Float>?

    init(_ geo: Conv2dGeometry, batch: Int, weight: UnsafePointer<Float>?) {
        let rects = geo.tapRects
        self.rects = rects
        (plane, inPlane, ow) = (geo.outH * geo.outW, geo.inH * geo.inW, geo.outW)
        (cin, cout) = (geo.inChannels, geo.outChannels)
        tapWeights = weight.map { tapMajorWeight($0, geo, rects) }
        Profiler.convolution(flops: geo.flopsPerImage * Double(batch))
    }

    func release() { tapWeights?.deallocate() }

    /// Calls body(j, rect, block, n) for each live tap j and each block of its output rows
    /// within `rows` (n: the block's output positions).
    func forEachProduct(within rows: Range<Int>, _ body: (Int, TapRect, Range<Int>, Int) -> Void) {
        for (j, rect) in rects.enumerated() {
            for block in rowBlocks(rect, within: rows, limit: rowsPerProduct(depth: max(cin, cout), rect)) {
                body(j, rect, block, block.count * rect.cols.count)
            }
        }
    }
}

/// Second per-worker scratch of the per-tap products (the first is `im2colScratch`).
let tapProductScratch = WorkerScratch()

/// Whether a tap's rectangle spans whole rows of the map, so a block of its rows is one
/// contiguous run per channel that a product reads or writes in place, without a copy.
extension TapRect {
    fileprivate func readsWholeInputRows(_ geo: Conv2dGeometry) -> Bool { cols.count == geo.inW }
    fileprivate func writesWholeOutputRows(_ geo: Conv2dGeometry) -> Bool { cols.count == geo.outW }
}

/// `conv2dForward` for `runsPerTap` geometries: each output element is the sum over live taps,
/// in kernel order, of that tap's product over the input channels.
func conv2dForwardPerTap(
    _ x: UnsafePointer<Float>, _ weight: UnsafePointer<Float>, epilogue: ConvEpilogue,
    _ geo: Conv2dGeometry, batch: Int, out: UnsafeMutablePointer<Float>
) {
    let pass = PerTapPass(geo, batch: batch, weight: weight)
    defer { pass.release() }
    let (plane, inPlane, ow, cin, cout, wt) = (pass.plane, pass.inPlane, pass.ow, pass.cin, pass.cout, pass.tapWeights!)
    // Output rows `rows` of image b, on worker t.
    func run(_ t: Int, _ b: Int, _ rows: Range<Int>) {
        guard !rows.isEmpty else { return }
        let xb = x + b * cin * inPlane, ob = out + b * cout * plane
        for co in 0..<cout { (ob + co * plane + rows.lowerBound * ow).update(repeating: 0, count: rows.count * ow) }
        pass.forEachProduct(within: rows) { j, rect, block, n in
            let (xs, ldx) = rectOperand(
                xb, plane: inPlane, planeW: geo.inW, channels: cin, rect: rect, block: block, shifted: true,
                wholeRows: rect.readsWholeInputRows(geo), scratch: im2colScratch, worker: t)
            if rect.writesWholeOutputRows(geo) {
                sgemm(
                    m: cout, n: n, k: cin, a: wt + j * cout * cin, lda: cin, b: xs, ldb: ldx, beta: 1,
                    c: ob + block.lowerBound * ow, ldc: plane)
            } else {
                let product = tapProductScratch.get(worker: t, cout * n)
                sgemm(
                    m: cout, n: n, k: cin, a: wt + j * cout * cin, lda: cin, b: xs, ldb: ldx, beta: 0, c: product,
                    ldc: n)
                addRect(
                    product, into: ob, plane: plane, planeW: ow, channels: cout, rows: block, cols: rect.cols, dy: 0,
                    dx: 0)
            }
        }
        if !epilogue.isIdentity {
            for co in 0..<cout {
                epilogue.apply(ob + co * plane + rows.lowerBound * ow, count: rows.count * ow, channel: co)
            }
        }
    }
    forEachImageShare(batch: batch, parts: geo.outH, run)
}

/// `conv2dBackwardInput` for `runsPerTap` geometries: each worker owns input channels, clears
/// them and adds, tap by tap, W_tap^T dY over the tap's rectangle.
func conv2dBackwardInputPerTap(
    _ gradOut: UnsafePointer<Float>, _ weight: UnsafePointer<Float>, _ geo: Conv2dGeometry,
    batch: Int, gradInput: UnsafeMutablePointer<Float>
) {
    let pass = PerTapPass(geo, batch: batch, weight: weight)
    defer { pass.release() }
    let (plane, inPlane, ow, cin, cout, wt) = (pass.plane, pass.inPlane, pass.ow, pass.cin, pass.cout, pass.tapWeights!)
    func run(_ t: Int, _ b: Int, _ channels: Range<Int>) {
        guard !channels.isEmpty else { return }
        let gy = gradOut + b * cout * plane, gx = gradInput + (b * cin + channels.lowerBound) * inPlane
        gx.update(repeating: 0, count: channels.count * inPlane)
        pass.forEachProduct(within: 0..<geo.outH) { j, rect, block, n in
            let (dy, lddy) = rectOperand(
                gy, plane: plane, planeW: ow, channels: cout, rect: rect, block: block, shifted: false,
                wholeRows: rect.writesWholeOutputRows(geo), scratch: im2colScratch, worker: t)
            let a = wt + j * cout * cin + channels.lowerBound
            if rect.readsWholeInputRows(geo) {
                sgemm(
                    transA: true, m: channels.count, n: n, k: cout, a: a, lda: cin, b: dy, ldb: lddy, beta: 1,
                    c: gx + (block.lowerBound + rect.dy) * geo.inW, ldc: inPlane)
            } else {
                let product = tapProductScratch.get(worker: t, channels.count * n)
                sgemm(
                    transA: true, m: channels.count, n: n, k: cout, a: a, lda: cin, b: dy, ldb: lddy, beta: 0,
                    c: product, ldc: n)
                addRect(
                    product, into: gx, plane: inPlane, planeW: geo.inW, channels: channels.count, rows: block,
                    cols: rect.cols, dy: rect.dy, dx: rect.dx)
            }
        }
    }
    forEachImageShare(batch: batch, parts: cin, run)
}

/// `conv2dBackwardWeight` for `runsPerTap` geometries: dW_tap = sum over images and the tap's
/// rectangle of dY x^T, each worker owning input channels (columns of dW), summed in order.
func conv2dBackwardWeightPerTap(
    _ gradOut: UnsafePointer<Float>, _ x: UnsafePointer<Float>, _ geo: Conv2dGeometry,
    batch: Int, gradWeight: UnsafeMutablePointer<Float>
) {
    let pass = PerTapPass(geo, batch: batch, weight: nil)
    let (plane, inPlane, ow, cin, cout, rects) = (pass.plane, pass.inPlane, pass.ow, pass.cin, pass.cout, pass.rects)
    let all = geo.kernelH * geo.kernelW
    let gwt = UnsafeMutablePointer<Float>.allocate(capacity: max(1, rects.count * cout * cin))
    defer { gwt.deallocate() }
    forEachWorker(cin, parts: ParallelConfig.threads) { t, channels in
        for b in 0..<batch {
            let gy = gradOut + b * cout * plane, xb = x + (b * cin + channels.lowerBound) * inPlane
            pass.forEachProduct(within: 0..<geo.outH) { j, rect, block, n in
                let (dy, lddy) = rectOperand(
                    gy, plane: plane, planeW: ow, channels: cout, rect: rect, block: block, shifted: false,
                    wholeRows: rect.writesWholeOutputRows(geo), scratch: tapProductScratch, worker: t)
                let (xs, ldx) = rectOperand(
                    xb, plane: inPlane, planeW: geo.inW, channels: channels.count, rect: rect, block: block,
                    shifted: true, wholeRows: rect.readsWholeInputRows(geo), scratch: im2colScratch, worker: t)
                let first = b == 0 && block.lowerBound == rect.rows.lowerBound
                sgemm(
                    transB: true, m: cout, n: channels.count, k: n, a: dy, lda: lddy, b: xs, ldb: ldx,
                    beta: first ? 0 : 1,
                    c: gwt + j * cout * cin + channels.lowerBound, ldc: cin)
            }
        }
    }
    // Back to Cout x Cin x kH x kW; taps on padding only get zero.
    gradWeight.update(repeating: 0, count: cout * cin * all)
    parallelBlocks(cout) { r in
        for co in r {
            for (j, rect) in rects.enumerated() {
                let src = gwt + (j * cout + co) * cin, dst = gradWeight + co * cin * all + rect.tap
                for ci in 0..<cin { dst[ci * all] = src[ci] }
            }
        }
    }
}
