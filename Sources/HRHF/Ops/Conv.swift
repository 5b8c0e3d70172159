import Foundation

// 2-D convolution (PyTorch's conv2d: cross-correlation, weight Cout x Cin/groups x kH x kW)
// as im2col + sgemm. 1x1 stride-1 unpadded convolutions multiply the input directly.
// Backward: dW = dY * col^T, dcol = W^T * dY then col2im; each is skipped when its input
// needs no gradient (model inversion asks for the image gradient only).

/// Geometry of one convolution.
public struct Conv2dGeometry: Hashable, Sendable {
    public var inChannels, outChannels, kernelH, kernelW: Int
    public var strideH, strideW, padH, padW, dilationH, dilationW, groups: Int
    public var inH, inW: Int

    public var outH: Int { (inH + 2 * padH - dilationH * (kernelH - 1) - 1) / strideH + 1 }
    public var outW: Int { (inW + 2 * padW - dilationW * (kernelW - 1) - 1) / strideW + 1 }
    var groupIn: Int { inChannels / groups }
    var groupOut: Int { outChannels / groups }
    var isPointwise: Bool {
        kernelH == 1 && kernelW == 1 && strideH == 1 && strideW == 1 && padH == 0 && padW == 0
    }
    /// Multiply-adds times two, for one image, that read the image: products with padding are
    /// not counted, whether a path skips them (dead taps, `runsPerTap`) or not (im2col's
    /// partly live taps), so rates compare the work any implementation must do.
    public var flopsPerImage: Double {
        2 * Double(outChannels) * Double(groupIn) * Double(imageReadingTapPositions)
    }

    /// The kernel taps (ki * kernelW + kj) that read at least one pixel inside the image. A
    /// dilated tap can fall in the padding for every output pixel (ASPP's rate 36 on a 32x32
    /// map keeps only the centre tap): its products with zeros are skipped.
    public var liveTaps: [Int] { tapRects.map(\.tap) }
}

/// The weight as the products see it: Cout x (Cin/groups * live taps). The weight itself when
/// every tap is live; otherwise a compact copy without the dead taps' columns.
struct LiveTapWeight {
    let taps: [Int]
    let pointer: UnsafePointer<Float>
    private let copy: UnsafeMutablePointer<Float>?

    init(_ weight: UnsafePointer<Float>, _ geo: Conv2dGeometry) {
        taps = geo.liveTaps
        let all = geo.kernelH * geo.kernelW
        if taps.count == all {
            copy = nil
            pointer = weight
        } else {
            let rows = geo.outChannels * geo.groupIn, l = taps.count
            let c = UnsafeMutablePointer<Float>.allocate(capacity: max(rows * l, 1))
            for r in 0..<rows { for (j, t) in taps.enumerated() { c[r * l + j] = weight[r * all + t] } }
            copy = c
            pointer = UnsafePointer(c)
        }
    }

    func release() { copy?.deallocate() }
}

/// Scratch memory reused across calls so the hot path does not allocate once warm.
final class ScratchBuffer: @unchecked Sendable {
    private var storage: UnsafeMutablePointer<Float>?
    private var capacity = 0
    private let lock = NSLock()

    /// A buffer of at least `count` floats, valid until the next call on this scratch.
    func get(_ count: Int) -> UnsafeMutablePointer<Float> {
        lock.lock()
        defer { lock.unlock() }
        if count > capacity {
            storage?.deallocate()
            storage = .allocate(capacity: count)
            capacity = count
        }
        return storage!
    }
}

/// One im2col scratch per worker of a convolution (convolutions run one at a time; each
/// worker of one uses its own).
final class WorkerScratch: @unchecked Sendable {
    private var buffers: [ScratchBuffer] = []
    private let lock = NSLock()

    func get(worker: Int, _ count: Int) -> UnsafeMutablePointer<Float> {
        lock.lock()
        while buffers.count <= worker { buffers.append(ScratchBuffer()) }
        let buffer = buffers[worker]
        lock.unlock()
        return buffer.get(count)
    }
}

let im2colScratch = WorkerScratch()

