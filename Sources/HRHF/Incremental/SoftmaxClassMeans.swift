import Foundation

/// The per-pixel work of GSC's relation term as one op:
/// `classConditionalMeans(softmax(sliceChannels(logits, 0..<channels)), assignment:, classes:)`,
/// with row k (classes x channels) the mean softmax of the pixels assigned to class k
/// (`assignment[n * H * W + i]`, -1 for none; zero rows for classes without pixels). With
/// `constant` (N x channels x ..., e.g. the old model's softmax) its class means come out of the
/// same pass, without a gradient; `counts` are each class's pixels. Backward, for a pixel of
/// class a with G the rows' gradient: g_k = G[a, k] / |a|, dx_k = p_k (g_k - sum_j g_j p_j) on the
/// first `channels` channels, 0 on the rest.
func softmaxClassMeans(
    _ logits: Tensor, channels old: Int, assignment: [Int32], classes k: Int, alongside constant: Tensor? = nil
) -> (means: Tensor, constantMeans: Tensor?, counts: [Float]) {
    let (n, c, inner) = channelLayout(logits, "softmax class means")
    precondition(old >= 1 && old <= c, "softmax class means: \(old) of \(c) channels")
    precondition(assignment.count == n * inner, "softmax class means: \(assignment.count) assignments for \(n * inner)")
    precondition(
        constant.map { $0.count == n * old * inner && $0.shape[0] == n } ?? true,
        "softmax class means: constant \(constant?.shape ?? []) for \(logits.shape)")
    let p = Tensor(uninitialized: [n, old, inner])
    let blocksPerImage = (inner + pixelBlock - 1) / pixelBlock
    // Each pixel block's class sums (of p, then of the constant) and pixel counts, added in block
    // order after: the same result whatever the thread count.
    let models = constant == nil ? 1 : 2, sumsPerBlock = models * k * old, stride = sumsPerBlock + k
    var partial = [Double](repeating: 0, count: n * blocksPerImage * stride)
    let px = logits.pointer, pp = p.pointer, pc = constant?.pointer
    assignment.withUnsafeBufferPointer { assigned in
        partial.withUnsafeMutableBufferPointer { partial in
            forEachPixelBlock(n: n, c: c, inner: inner) { b, i0, count in
                let x = px + b * c * inner + i0, y = pp + b * old * inner + i0,
                    labels = assigned.baseAddress! + b * inner + i0
                // softmax's arithmetic: exp(x - max) per channel, then times 1 / their sum.
                withUnsafeTemporaryAllocation(of: Float.self, capacity: 2 * paddedBlock) { scratch in
                    let peak = scratch.baseAddress!, sums = peak + paddedBlock
                    blockPeak(x, rows: 0..<old, scale: 1, inner: inner, count: count, into: peak)
                    sums.update(repeating: 0, count: count)
                    for ch in 0..<old {
                        let row = y + ch * inner
                        vectorExp(x + ch * inner, minus: peak, row, count: count)
                        for i in 0..<count { sums[i] += row[i] }
                    }
                    for i in 0..<count { sums[i] = 1 / sums[i] }
                    for ch in 0..<old {
                        let row = y + ch * inner
                        for i in 0..<count { row[i] *= sums[i] }
                    }
                }
                // Four banks of sums, pixel i into bank i % 4: neighbours mostly share a class, and
                // one bank would make each add wait for the previous one.
                func addClassSums(_ values: UnsafePointer<Float>, into classSums: UnsafeMutablePointer<Double>) {
                    withUnsafeTemporaryAllocation(of: Double.self, capacity: 4 * k) { banks in
                        let banks = banks.baseAddress!
                        for ch in 0..<old {
                            banks.update(repeating: 0, count: 4 * k)
                            let row = values + ch * inner
                            for i in 0..<count where labels[i] >= 0 {
                                banks[(i & 3) * k + Int(labels[i])] += Double(row[i])
                            }
                            for a in 0..<k {
                                classSums[a * old + ch] +=
                                    (banks[a] + banks[k + a]) + (banks[2 * k + a] + banks[3 * k + a])
                            }
                        }
                    }
                }
                let sums = partial.baseAddress! + (b * blocksPerImage + i0 / pixelBlock) * stride
                addClassSums(y, into: sums)
                if let pc { addClassSums(pc + b * old * inner + i0, into: sums + k * old) }
                for i in 0..<count where labels[i] >= 0 { sums[sumsPerBlock + Int(labels[i])] += 1 }
            }
        }
    }
    var totals = [Double](repeating: 0, count: stride)
    for block in 0..<(n * blocksPerImage) {
        for e in 0..<stride { totals[e] += partial[block * stride + e] }
    }
    let counts = totals[sumsPerBlock...].map { Float($0) }
    func means(_ model: Int) -> Tensor {
        Tensor(
            shape: [k, old],
            values: (0..<(k * old)).map { e in
                counts[e / old] > 0 ? Float(totals[model * k * old + e] / Double(counts[e / old])) : 0
            })
    }
    let out = means(0)
    let shape = logits.shape, pd = p
    record(out, "softmax_class_means", [logits]) { g in
        // Every element is written below (the channels past `old` zeroed there, on both cores).
        let gx = Tensor(uninitialized: shape)
        let py = pd.pointer, pgx = gx.pointer
        // Each row's gradient shared by its pixels: G[a, k] / |a|.
        let share = (0..<(k * old)).map { e in counts[e / old] > 0 ? g.pointer[e] / counts[e / old] : 0 }
        assignment.withUnsafeBufferPointer { assigned in
            forEachPixelBlock(n: n, c: c, inner: inner) { b, i0, count in
                let y = py + b * old * inner + i0, r = pgx + b * c * inner + i0
                let labels = assigned.baseAddress! + b * inner + i0
                withUnsafeTemporaryAllocation(of: Float.self, capacity: count) { dot in
                    dot.initialize(repeating: 0)
                    // The class mean's gradient on each pixel, then softmax's backward over it.
                    for ch in 0..<old {
                        let gr = r + ch * inner, yr = y + ch * inner
                        for i in 0..<count {
                            let a = Int(labels[i])
                            gr[i] = a >= 0 ? share[a * old + ch] : 0
                            dot[i] += gr[i] * yr[i]
                        }
                    }
                    for ch in 0..<old {
                        let gr = r + ch * inner, yr = y + ch * inner
                        for i in 0..<count { gr[i] = yr[i] * (gr[i] - dot[i]) }
                    }
                    for ch in old..<c { (r + ch * inner).update(repeating: 0, count: count) }
                }
            }
        }
        return [gx]
    }
    return (out, constant == nil ? nil : means(1), counts)
}
