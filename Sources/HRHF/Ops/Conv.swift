import COpenBLAS
import Foundation

// 2-D convolution (PyTorch's conv2d: cross-correlation, weight Cout x Cin/groups x kH x kW)
// as im2col + sgemm. 1x1 stride-1 unpadded convolutions multiply the input directly.
// Backward: dW = dY * col^T, dcol = W^T * dY then col2im; each is skipped when its input
// needs no gradient (model inversion asks for the image gradient only).

/// C = alpha * op(A) * op(B) + beta * C, row-major, on OpenBLAS's own threads.
@inline(__always)
func sgemm(transA: Bool = false, transB: Bool = false, m: Int, n: Int, k: Int, alpha: Float = 1,
           a: UnsafePointer<Float>, lda: Int, b: UnsafePointer<Float>, ldb: Int, beta: Float = 0,
           c: UnsafeMutablePointer<Float>, ldc: Int) {
    cblas_sgemm(CblasRowMajor, transA ? CblasTrans : CblasNoTrans, transB ? CblasTrans : CblasNoTrans,
                blasint(m), blasint(n), blasint(k), alpha, a, blasint(lda), b, blasint(ldb), beta,
                c, blasint(ldc))
}

/// Geometry of one convolution.
public struct Conv2dGeometry: Equatable, Sendable {
    public var inChannels, outChannels, kernelH, kernelW: Int
    public var strideH, strideW, padH, padW, dilationH, dilationW, groups: Int
    public var inH, inW: Int