/// How large one worker's im2col-shaped block may be: `floats` (16 MB), but at least
/// `minColumns` output columns so each product stays wide enough that packing its other operand
/// is a small part of the work. ASPP's 3x3 over 2048 channels would otherwise need 75 MB per
/// worker for a 32x32 map; every other layer of DeepLab-ResNet fits whole. Variables so a test
/// can force many small blocks.
enum Im2colBlocking {
    nonisolated(unsafe) static var floats = 4 << 20
    nonisolated(unsafe) static var minColumns = 256
}

/// How many of `total` output columns one block of `rows` im2col rows covers.
func im2colBlockColumns(rows: Int, of total: Int) -> Int {
    min(total, max(Im2colBlocking.minColumns, Im2colBlocking.floats / max(rows, 1) / 16 * 16))
}

/// `columns` cut into consecutive blocks of at most `width`.
func blocks(of columns: Range<Int>, width: Int) -> [Range<Int>] {
    stride(from: columns.lowerBound, to: columns.upperBound, by: max(width, 1)).map {
        $0..<min($0 + width, columns.upperBound)
    }
}

/// Per-worker scratch of `im2col`'s phase planes.
let im2colPhaseScratch = WorkerScratch()

/// Fills rows `rows` and columns `columns` of the im2col matrix of one image and group (row
/// (c, j) for channel c and live tap taps[j], column oy * outW + ox) into `col`, a
/// rows.count x columns.count matrix. Output rows whose input row is padding are zeroed in one
/// run. Where output row oy reads one plane's row oy + shift (stride 1 on a map of the input's
/// width; stride 2 over whole maps, through the input split into its four phase planes: even or
/// odd rows by even or odd columns), each row of the matrix is one shifted copy of that plane
/// (rows of 16-64 columns copied one by one cost more in bookkeeping than in copying).
/// `worker` picks the phase planes' scratch.
func im2col(
    _ src: UnsafePointer<Float>, _ geo: Conv2dGeometry, taps: [Int], rows: Range<Int>, columns: Range<Int>,
    into col: UnsafeMutablePointer<Float>, worker: Int = 0
) {
    let (h, w, ow) = (geo.inH, geo.inW, geo.outW)
    let kw = geo.kernelW, l = taps.count, sw = geo.strideW
    let (lo, hi) = (columns.lowerBound, columns.upperBound)
    guard hi > lo, !rows.isEmpty else { return }
    let firstChannel = rows.lowerBound / l
    let phases =
        geo.strideH == 2 && sw == 2 && lo == 0 && hi == geo.outH * ow && (w + 1) / 2 == ow
        ? phasePlanes(src, geo, channels: firstChannel..<((rows.upperBound - 1) / l + 1), worker: worker) : nil
    let (ph, pw) = ((h + 1) / 2, (w + 1) / 2)
    for row in rows {
        let c = row / l, tap = taps[row % l], ki = tap / kw, kj = tap % kw
        // Positions p = oy * ow + ox of this row, at dst[p].
        let dst = col + (row - rows.lowerBound) * (hi - lo) - lo
        let liveRows = Conv2dGeometry.liveOutputs(
            ki, stride: geo.strideH, pad: geo.padH, dilation: geo.dilationH, inSize: h, outSize: geo.outH)
        let liveCols = Conv2dGeometry.liveOutputs(
            kj, stride: sw, pad: geo.padW, dilation: geo.dilationW, inSize: w, outSize: ow)
        let liveLo = min(max(lo, liveRows.lowerBound * ow), hi), liveHi = max(min(hi, liveRows.upperBound * ow), liveLo)
        if liveLo > lo { (dst + lo).update(repeating: 0, count: liveLo - lo) }
        if hi > liveHi { (dst + liveHi).update(repeating: 0, count: hi - liveHi) }
        guard liveHi > liveLo else { continue }
        let dy = ki * geo.dilationH - geo.padH, dx = kj * geo.dilationW - geo.padW
        let channel = src + c * h * w
        let (cLo, cHi) = (liveCols.lowerBound, liveCols.upperBound)
        if cLo < cHi, let phases {
            // Input (2 oy + dy, 2 ox + dx) is phase (dy & 1, dx & 1)'s (oy + dy >> 1, ox + dx >> 1).
            let plane = phases + ((c - firstChannel) * 4 + (dy & 1) * 2 + (dx & 1)) * ph * pw
            shiftedCopy(
                plane, count: ph * pw, shift: (dy >> 1) * pw + (dx >> 1), ow: ow, live: liveLo..<liveHi,
                liveCols: liveCols, into: dst)
        } else if geo.strideH == 1 && sw == 1 && w == ow && cLo < cHi {
            shiftedCopy(
                channel, count: h * w, shift: dy * w + dx, ow: ow, live: liveLo..<liveHi, liveCols: liveCols, into: dst)
        } else {
            for oy in (liveLo / ow)...((liveHi - 1) / ow) {
                let base = oy &* ow
                let first = max(liveLo, base) &- base, last = min(liveHi, base &+ ow) &- base
                let drow = dst + base
                let copyLo = min(max(first, cLo), last), copyHi = max(min(last, cHi), copyLo)
                for ox in first..<copyLo { drow[ox] = 0 }
                for ox in copyHi..<last { drow[ox] = 0 }
                let srow = channel + ((oy &* geo.strideH &+ dy) &* w &+ dx)
                if sw == 1 {
                    for ox in copyLo..<copyHi { drow[ox] = srow[ox] }
                } else {
                    for ox in copyLo..<copyHi { drow[ox] = srow[ox &* sw] }
                }
            }
        }
    }
}

