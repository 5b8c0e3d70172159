import Foundation

/// The four neighbour directions of total variation as (row, column) offsets of the second pixel
/// of each pair from the first: right, down, down-left, down-right.
private let totalVariationOffsets: [(dy: Int, dx: Int)] = [(0, 1), (1, 0), (1, -1), (1, 1)]

/// Total variation of each image of an N x C x H x W tensor as a 2 x N tensor: row 0 the mean
/// squared difference of neighbours, row 1 the mean absolute one, each summed over the four
/// directions (the mean of a direction over its C (H - dy) (W - |dx|) pairs). One op, forward and
/// backward each one pass over the pairs, where the composition of crops, differences, squares,
/// absolutes and means made 24 temporaries.
func totalVariationRows(_ x: Tensor) -> Tensor {
    let (n, c, h, w) = nchw(x, "total variation")
    precondition(h >= 2 && w >= 2, "total variation needs at least 2 x 2 pixels, got \(h) x \(w)")
    let out = Tensor(zeros: [2, n])
    let px = x.pointer, po = out.pointer
    let image = c * h * w
    /// Pairs of one direction in one image, and the first pixel's row and column ranges.
    func pairs(_ o: (dy: Int, dx: Int)) -> (count: Float, rows: Range<Int>, columns: Range<Int>) {
        let columns = max(0, -o.dx)..<(w - max(0, o.dx))
        return (Float(c * (h - o.dy) * columns.count), 0..<(h - o.dy), columns)
    }
    parallelBlocks(n) { images in
        for b in images {
            var l2: Float = 0, l1: Float = 0
            for o in totalVariationOffsets {
                let (count, rows, columns) = pairs(o)
                var squares: Double = 0, absolutes: Double = 0
                for ch in 0..<c {
                    let base = px + b * image + ch * h * w
                    for y in rows {
                        let first = base + y * w, second = base + (y + o.dy) * w + o.dx
                        for xi in columns {
                            let d = first[xi] - second[xi]
                            squares += Double(d * d)
                            absolutes += Double(Swift.abs(d))
                        }
                    }
                }
                l2 += Float(squares) / count
                l1 += Float(absolutes) / count
            }
            po[b] = l2
            po[n + b] = l1
        }
    }
    let xd = x.detached()
    record(out, "total_variation", [x]) { g in
        let gx = Tensor(zeros: xd.shape)
        let pg = g.pointer, pgx = gx.pointer, pxd = xd.pointer
        parallelBlocks(n) { images in
            for b in images {
                for o in totalVariationOffsets {
                    let (count, rows, columns) = pairs(o)
                    let twiceSquareWeight = 2 * pg[b] / count, absoluteWeight = pg[n + b] / count
                    for ch in 0..<c {
                        let offset = b * image + ch * h * w
                        for y in rows {
                            let first = offset + y * w, second = offset + (y + o.dy) * w + o.dx
                            for xi in columns {
                                let d = pxd[first + xi] - pxd[second + xi]
                                // abs's gradient is 0 at 0, as `abs` gives it.
                                let sign: Float = d > 0 ? 1 : (d < 0 ? -1 : 0)
                                let gd = twiceSquareWeight * d + absoluteWeight * sign
                                pgx[first + xi] += gd
                                pgx[second + xi] -= gd
                            }
                        }
                    }
                }
            }
        }
        return [gx]
    }
    return out
}
