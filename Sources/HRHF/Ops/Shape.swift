import Foundation

// Reshape (a view), channel concatenation and slicing, spatial roll and flip.

/// The same values under another shape (shares memory, like `view`). One dimension may be -1.
public func reshape(_ x: Tensor, _ shape: [Int]) -> Tensor {
    var shape = shape
    if let free = shape.firstIndex(of: -1) {
        let known = shape.enumerated().filter { $0.offset != free }.reduce(1) { $0 * $1.element }
        shape[free] = known == 0 ? 0 : x.count / known
    }
    precondition(shape.reduce(1, *) == x.count, "cannot reshape \(x.shape) to \(shape)")
    let out = Tensor(shape: shape, storage: x.storage)
    let inShape = x.shape
    record(out, "reshape", [x]) { g in [Tensor(shape: inShape, storage: g.storage)] }
    return out
}

/// Copies `channels` planes per image between two NCHW-like layouts.
@inline(__always)
private func copyChannelBlock(
    from src: UnsafeMutablePointer<Float>, srcChannels: Int, srcOffset: Int,
    to dst: UnsafeMutablePointer<Float>, dstChannels: Int, dstOffset: Int,
    channels: Int, batch: Int, plane: Int
) {
    for n in 0..<batch {
        (dst + (n * dstChannels + dstOffset) * plane)
            .update(from: src + (n * srcChannels + srcOffset) * plane, count: channels * plane)
    }
}

/// Concatenation along the channel axis (dim 1) of tensors of equal other dimensions.
public func concatChannels(_ xs: [Tensor]) -> Tensor {
    precondition(!xs.isEmpty, "concat of no tensors")
    let first = xs[0].shape
    precondition(first.count >= 2, "concat along channels needs rank 2 or more")
    for x in xs {
        precondition(
            x.rank == first.count && x.shape[0] == first[0] && Array(x.shape[2...]) == Array(first[2...]),
            "concat: shapes \(xs.map(\.shape)) differ outside the channel axis")
    }
    let n = first[0], plane = first[2...].reduce(1, *)
    let total = xs.reduce(0) { $0 + $1.shape[1] }
    var shape = first
    shape[1] = total
    let out = Tensor(uninitialized: shape)
    var offset = 0
    for x in xs {
        copyChannelBlock(
            from: x.pointer, srcChannels: x.shape[1], srcOffset: 0, to: out.pointer,
            dstChannels: total, dstOffset: offset, channels: x.shape[1], batch: n, plane: plane)
        offset += x.shape[1]
    }
    let sizes = xs.map { $0.shape }
    record(out, "concat", xs) { g in
        var offset = 0
        return zip(xs, sizes).map { x, s in
            defer { offset += s[1] }
            guard x.requiresGrad else { return nil }
            let gx = Tensor(uninitialized: s)
            copyChannelBlock(
                from: g.pointer, srcChannels: total, srcOffset: offset, to: gx.pointer,
                dstChannels: s[1], dstOffset: 0, channels: s[1], batch: n, plane: plane)
            return gx
        }
    }
    return out
}

/// Channels `range` of every image (dim 1), copied.
public func sliceChannels(_ x: Tensor, _ range: Range<Int>) -> Tensor {
    precondition(
        x.rank >= 2 && range.lowerBound >= 0 && range.upperBound <= x.shape[1],
        "channel slice \(range) out of range for \(x.shape)")
    let n = x.shape[0], c = x.shape[1], plane = x.shape[2...].reduce(1, *)
    var shape = x.shape
    shape[1] = range.count
    let out = Tensor(uninitialized: shape)
    copyChannelBlock(
        from: x.pointer, srcChannels: c, srcOffset: range.lowerBound, to: out.pointer,
        dstChannels: range.count, dstOffset: 0, channels: range.count, batch: n, plane: plane)
    let inShape = x.shape
    record(out, "slice_channels", [x]) { g in
        let gx = Tensor(zeros: inShape)
        copyChannelBlock(
            from: g.pointer, srcChannels: range.count, srcOffset: 0, to: gx.pointer,
            dstChannels: c, dstOffset: range.lowerBound, channels: range.count, batch: n, plane: plane)
        return [gx]
    }
    return out
}

/// Images `range` of the batch (dim 0), copied.
public func sliceBatch(_ x: Tensor, _ range: Range<Int>) -> Tensor {
    precondition(range.lowerBound >= 0 && range.upperBound <= x.shape[0], "batch slice \(range) of \(x.shape)")
    let per = x.count / max(x.shape[0], 1)
    var shape = x.shape
    shape[0] = range.count
    let out = Tensor(uninitialized: shape)
    // A half batch of logits is ~10 MB: copied on every core.
    let source = x.pointer + range.lowerBound * per, target = out.pointer
    parallelBlocks(range.count * per, minBlock: parallelGrain) { r in
        (target + r.lowerBound).update(from: source + r.lowerBound, count: r.count)
    }
    recordRows(out, "slice_batch", of: x, rows: range)
    return out
}

/// Images `range` of `x` as a view of its memory, with `sliceBatch`'s gradient: for tensors the
/// caller only reads (a step's halves of the logits), it spares the copy. A write into either
/// shows in the other.
func batchView(_ x: Tensor, _ range: Range<Int>) -> Tensor {
    precondition(range.lowerBound >= 0 && range.upperBound <= x.shape[0], "batch view \(range) of \(x.shape)")
    let per = x.count / max(x.shape[0], 1)
    var shape = x.shape
    shape[0] = range.count
    let out = Tensor(
        shape: shape,
        storage: TensorStorage(viewing: x.storage, offset: range.lowerBound * per, count: range.count * per))
    recordRows(out, "batch_view", of: x, rows: range)
    return out
}