/// The four phase planes of each of `channels` (plane (c, py, px) holds input (2y + py, 2x + px),
/// zero past the edge of an odd-sized map), channel after channel, in the worker's scratch.
private func phasePlanes(
    _ src: UnsafePointer<Float>, _ geo: Conv2dGeometry, channels: Range<Int>, worker: Int
) -> UnsafePointer<Float> {
    let (h, w) = (geo.inH, geo.inW), (ph, pw) = ((geo.inH + 1) / 2, (geo.inW + 1) / 2)
    let planes = im2colPhaseScratch.get(worker: worker, channels.count * 4 * ph * pw)
    for (i, c) in channels.enumerated() {
        let channel = src + c * h * w
        for phase in 0..<4 {
            let (py, px) = (phase / 2, phase % 2), plane = planes + (i * 4 + phase) * ph * pw
            for y in 0..<ph {
                let d = plane + y * pw, iy = 2 * y + py
                guard iy < h else {
                    d.update(repeating: 0, count: pw)
                    continue
                }
                let s = channel + iy * w + px
                let inside = (w - px + 1) / 2
                for x in 0..<inside { d[x] = s[2 &* x] }
                for x in inside..<pw { d[x] = 0 }
            }
        }
    }
    return UnsafePointer(planes)
}

/// dst[p] = plane[p + shift] for p in `live` (one copy, clipped to the plane's `count`), then
/// the positions whose column ox = p % ow lies outside `liveCols` (they read padding; the copy
/// wrapped them into neighbouring rows) cleared.
@inline(__always)
private func shiftedCopy(
    _ plane: UnsafePointer<Float>, count: Int, shift: Int, ow: Int, live: Range<Int>, liveCols: Range<Int>,
    into dst: UnsafeMutablePointer<Float>
) {
    let first = max(live.lowerBound, -shift), last = min(live.upperBound, count - shift)
    if last > first { (dst + first).update(from: plane + (first + shift), count: last - first) }
    guard liveCols.lowerBound > 0 || liveCols.upperBound < ow else { return }
    for oy in (live.lowerBound / ow)...((live.upperBound - 1) / ow) {
        let base = oy &* ow
        clear(dst, max(live.lowerBound, base), min(live.upperBound, base &+ liveCols.lowerBound))
        clear(dst, max(live.lowerBound, base &+ liveCols.upperBound), min(live.upperBound, base &+ ow))
    }
}

/// Zeroes p[from..<to] (nothing when to <= from): a few elements, inline.
@inline(__always)
private func clear(_ p: UnsafeMutablePointer<Float>, _ from: Int, _ to: Int) {
    var i = from
    while i < to {
        p[i] = 0
        i &+= 1
    }
}