    public var outH: Int { (inH + 2 * padH - dilationH * (kernelH - 1) - 1) / strideH + 1 }
    public var outW: Int { (inW + 2 * padW - dilationW * (kernelW - 1) - 1) / strideW + 1 }
    var groupIn: Int { inChannels / groups }
    var groupOut: Int { outChannels / groups }
    /// Rows of the im2col matrix of one group.
    var colRows: Int { groupIn * kernelH * kernelW }
    var isPointwise: Bool {
        kernelH == 1 && kernelW == 1 && strideH == 1 && strideW == 1 && padH == 0 && padW == 0
    }
    /// Multiply-adds times two, for one image.
    public var flopsPerImage: Double {
        2 * Double(outChannels) * Double(colRows) * Double(outH * outW)
    }
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

/// Convolutions run one at a time (parallelism is inside them), so one scratch per role.
let im2colScratch = ScratchBuffer()

/// Fills the im2col matrix of one image and group: row (c, ki, kj), column (oy, ox).
func im2col(_ src: UnsafePointer<Float>, _ geo: Conv2dGeometry, into col: UnsafeMutablePointer<Float>) {
    let (h, w, oh, ow) = (geo.inH, geo.inW, geo.outH, geo.outW)
    let (kh, kw) = (geo.kernelH, geo.kernelW)
    let plane = oh * ow
    parallelBlocks(geo.colRows, minBlock: max(1, 4096 / max(plane, 1))) { rows in
        for row in rows {
            let c = row / (kh * kw), ki = (row / kw) % kh, kj = row % kw
            let channel = src + c * h * w
            let dst = col + row * plane
            let xOffset = kj * geo.dilationW - geo.padW
            // Output columns whose input column lies inside the image.
            let oxLo = max(0, (-xOffset + geo.strideW - 1) / geo.strideW)
            let oxHi = min(ow, (w - 1 - xOffset) >= 0 ? (w - 1 - xOffset) / geo.strideW + 1 : 0)
            for oy in 0..<oh {
                let iy = oy * geo.strideH - geo.padH + ki * geo.dilationH
                let drow = dst + oy * ow
                if iy < 0 || iy >= h || oxLo >= oxHi {
                    drow.update(repeating: 0, count: ow)
                    continue
                }
                if oxLo > 0 { drow.update(repeating: 0, count: oxLo) }
                if oxHi < ow { (drow + oxHi).update(repeating: 0, count: ow - oxHi) }
                let srow = channel + iy * w + xOffset
                if geo.strideW == 1 {
                    (drow + oxLo).update(from: srow + oxLo, count: oxHi - oxLo)
                } else {
                    for ox in oxLo..<oxHi { drow[ox] = srow[ox * geo.strideW] }
                }
            }
        }
    }
}

/// Adds the im2col-shaped gradient of one image and group back into the input gradient.
/// Parallel over channels: each channel's rows touch only that channel.
func col2im(_ col: UnsafePointer<Float>, _ geo: Conv2dGeometry, into dst: UnsafeMutablePointer<Float>) {
    let (h, w, oh, ow) = (geo.inH, geo.inW, geo.outH, geo.outW)
    let (kh, kw) = (geo.kernelH, geo.kernelW)
    let plane = oh * ow
    parallelBlocks(geo.groupIn) { channels in
        for c in channels {
            let channel = dst + c * h * w
            for ki in 0..<kh {
                for kj in 0..<kw {
                    let src = col + ((c * kh + ki) * kw + kj) * plane
                    let xOffset = kj * geo.dilationW - geo.padW
                    let oxLo = max(0, (-xOffset + geo.strideW - 1) / geo.strideW)
                    let oxHi = min(ow, (w - 1 - xOffset) >= 0 ? (w - 1 - xOffset) / geo.strideW + 1 : 0)
                    if oxLo >= oxHi { continue }
                    for oy in 0..<oh {
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
    }
}

/// PyTorch's `F.conv2d(x, weight, bias, stride, padding, dilation, groups)`.
public func conv2d(_ x: Tensor, weight: Tensor, bias: Tensor? = nil, stride: (Int, Int) = (1, 1),
                   padding: (Int, Int) = (0, 0), dilation: (Int, Int) = (1, 1), groups: Int = 1) -> Tensor {
    let (n, cin, h, w) = nchw(x, "conv2d")
    precondition(weight.rank == 4, "conv2d weight must be Cout x Cin/groups x kH x kW, got \(weight.shape)")
    let cout = weight.shape[0]
    precondition(groups >= 1 && cin % groups == 0 && cout % groups == 0,
                 "conv2d: channels \(cin) -> \(cout) not divisible by groups \(groups)")
    precondition(weight.shape[1] == cin / groups,
                 "conv2d: weight \(weight.shape) expects \(weight.shape[1] * groups) input channels, got \(cin)")
    if let bias { precondition(bias.shape == [cout], "conv2d: bias \(bias.shape) for \(cout) outputs") }
    let geo = Conv2dGeometry(inChannels: cin, outChannels: cout, kernelH: weight.shape[2], kernelW: weight.shape[3],
                             strideH: stride.0, strideW: stride.1, padH: padding.0, padW: padding.1,
                             dilationH: dilation.0, dilationW: dilation.1, groups: groups, inH: h, inW: w)
    precondition(geo.outH > 0 && geo.outW > 0, "conv2d: input \(h)x\(w) too small for the kernel")
    let out = Tensor(zeros: [n, cout, geo.outH, geo.outW])
    conv2dForward(x.pointer, weight.pointer, bias?.pointer, geo, batch: n, out: out.pointer)

    let xd = x.detached(), wd = weight.detached()
    var inputs = [x, weight]
    if let bias { inputs.append(bias) }
    record(out, "conv2d", inputs) { g in
        var grads: [Tensor?] = [nil, nil]
        if x.requiresGrad {
            let gx = Tensor(zeros: xd.shape)
            conv2dBackwardInput(g.pointer, wd.pointer, geo, batch: n, gradInput: gx.pointer)
            grads[0] = gx
        }
        if weight.requiresGrad {
            let gw = Tensor(zeros: wd.shape)
            conv2dBackwardWeight(g.pointer, xd.pointer, geo, batch: n, gradWeight: gw.pointer)
            grads[1] = gw
        }
        if let bias {
            grads.append(bias.requiresGrad ? channelSums(g) : nil)
        }
        return grads
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

func conv2dForward(_ x: UnsafePointer<Float>, _ weight: UnsafePointer<Float>, _ bias: UnsafePointer<Float>?,
                   _ geo: Conv2dGeometry, batch: Int, out: UnsafeMutablePointer<Float>) {
    let plane = geo.outH * geo.outW, inPlane = geo.inH * geo.inW
    let k = geo.colRows
    FlopCounter.flops += geo.flopsPerImage * Double(batch)
    let col = geo.isPointwise ? nil : im2colScratch.get(k * plane)
    for b in 0..<batch {
        for g in 0..<geo.groups {
            let src = x + (b * geo.inChannels + g * geo.groupIn) * inPlane
            let dst = out + (b * geo.outChannels + g * geo.groupOut) * plane
            let wg = weight + g * geo.groupOut * k
            if let col {
                im2col(src, geo, into: col)
                sgemm(m: geo.groupOut, n: plane, k: k, a: wg, lda: k, b: col, ldb: plane, c: dst, ldc: plane)
            } else {
                sgemm(m: geo.groupOut, n: plane, k: k, a: wg, lda: k, b: src, ldb: plane, c: dst, ldc: plane)
            }
        }
        if let bias {
            let base = out + b * geo.outChannels * plane
            parallelBlocks(geo.outChannels, minBlock: max(1, parallelGrain / max(plane, 1))) { r in
                for co in r {
                    let p = base + co * plane, v = bias[co]
                    for i in 0..<plane { p[i] += v }
                }
            }
        }
    }
}

func conv2dBackwardInput(_ gradOut: UnsafePointer<Float>, _ weight: UnsafePointer<Float>, _ geo: Conv2dGeometry,
                         batch: Int, gradInput: UnsafeMutablePointer<Float>) {
    let plane = geo.outH * geo.outW, inPlane = geo.inH * geo.inW
    let k = geo.colRows
    FlopCounter.flops += geo.flopsPerImage * Double(batch)
    let col = geo.isPointwise ? nil : im2colScratch.get(k * plane)
    for b in 0..<batch {
        for g in 0..<geo.groups {
            let gy = gradOut + (b * geo.outChannels + g * geo.groupOut) * plane
            let wg = weight + g * geo.groupOut * k
            let gx = gradInput + (b * geo.inChannels + g * geo.groupIn) * inPlane
            if let col {
                sgemm(transA: true, m: k, n: plane, k: geo.groupOut, a: wg, lda: k, b: gy, ldb: plane,
                      c: col, ldc: plane)
                col2im(col, geo, into: gx)
            } else {
                sgemm(transA: true, m: k, n: plane, k: geo.groupOut, a: wg, lda: k, b: gy, ldb: plane,
                      c: gx, ldc: plane)
            }
        }
    }
}

func conv2dBackwardWeight(_ gradOut: UnsafePointer<Float>, _ x: UnsafePointer<Float>, _ geo: Conv2dGeometry,
                          batch: Int, gradWeight: UnsafeMutablePointer<Float>) {
    let plane = geo.outH * geo.outW, inPlane = geo.inH * geo.inW
    let k = geo.colRows
    FlopCounter.flops += geo.flopsPerImage * Double(batch)
    let col = geo.isPointwise ? nil : im2colScratch.get(k * plane)
    for b in 0..<batch {
        for g in 0..<geo.groups {
            let gy = gradOut + (b * geo.outChannels + g * geo.groupOut) * plane
            let src = x + (b * geo.inChannels + g * geo.groupIn) * inPlane
            let gw = gradWeight + g * geo.groupOut * k
            let colOrInput: UnsafePointer<Float>
            if let col {
                im2col(src, geo, into: col)
                colOrInput = UnsafePointer(col)
            } else {
                colOrInput = src
            }
            sgemm(transB: true, m: geo.groupOut, n: k, k: plane, a: gy, lda: plane, b: colOrInput, ldb: plane,
                  beta: b == 0 ? 0 : 1, c: gw, ldc: k)
        }
    }
}
