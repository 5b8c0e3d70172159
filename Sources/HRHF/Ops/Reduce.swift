import Foundation

// Sums and means over chosen axes, and top-k over spatial positions.

/// Sum over `axes` (negative counts from the end). Without `keepDims` the axes are removed.
public func sum(_ x: Tensor, axes: [Int], keepDims: Bool = false) -> Tensor {
    let normalized = Set(axes.map { $0 < 0 ? $0 + x.rank : $0 }).sorted()
    precondition(normalized.allSatisfy { $0 >= 0 && $0 < x.rank }, "axes \(axes) out of range for \(x.shape)")
    let kept = reduceSum(x, axes: normalized)
    let outShape =
        keepDims ? kept.shape : x.shape.enumerated().filter { !normalized.contains($0.offset) }.map(\.element)
    let out = Tensor(shape: outShape, storage: kept.storage)
    let keptShape = kept.shape, inShape = x.shape
    record(out, "sum", [x]) { g in
        [broadcastTo(Tensor(shape: keptShape, storage: g.storage), inShape)]
    }
    return out
}

/// Mean over `axes`.
public func mean(_ x: Tensor, axes: [Int], keepDims: Bool = false) -> Tensor {
    let normalized = Set(axes.map { $0 < 0 ? $0 + x.rank : $0 })
    let n = normalized.reduce(1) { $0 * x.shape[$1] }
    return sum(x, axes: axes, keepDims: keepDims) * (1 / Float(max(n, 1)))
}

/// Sum of all elements, as a scalar tensor (shape []).
public func sum(_ x: Tensor) -> Tensor {
    let flat = reshape(x, [x.count])
    return sum(flat, axes: [0])
}

/// Mean of all elements, as a scalar tensor.
public func mean(_ x: Tensor) -> Tensor { sum(x) * (1 / Float(max(x.count, 1))) }

/// The k largest values of each channel over its spatial positions, in descending order:
/// `x` is N x C x H x W (or N x C x L); values are N x C x k, indices (into the flattened
/// spatial positions) likewise. Differentiable in the values: the gradient goes to the
/// selected positions. Ties are broken by the lower index.
public func spatialTopK(_ x: Tensor, k: Int) -> (values: Tensor, indices: [Int32]) {
    precondition(x.rank >= 3, "spatialTopK expects N x C x spatial, got \(x.shape)")
    let n = x.shape[0], c = x.shape[1], plane = x.count / max(n * c, 1)
    precondition(k >= 1 && k <= plane, "k = \(k) outside 1...\(plane)")
    let values = Tensor(zeros: [n, c, k])
    var indices = [Int32](repeating: 0, count: n * c * k)
    let px = x.pointer, pv = values.pointer
    indices.withUnsafeMutableBufferPointer { pi in
        let piBase = pi.baseAddress!
        parallelBlocks(n * c) { r in
            var order = [Int32](repeating: 0, count: plane)
            for nc in r {
                let base = px + nc * plane
                for i in 0..<plane { order[i] = Int32(i) }
                // Partial selection then sort of the top k: O(plane + k log k).
                order.withUnsafeMutableBufferPointer { o in
                    let greater: (Int32, Int32) -> Bool = { a, b in
                        let va = base[Int(a)], vb = base[Int(b)]
                        return va > vb || (va == vb && a < b)
                    }
                    selectTopK(o, k: k, by: greater)
                    o[0..<k].sort(by: greater)
                }
                for j in 0..<k {
                    piBase[nc * k + j] = order[j]
                    pv[nc * k + j] = base[Int(order[j])]
                }
            }
        }
    }
    let idx = indices, inShape = x.shape
    record(values, "spatial_topk", [x]) { g in
        let gx = Tensor(zeros: inShape)
        let pg = g.pointer, pgx = gx.pointer
        for nc in 0..<(n * c) {
            for j in 0..<k { pgx[nc * plane + Int(idx[nc * k + j])] += pg[nc * k + j] }
        }
        return [gx]
    }
    return (values, indices)
}

/// Mean of the k largest spatial values of each plane of an N x C x H x W tensor, with its own
/// k per plane (`k[n * C + c]`; 0 skips the plane and gives 0): SegInversion's Scale-Aware
/// Aggregation ranks each class map of each image to its own target size. N x C out; the
/// gradient, 1/k, goes to the selected positions. Selection only, no sort: O(H W) per plane.
public func spatialTopKMean(_ x: Tensor, k: [Int]) -> Tensor {
    precondition(x.rank >= 3, "spatialTopKMean expects N x C x spatial, got \(x.shape)")
    let n = x.shape[0], c = x.shape[1], plane = x.count / max(n * c, 1)
    precondition(k.count == n * c, "spatialTopKMean: \(k.count) k values for \(n * c) planes")
    precondition(k.allSatisfy { $0 >= 0 && $0 <= plane }, "spatialTopKMean: k outside 0...\(plane)")
    let out = Tensor(zeros: [n, c])
    var selected = [[Int32]](repeating: [], count: n * c)
    let px = x.pointer, po = out.pointer
    let lock = NSLock()
    parallelBlocks(n * c) { r in
        var order = [Int32](repeating: 0, count: plane)
        for p in r where k[p] > 0 {
            let base = px + p * plane
            for i in 0..<plane { order[i] = Int32(i) }
            var total: Double = 0
            order.withUnsafeMutableBufferPointer { o in
                selectTopK(o, k: k[p]) { a, b in
                    let va = base[Int(a)], vb = base[Int(b)]
                    return va > vb || (va == vb && a < b)
                }
                for j in 0..<k[p] { total += Double(base[Int(o[j])]) }
            }
            po[p] = Float(total / Double(k[p]))
            let chosen = Array(order[0..<k[p]])
            lock.lock()
            selected[p] = chosen
            lock.unlock()
        }
    }
    let inShape = x.shape
    record(out, "spatial_topk_mean", [x]) { g in
        let gx = Tensor(zeros: inShape)
        let pg = g.pointer, pgx = gx.pointer
        for p in 0..<(n * c) where k[p] > 0 {
            let share = pg[p] / Float(k[p])
            for i in selected[p] { pgx[p * plane + Int(i)] += share }
        }
        return [gx]
    }
    return out
}

/// Moves the k elements that come first under `by` to the front (quickselect, in place).
private func selectTopK(_ a: UnsafeMutableBufferPointer<Int32>, k: Int, by before: (Int32, Int32) -> Bool) {
    var lo = 0, hi = a.count - 1
    var target = k - 1
    while lo < hi {
        let pivot = a[(lo + hi) / 2]
        var i = lo, j = hi
        while i <= j {
            while before(a[i], pivot) { i += 1 }
            while before(pivot, a[j]) { j -= 1 }
            if i <= j {
                a.swapAt(i, j)
                i += 1
                j -= 1
            }
        }
        if target <= j { hi = j } else if target >= i { lo = i } else { return }
        target = k - 1
    }
}