/// Adds rows of an im2col-shaped gradient (those of channels `channels`, `col` starting at the
/// first of them; one row per live tap, each covering output rows `outRows`) back into the
/// input gradient of one image and group. At stride 1 on a map of the input's width each row is
/// added as one shifted run, after its entries at columns that read padding are set to zero in
/// `col` (they wrap into neighbouring rows and add nothing there).
func col2im(
    _ col: UnsafeMutablePointer<Float>, _ geo: Conv2dGeometry, taps: [Int], channels: Range<Int>,
    outRows: Range<Int>, into dst: UnsafeMutablePointer<Float>
) {
    let (h, w, ow) = (geo.inH, geo.inW, geo.outW)
    let kw = geo.kernelW, l = taps.count
    let width = outRows.count * ow
    let shiftedRuns = geo.strideH == 1 && geo.strideW == 1 && w == ow
    for c in channels {
        let channel = dst + c * h * w
        for (j, tap) in taps.enumerated() {
            let ki = tap / kw, kj = tap % kw
            let src = col + ((c - channels.lowerBound) * l + j) * width - outRows.lowerBound * ow
            let xOffset = kj * geo.dilationW - geo.padW
            let oxLo = max(0, (-xOffset + geo.strideW - 1) / geo.strideW)
            let oxHi = min(ow, (w - 1 - xOffset) >= 0 ? (w - 1 - xOffset) / geo.strideW + 1 : 0)
            if oxLo >= oxHi { continue }
            if shiftedRuns {
                let liveRows = Conv2dGeometry.liveOutputs(
                    ki, stride: 1, pad: geo.padH, dilation: geo.dilationH, inSize: h, outSize: geo.outH)
                let rowLo = max(outRows.lowerBound, liveRows.lowerBound)
                let rowHi = min(outRows.upperBound, liveRows.upperBound)
                guard rowLo < rowHi else { continue }
                if oxLo > 0 || oxHi < ow {
                    for oy in rowLo..<rowHi {
                        clear(src, oy &* ow, oy &* ow &+ oxLo)
                        clear(src, oy &* ow &+ oxHi, (oy &+ 1) &* ow)
                    }
                }
                let shift = (ki * geo.dilationH - geo.padH) * w + xOffset
                let first = max(rowLo * ow, -shift), last = min(rowHi * ow, h * w - shift)
                let d = channel + shift
                for p in first..<max(first, last) { d[p] += src[p] }
                continue
            }
            for oy in outRows {
                let iy = oy * geo.strideH - geo.padH + ki * geo.dilationH
                if iy < 0 || iy >= h { continue }
                let srow = src + oy * ow
                let drow = channel + iy * w + xOffset
                if geo.strideW == 1 {
                    for ox in oxLo..<oxHi { drow[ox] += srow[ox] }
                } else {
                    for ox in oxLo..<oxHi { drow[ox * geo.strideW] += srow[ox] }
                }
            }
        }
    }
}

/// Splits `count` items into `parts` contiguous ranges and runs body(worker, range) on each in
/// parallel. The split depends only on the thread count, so runs repeat bit for bit.
func forEachWorker(_ count: Int, parts: Int, _ body: (Int, Range<Int>) -> Void) {
    let parts = max(1, min(parts, count))
    if parts == 1 {
        body(0, 0..<count)
        return
    }
    let base = count / parts, extra = count % parts
    DispatchQueue.concurrentPerform(iterations: parts) { t in
        let start = t * base + min(t, extra)
        body(t, start..<(start + base + (t < extra ? 1 : 0)))
    }
}