/// Concatenation along the batch axis (dim 0).
public func concatBatch(_ xs: [Tensor]) -> Tensor {
    precondition(!xs.isEmpty, "concat of no tensors")
    let inner = Array(xs[0].shape.dropFirst())
    precondition(xs.allSatisfy { Array($0.shape.dropFirst()) == inner }, "concatBatch: shapes \(xs.map(\.shape))")
    let out = Tensor(uninitialized: [xs.reduce(0) { $0 + $1.shape[0] }] + inner)
    var offset = 0
    for x in xs {
        (out.pointer + offset).update(from: x.pointer, count: x.count)
        offset += x.count
    }
    record(out, "concat_batch", xs) { g in
        var offset = 0
        return xs.map { x in
            defer { offset += x.count }
            guard x.requiresGrad else { return nil }
            let gx = Tensor(uninitialized: x.shape)
            gx.pointer.update(from: g.pointer + offset, count: x.count)
            return gx
        }
    }
    return out
}

/// Moves every plane of an NCHW tensor: out[h][w] = x[(h - dy) mod H][(w - dx) mod W]
/// (torch.roll(x, (dy, dx), dims=(2, 3))).
private func rollPlanes(_ x: Tensor, _ dy: Int, _ dx: Int) -> Tensor {
    let (n, c, h, w) = nchw(x, "roll")
    let out = Tensor(zeros: x.shape)
    let px = x.pointer, po = out.pointer
    let sy = ((dy % h) + h) % h, sx = ((dx % w) + w) % w
    parallelBlocks(n * c, minBlock: max(1, parallelGrain / max(h * w, 1))) { r in
        for p in r {
            let src = px + p * h * w, dst = po + p * h * w
            for y in 0..<h {
                let srow = src + ((y - sy + h) % h) * w, drow = dst + y * w
                // Two contiguous runs per row.
                (drow + sx).update(from: srow, count: w - sx)
                drow.update(from: srow + (w - sx), count: sx)
            }
        }
    }
    return out
}

/// torch.roll over the spatial axes of an NCHW tensor.
public func roll(_ x: Tensor, dy: Int, dx: Int) -> Tensor {
    let out = rollPlanes(x, dy, dx)
    record(out, "roll", [x]) { g in [rollPlanes(g, -dy, -dx)] }
    return out
}

private func flipPlanes(_ x: Tensor, horizontal: Bool) -> Tensor {
    let (n, c, h, w) = nchw(x, "flip")
    let out = Tensor(zeros: x.shape)
    let px = x.pointer, po = out.pointer
    parallelBlocks(n * c, minBlock: max(1, parallelGrain / max(h * w, 1))) { r in
        for p in r {
            let src = px + p * h * w, dst = po + p * h * w
            for y in 0..<h {
                if horizontal {
                    for xx in 0..<w { dst[y * w + xx] = src[y * w + (w - 1 - xx)] }
                } else {
                    (dst + y * w).update(from: src + (h - 1 - y) * w, count: w)
                }
            }
        }
    }
    return out
}

/// Mirror left-right (torch.flip(x, dims=[3])).
public func flipHorizontal(_ x: Tensor) -> Tensor {
    let out = flipPlanes(x, horizontal: true)
    record(out, "flip_w", [x]) { g in [flipPlanes(g, horizontal: true)] }
    return out
}

/// Mirror top-bottom (torch.flip(x, dims=[2])).
public func flipVertical(_ x: Tensor) -> Tensor {
    let out = flipPlanes(x, horizontal: false)
    record(out, "flip_h", [x]) { g in [flipPlanes(g, horizontal: false)] }
    return out
}

/// Rows `rows` and columns `columns` of every plane of an NCHW tensor (x[:, :, r0:r1, c0:c1]).
public func cropSpatial(_ x: Tensor, rows: Range<Int>, columns: Range<Int>) -> Tensor {
    let (n, c, h, w) = nchw(x, "crop")
    precondition(
        rows.lowerBound >= 0 && rows.upperBound <= h && columns.lowerBound >= 0 && columns.upperBound <= w,
        "crop \(rows) x \(columns) outside \(h) x \(w)")
    let oh = rows.count, ow = columns.count
    let out = Tensor(zeros: [n, c, oh, ow])
    let px = x.pointer, po = out.pointer
    parallelBlocks(n * c, minBlock: max(1, parallelGrain / max(oh * ow, 1))) { r in
        for p in r {
            for y in 0..<oh {
                (po + (p * oh + y) * ow).update(
                    from: px + (p * h + rows.lowerBound + y) * w + columns.lowerBound, count: ow)
            }
        }
    }
    record(out, "crop", [x]) { g in
        let gx = Tensor(zeros: [n, c, h, w])
        let pg = g.pointer, pgx = gx.pointer
        for p in 0..<(n * c) {
            for y in 0..<oh {
                (pgx + (p * h + rows.lowerBound + y) * w + columns.lowerBound).update(
                    from: pg + (p * oh + y) * ow, count: ow)
            }
        }
        return [gx]
    }
    return out
}
