import Foundation

// Pointwise nonlinearities, clamp and dropout. Backward is written from the saved output where
// that suffices (relu, sigmoid), so the input need not be kept.

public func relu(_ x: Tensor) -> Tensor {
    let out = Tensor(uninitialized: x.shape)
    let px = x.pointer, po = out.pointer
    parallelBlocks(x.count, minBlock: parallelGrain) { r in for i in r { po[i] = px[i] > 0 ? px[i] : 0 } }
    let od = out.detached()
    record(out, "relu", [x]) { g in [reluGradient(g, output: od)] }
    return out
}

/// g where the ReLU's output is positive, 0 elsewhere. A plain loop, not a closure through
/// `zipValues`: it runs once per residual block and per activation in training.
func reluGradient(_ g: Tensor, output: Tensor) -> Tensor {
    let masked = Tensor(uninitialized: g.shape)
    let pg = g.pointer, po = output.pointer, pm = masked.pointer
    // In SIMD by hand: the conditional load kept the compiler's loop scalar.
    parallelBlocks(g.count, minBlock: parallelGrain) { r in
        let vectorEnd = r.lowerBound + (r.count & ~7)
        for i in stride(from: r.lowerBound, to: vectorEnd, by: 8) {
            store8(SIMD8<Float>().replacing(with: load8(pg + i), where: load8(po + i) .> 0), pm + i)
        }
        for i in vectorEnd..<r.upperBound { pm[i] = po[i] > 0 ? pg[i] : 0 }
    }
    return masked
}

/// relu(a + b) as one op (a residual block's sum and ReLU): the sum is never stored, and the
/// backward hands both inputs the same masked gradient. Values and gradients are relu(a + b)'s
/// bit for bit; shapes that broadcast go through the two ops.
public func addRelu(_ a: Tensor, _ b: Tensor) -> Tensor {
    guard a.shape == b.shape else { return relu(a + b) }
    let out = Tensor(uninitialized: a.shape)
    let pa = a.pointer, pb = b.pointer, po = out.pointer
    parallelBlocks(out.count, minBlock: parallelGrain) { r in
        for i in r {
            let v = pa[i] + pb[i]
            po[i] = v > 0 ? v : 0
        }
    }
    let od = out.detached()
    record(out, "add_relu", [a, b]) { g in
        let masked = reluGradient(g, output: od)
        return [a.requiresGrad ? masked : nil, b.requiresGrad ? masked : nil]
    }
    return out
}

/// max(0, x) + slope * min(0, x); PyTorch's default slope is 0.01.
public func leakyRelu(_ x: Tensor, slope: Float = 0.01) -> Tensor {
    let out = mapValues(x) { $0 > 0 ? $0 : $0 * slope }
    let xd = x.detached()
    record(out, "leaky_relu", [x]) { g in [zipValues(g, xd) { $1 > 0 ? $0 : $0 * slope }] }
    return out
}

public func sigmoid(_ x: Tensor) -> Tensor {
    let out = mapValues(x) { 1 / (1 + Foundation.exp(-$0)) }
    let od = out.detached()
    record(out, "sigmoid", [x]) { g in [zipValues(g, od) { $0 * $1 * (1 - $1) }] }
    return out
}

/// Values limited to [low, high]; the gradient passes where low <= x <= high (as torch.clamp).
public func clamp(_ x: Tensor, min low: Float, max high: Float) -> Tensor {
    precondition(low <= high, "clamp: min \(low) > max \(high)")
    let out = mapValues(x) { Swift.min(Swift.max($0, low), high) }
    let xd = x.detached()
    record(out, "clamp", [x]) { g in [zipValues(g, xd) { ($1 >= low && $1 <= high) ? $0 : 0 }] }
    return out
}

/// Zeroes each value with probability p and scales the rest by 1/(1-p) when training;
/// the identity otherwise.
public func dropout(_ x: Tensor, p: Float, training: Bool, rng: inout SeededGenerator) -> Tensor {
    precondition(p >= 0 && p < 1, "dropout probability \(p) outside [0, 1)")
    guard training, p > 0 else { return x }
    let mask = Tensor(uninitialized: x.shape)
    let scale = 1 / (1 - p)
    for i in 0..<mask.count { mask.pointer[i] = rng.nextUnitFloat() < p ? 0 : scale }
    let out = zipValues(x, mask) { $0 * $1 }
    record(out, "dropout", [x]) { g in [zipValues(g, mask) { $0 * $1 }] }
    return out
}