/// PyTorch's `F.conv2d(x, weight, bias, stride, padding, dilation, groups)`.
public func conv2d(
    _ x: Tensor, weight: Tensor, bias: Tensor? = nil, stride: (Int, Int) = (1, 1),
    padding: (Int, Int) = (0, 0), dilation: (Int, Int) = (1, 1), groups: Int = 1
) -> Tensor {
    let (n, cin, h, w) = nchw(x, "conv2d")
    precondition(weight.rank == 4, "conv2d weight must be Cout x Cin/groups x kH x kW, got \(weight.shape)")
    let cout = weight.shape[0]
    precondition(
        groups >= 1 && cin % groups == 0 && cout % groups == 0,
        "conv2d: channels \(cin) -> \(cout) not divisible by groups \(groups)")
    precondition(
        weight.shape[1] == cin / groups,
        "conv2d: weight \(weight.shape) expects \(weight.shape[1] * groups) input channels, got \(cin)")
    if let bias { precondition(bias.shape == [cout], "conv2d: bias \(bias.shape) for \(cout) outputs") }
    let geo = Conv2dGeometry(
        inChannels: cin, outChannels: cout, kernelH: weight.shape[2], kernelW: weight.shape[3],
        strideH: stride.0, strideW: stride.1, padH: padding.0, padW: padding.1,
        dilationH: dilation.0, dilationW: dilation.1, groups: groups, inH: h, inW: w)
    precondition(geo.outH > 0 && geo.outW > 0, "conv2d: input \(h)x\(w) too small for the kernel")
    let out = Tensor(uninitialized: [n, cout, geo.outH, geo.outW])
    Profiler.convolutionPass(.forward, geo, batch: n) {
        conv2dForward(x.pointer, weight.pointer, bias?.pointer, geo, batch: n, out: out.pointer)
    }

    let xd = x.detached(), wd = weight.detached()
    var inputs = [x, weight]
    if let bias { inputs.append(bias) }
    record(out, "conv2d", inputs) { g in
        var grads: [Tensor?] = [nil, nil]
        if x.requiresGrad {
            let gx = Tensor(uninitialized: xd.shape)
            Profiler.convolutionPass(.inputGradient, geo, batch: n) {
                conv2dBackwardInput(g.pointer, wd.pointer, geo, batch: n, gradInput: gx.pointer)
            }
            grads[0] = gx
        }
        if weight.requiresGrad {
            let gw = Tensor(uninitialized: wd.shape)
            Profiler.convolutionPass(.weightGradient, geo, batch: n) {
                conv2dBackwardWeight(g.pointer, xd.pointer, geo, batch: n, gradWeight: gw.pointer)
            }
            grads[1] = gw
        }
        if let bias {
            grads.append(bias.requiresGrad ? channelSums(g) : nil)
        }
        return grads
    }
    return out
}

/// An evaluation-mode convolution block as one op: conv2d, then batch norm with fixed
/// statistics folded into a per-channel `scale` and `shift` (conv bias included), then an
/// optional leaky ReLU (`negativeSlope` 0: ReLU). The normalisation and activation run on each
/// output block while it is in cache, and the backward scales the incoming gradient in one
/// pass. Only the input can get a gradient: the weights must be frozen (evaluation, inversion).
public func conv2dAffine(
    _ x: Tensor, weight: Tensor, scale: Tensor, shift: Tensor, negativeSlope: Float?,
    stride: (Int, Int) = (1, 1), padding: (Int, Int) = (0, 0), dilation: (Int, Int) = (1, 1),
    groups: Int = 1
) -> Tensor {
    let (n, cin, h, w) = nchw(x, "conv2d_affine")
    precondition(
        weight.rank == 4 && weight.shape[1] * groups == cin && cin % groups == 0 && weight.shape[0] % groups == 0,
        "conv2d_affine: weight \(weight.shape) with \(groups) groups for \(cin) input channels")
    let cout = weight.shape[0]
    precondition(
        scale.shape == [cout] && shift.shape == [cout],
        "conv2d_affine: scale \(scale.shape), shift \(shift.shape) for \(cout) outputs")
    precondition(
        !GradMode.isEnabled || !(weight.requiresGrad || scale.requiresGrad || shift.requiresGrad),
        "conv2d_affine: the weights must be frozen (only the input gets a gradient)")
    let geo = Conv2dGeometry(
        inChannels: cin, outChannels: cout, kernelH: weight.shape[2], kernelW: weight.shape[3],
        strideH: stride.0, strideW: stride.1, padH: padding.0, padW: padding.1,
        dilationH: dilation.0, dilationW: dilation.1, groups: groups, inH: h, inW: w)
    precondition(geo.outH > 0 && geo.outW > 0, "conv2d_affine: input \(h)x\(w) too small for the kernel")
    let out = Tensor(uninitialized: [n, cout, geo.outH, geo.outW])
    Profiler.convolutionPass(.forward, geo, batch: n) {
        conv2dForward(
            x.pointer, weight.pointer,
            epilogue: ConvEpilogue(scale: scale.pointer, shift: shift.pointer, negativeSlope: negativeSlope),
            geo, batch: n, out: out.pointer)
    }
    let xd = x.detached(), wd = weight.detached(), od = out.detached(), sd = scale.detached()
    record(out, "conv2d_affine", [x]) { g in
        // Through the activation (its sign is the output's: slope >= 0) and the scale, then the convolution.
        let plane = geo.outH * geo.outW
        let gs = Tensor(zeros: g.shape)
        let pg = g.pointer, po = od.pointer, pgs = gs.pointer, ps = sd.pointer
        parallelBlocks(n * cout) { r in
            for nc in r {
                let a = ps[nc % cout], base = nc * plane
                if let slope = negativeSlope {
                    for i in base..<(base + plane) { pgs[i] = pg[i] * (po[i] > 0 ? a : a * slope) }
                } else {
                    for i in base..<(base + plane) { pgs[i] = pg[i] * a }
                }
            }
        }
        let gx = Tensor(uninitialized: xd.shape)
        Profiler.convolutionPass(.inputGradient, geo, batch: n) {
            conv2dBackwardInput(gs.pointer, wd.pointer, geo, batch: n, gradInput: gx.pointer)
        }
        return [gx]
    }
    return out
}

/// Per-channel sums of an NCHW tensor (the bias gradient).
func channelSums(_ g: Tensor) -> Tensor {
    let (n, c, h, w) = nchw(g, "channel sums")
    let out = Tensor(zeros: [c])
    let pg = g.pointer, po = out.pointer
    parallelBlocks(c) { r in
        for ch in r {
            var s = 0.0
            for b in 0..<n {
                let p = pg + (b * c + ch) * h * w
                var part: Float = 0
                for i in 0..<(h * w) { part += p[i] }
                s += Double(part)
            }
            po[ch] = Float(s)
        }
    }
    return out
}

/// How a convolution's work is split between workers: whole images when the batch divides
/// evenly among them (the largest products), otherwise each image's columns (forward) or input
/// channels (backward) among all of them.
func splitsByImage(batch: Int, workers: Int) -> Bool { workers > 1 && batch % workers == 0 }

/// Runs body(worker, image, share) over every image of the batch, `parts` items each (input
/// channels, output rows): whole images per worker when `splitsByImage`, else each image's
/// items split between the workers.
func forEachImageShare(batch: Int, parts: Int, _ body: (Int, Int, Range<Int>) -> Void) {
    let workers = ParallelConfig.threads
    if splitsByImage(batch: batch, workers: workers) {
        forEachWorker(batch, parts: workers) { t, images in for b in images { body(t, b, 0..<parts) } }
    } else {
        for b in 0..<batch { forEachWorker(parts, parts: workers) { t, share in body(t, b, share) } }
    }
}

/// What a convolution applies to each block of its output while the block is in cache: a
/// per-channel scale and shift (a bias; an evaluation-mode batch norm folded in) and an
/// optional leaky ReLU (slope 0: ReLU).
struct ConvEpilogue {
    var scale: UnsafePointer<Float>? = nil
    var shift: UnsafePointer<Float>? = nil
    var negativeSlope: Float? = nil

    static func bias(_ b: UnsafePointer<Float>?) -> ConvEpilogue { ConvEpilogue(shift: b) }

    var isIdentity: Bool { scale == nil && shift == nil && negativeSlope == nil }

    /// Applies the epilogue to `count` outputs of channel `channel` in place.
    @inline(__always)
    func apply(_ p: UnsafeMutablePointer<Float>, count: Int, channel: Int) {
        let a = scale?[channel] ?? 1, b = shift?[channel] ?? 0
        if let slope = negativeSlope {
            for i in 0..<count {
                let v = p[i] * a + b
                p[i] = v > 0 ? v : v * slope
            }
        } else if scale != nil {
            for i in 0..<count { p[i] = p[i] * a + b }
        } else if shift != nil {
            for i in 0..<count { p[i] += b }
        }
    }
}

func conv2dForward(
    _ x: UnsafePointer<Float>, _ weight: UnsafePointer<Float>, _ bias: UnsafePointer<Float>?,
    _ geo: Conv2dGeometry, batch: Int, out: UnsafeMutablePointer<Float>
) {
    conv2dForward(x, weight, epilogue: .bias(bias), geo, batch: batch, out: out)
}

/// Writes every element of `out` (the products run with beta 0: each worker's share of the output
/// is cleared inside its own product, in parallel, instead of before the op in one serial pass).
func conv2dForward(
    _ x: UnsafePointer<Float>, _ weight: UnsafePointer<Float>, epilogue: ConvEpilogue,
    _ geo: Conv2dGeometry, batch: Int, out: UnsafeMutablePointer<Float>
) {
    if geo.runsPerTap { return conv2dForwardPerTap(x, weight, epilogue: epilogue, geo, batch: batch, out: out) }
    let plane = geo.outH * geo.outW, inPlane = geo.inH * geo.inW
    let live = LiveTapWeight(weight, geo)
    defer { live.release() }
    let taps = live.taps, k = geo.groupIn * taps.count
    Profiler.convolution(flops: geo.flopsPerImage * Double(batch))
    guard k > 0 else {
        // Every tap reads padding only: the output is the epilogue of zero.
        out.update(repeating: 0, count: batch * geo.outChannels * plane)
        for b in 0..<batch {
            for co in 0..<geo.outChannels {
                epilogue.apply(out + (b * geo.outChannels + co) * plane, count: plane, channel: co)
            }
        }
        return
    }
    // Output columns `columns` of image b, on worker t.
    func run(_ t: Int, _ b: Int, _ columns: Range<Int>) {
        let width = columns.count
        guard width > 0 else { return }
        let blockWidth = im2colBlockColumns(rows: k, of: width)
        let col = geo.isPointwise ? nil : im2colScratch.get(worker: t, k * blockWidth)
        for g in 0..<geo.groups {
            let src = x + (b * geo.inChannels + g * geo.groupIn) * inPlane
            let dst = out + (b * geo.outChannels + g * geo.groupOut) * plane
            let wg = live.pointer + g * geo.groupOut * k
            if let col {
                for block in blocks(of: columns, width: blockWidth) {
                    im2col(src, geo, taps: taps, rows: 0..<k, columns: block, into: col, worker: t)
                    sgemm(
                        m: geo.groupOut, n: block.count, k: k, a: wg, lda: k, b: col, ldb: block.count, beta: 0,
                        c: dst + block.lowerBound, ldc: plane)
                }
            } else {
                sgemm(
                    m: geo.groupOut, n: width, k: k, a: wg, lda: k, b: src + columns.lowerBound, ldb: plane, beta: 0,
                    c: dst + columns.lowerBound, ldc: plane)
            }
        }
        if !epilogue.isIdentity {
            for co in 0..<geo.outChannels {
                epilogue.apply(out + (b * geo.outChannels + co) * plane + columns.lowerBound, count: width, channel: co)
            }
        }
    }
    let workers = ParallelConfig.threads
    if splitsByImage(batch: batch, workers: workers) {
        forEachWorker(batch, parts: workers) { t, images in for b in images { run(t, b, 0..<plane) } }
    } else {
        // Column slices a multiple of 16 wide keep the products' panels aligned.
        let slices = max(1, min(workers, plane / 16))
        for b in 0..<batch {
            forEachWorker(slices, parts: slices) { t, _ in
                let per = (plane / slices + 15) / 16 * 16
                let lo = min(plane, t * per), hi = t == slices - 1 ? plane : min(plane, (t + 1) * per)
                run(t, b, lo..<hi)
            }
        }
    }
}

/// Writes every element of `gradInput` (each worker clears its share, in parallel, then adds to it).
func conv2dBackwardInput(
    _ gradOut: UnsafePointer<Float>, _ weight: UnsafePointer<Float>, _ geo: Conv2dGeometry,
    batch: Int, gradInput: UnsafeMutablePointer<Float>
) {
    if geo.runsPerTap { return conv2dBackwardInputPerTap(gradOut, weight, geo, batch: batch, gradInput: gradInput) }
    let plane = geo.outH * geo.outW, inPlane = geo.inH * geo.inW
    let live = LiveTapWeight(weight, geo)
    defer { live.release() }
    let taps = live.taps, k = geo.groupIn * taps.count
    Profiler.convolution(flops: geo.flopsPerImage * Double(batch))
    guard k > 0 else {
        // No tap reads the image: its gradient is zero.
        gradInput.update(repeating: 0, count: batch * geo.inChannels * inPlane)
        return
    }
    // The input-gradient channels `channels` of image b: dcol = W^T dY on those rows, then col2im.
    func run(_ t: Int, _ b: Int, _ channels: Range<Int>) {
        let rows = channels.count * taps.count
        // Blocks of whole output rows, so col2im walks rows as it does for the whole map.
        let blockRows = max(1, im2colBlockColumns(rows: rows, of: plane) / geo.outW)
        let col = geo.isPointwise ? nil : im2colScratch.get(worker: t, rows * blockRows * geo.outW)
        for g in 0..<geo.groups {
            let gy = gradOut + (b * geo.outChannels + g * geo.groupOut) * plane
            let wg = live.pointer + g * geo.groupOut * k + channels.lowerBound * taps.count
            let gx = gradInput + (b * geo.inChannels + g * geo.groupIn) * inPlane
            (gx + channels.lowerBound * inPlane).update(repeating: 0, count: channels.count * inPlane)
            if let col {
                for outRows in blocks(of: 0..<geo.outH, width: blockRows) {
                    let width = outRows.count * geo.outW
                    sgemm(
                        transA: true, m: rows, n: width, k: geo.groupOut, a: wg, lda: k,
                        b: gy + outRows.lowerBound * geo.outW,
                        ldb: plane, c: col, ldc: width)
                    col2im(col, geo, taps: taps, channels: channels, outRows: outRows, into: gx)
                }
            } else {
                sgemm(
                    transA: true, m: rows, n: plane, k: geo.groupOut, a: wg, lda: k, b: gy, ldb: plane, beta: 1,
                    c: gx + channels.lowerBound * inPlane, ldc: plane)
            }
        }
    }
    forEachImageShare(batch: batch, parts: geo.groupIn, run)
}

/// Writes every element of `gradWeight`.
func conv2dBackwardWeight(
    _ gradOut: UnsafePointer<Float>, _ x: UnsafePointer<Float>, _ geo: Conv2dGeometry,
    batch: Int, gradWeight: UnsafeMutablePointer<Float>
) {
    if geo.runsPerTap { return conv2dBackwardWeightPerTap(gradOut, x, geo, batch: batch, gradWeight: gradWeight) }
    let plane = geo.outH * geo.outW, inPlane = geo.inH * geo.inW
    let taps = geo.liveTaps, all = geo.kernelH * geo.kernelW
    let k = geo.groupIn * taps.count
    let compact = taps.count < all
    // Dead taps read only padding: their gradient is zero. The live ones go through a compact
    // Cout x (Cin/groups * live taps) matrix, scattered back at the end.
    let target = compact ? UnsafeMutablePointer<Float>.allocate(capacity: max(geo.outChannels * k, 1)) : gradWeight
    defer { if compact { target.deallocate() } }
    Profiler.convolution(flops: geo.flopsPerImage * Double(batch))
    // Each worker owns the columns of dW of its input channels, summed over the batch in order
    // (so the result does not depend on how images would be split).
    if k > 0 {
        forEachWorker(geo.groupIn, parts: ParallelConfig.threads) { t, channels in
            let rows = channels.count * taps.count
            let blockWidth = im2colBlockColumns(rows: rows, of: plane)
            let col = geo.isPointwise ? nil : im2colScratch.get(worker: t, rows * blockWidth)
            for b in 0..<batch {
                for g in 0..<geo.groups {
                    let gy = gradOut + (b * geo.outChannels + g * geo.groupOut) * plane
                    let src = x + (b * geo.inChannels + g * geo.groupIn) * inPlane
                    let gw = target + g * geo.groupOut * k + channels.lowerBound * taps.count
                    if let col {
                        // dW accumulates over the blocks of columns as over the images.
                        for block in blocks(of: 0..<plane, width: blockWidth) {
                            im2col(
                                src, geo, taps: taps,
                                rows: (channels.lowerBound * taps.count)..<(channels.upperBound * taps.count),
                                columns: block, into: col, worker: t)
                            sgemm(
                                transB: true, m: geo.groupOut, n: rows, k: block.count, a: gy + block.lowerBound,
                                lda: plane,
                                b: col, ldb: block.count, beta: b == 0 && block.lowerBound == 0 ? 0 : 1, c: gw, ldc: k)
                        }
                    } else {
                        sgemm(
                            transB: true, m: geo.groupOut, n: rows, k: plane, a: gy, lda: plane,
                            b: src + channels.lowerBound * inPlane,
                            ldb: plane, beta: b == 0 ? 0 : 1, c: gw, ldc: k)
                    }
                }
            }
        }
    }
    if compact {
        gradWeight.update(repeating: 0, count: geo.outChannels * geo.groupIn * all)
        for r in 0..<(geo.outChannels * geo.groupIn) {
            for (j, t) in taps.enumerated() { gradWeight[r * all + t] = target[r * taps.count + j] }
        }
    }
}
