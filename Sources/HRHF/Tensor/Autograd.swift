import Foundation

/// One recorded operation: the tensors it read and the function that turns the gradient of
/// its output into gradients of those inputs (nil for inputs that need none).
final class GradFn {
    let name: String
    let inputs: [Tensor]
    let backward: (Tensor) -> [Tensor?]
    /// When set, the one input's gradient that `backward` returns covers only these rows (dim 0)
    /// of that input: the tape adds it in at its offset instead of the op padding it with zeros.
    let inputRows: Range<Int>?
    /// What the backward step counts as in a profile (the kind current when the op ran).
    let profileKind: ProfileKind

    init(
        name: String, inputs: [Tensor], inputRows: Range<Int>? = nil,
        backward: @escaping (Tensor) -> [Tensor?]
    ) {
        self.name = name
        self.inputs = inputs
        self.inputRows = inputRows
        self.backward = backward
        profileKind = Profiler.isEnabled ? Profiler.recordingKind : .other
    }
}

/// Whether operations are recorded on the tape. Off inside `withNoGrad` (inference, teachers,
/// EMA updates). Process-wide, like the training loop that sets it: background threads (the
/// batch loader) build tensors that need no gradient and never change it.
public enum GradMode {
    nonisolated(unsafe) public private(set) static var isEnabled = true

    /// Runs `body` without recording: results of it never require gradients.
    public static func withNoGrad<T>(_ body: () throws -> T) rethrows -> T {
        let saved = isEnabled
        isEnabled = false
        defer { isEnabled = saved }
        return try body()
    }
}

public func withNoGrad<T>(_ body: () throws -> T) rethrows -> T {
    try GradMode.withNoGrad(body)
}

/// Attaches a backward function to `output` when grad mode is on and any input needs a
/// gradient. Backward closures must not capture `output` itself (that would be a cycle):
/// capture `output.detached()` instead.
@inline(__always)
func record(
    _ output: Tensor, _ name: String, _ inputs: [Tensor],
    _ backward: @escaping (Tensor) -> [Tensor?]
) {
    guard GradMode.isEnabled, inputs.contains(where: { $0.requiresGrad }) else { return }
    output.requiresGrad = true
    output.gradFn = GradFn(name: name, inputs: inputs, backward: backward)
}

/// Records `output` as rows `rows` (dim 0) of `input`: its gradient goes into those rows of the
/// input's gradient without a zero-padded full-size copy.
func recordRows(_ output: Tensor, _ name: String, of input: Tensor, rows: Range<Int>) {
    guard GradMode.isEnabled, input.requiresGrad else { return }
    output.requiresGrad = true
    output.gradFn = GradFn(name: name, inputs: [input], inputRows: rows) { g in [g] }
}

extension Tensor {
    /// Reverse-mode differentiation from this tensor. A non-scalar root needs `gradient`.
    /// Leaves that require a gradient accumulate it in `.grad` (added to what is there, as in
    /// PyTorch). The graph is freed as it is walked. `leafReady` sees each such leaf as soon as
    /// its gradient is final (data-parallel training starts summing it over ranks then).
    public func backward(gradient: Tensor? = nil, leafReady: ((Tensor) -> Void)? = nil) {
        precondition(requiresGrad, "backward() on a tensor that does not require grad")
        let seed: Tensor
        if let gradient {
            precondition(gradient.shape == shape, "gradient shape \(gradient.shape) != \(shape)")
            seed = gradient
        } else {
            precondition(count == 1, "backward() without a gradient needs a scalar, got \(shape)")
            seed = Tensor(shape: shape, repeating: 1)
        }

        // Reverse topological order by an iterative depth-first search (graphs are deep).
        var order: [Tensor] = []
        var visited = Set<ObjectIdentifier>()
        var stack: [(Tensor, Int)] = [(self, 0)]
        visited.insert(ObjectIdentifier(self))
        while let (t, next) = stack.popLast() {
            let inputs = t.gradFn?.inputs ?? []
            if next < inputs.count {
                stack.append((t, next + 1))
                let child = inputs[next]
                if child.requiresGrad, visited.insert(ObjectIdentifier(child)).inserted {
                    stack.append((child, 0))
                }
            } else {
                order.append(t)
            }
        }

        var grads: [ObjectIdentifier: PendingGradient] = [
            ObjectIdentifier(self): PendingGradient(tensor: seed, owned: false, written: nil)
        ]
        for t in order.reversed() {
            guard let pending = grads.removeValue(forKey: ObjectIdentifier(t)) else { continue }
            let g = pending.finished()
            guard let fn = t.gradFn else {
                // A gradient the tape did not make may alias another tensor's: the leaf gets a copy or a fresh sum.
                if let previous = t.grad {
                    t.grad =
                        PendingGradient(tensor: g, owned: pending.owned, written: nil)
                        .adding(previous, rows: allRows(of: g.shape)).tensor
                } else {
                    t.grad = pending.owned ? g : g.copy()
                }
                leafReady?(t)
                continue
            }
            let inputGrads = Profiler.region(fn.profileKind) { fn.backward(g) }
            precondition(inputGrads.count == fn.inputs.count, "\(fn.name): wrong gradient count")
            for (input, ig) in zip(fn.inputs, inputGrads) {
                guard let ig, input.requiresGrad else { continue }
                let rows = fn.inputRows ?? allRows(of: input.shape)
                precondition(
                    ig.shape == (input.rank == 0 ? [] : [rows.count] + input.shape.dropFirst()),
                    "\(fn.name): gradient shape \(ig.shape) for input \(input.shape), rows \(rows)")
                let key = ObjectIdentifier(input)
                if let existing = grads[key] {
                    grads[key] = existing.adding(ig, rows: rows)
                } else {
                    grads[key] = PendingGradient(starting: ig, rows: rows, of: input.shape)
                }
            }
            t.gradFn = nil
        }
    }
}

/// Every row (dim 0) of a tensor of `shape`; a scalar counts as one row.
private func allRows(of shape: [Int]) -> Range<Int> { 0..<(shape.first ?? 1) }

/// A gradient the tape is summing for one tensor, term by term in the order the terms arrive.
private struct PendingGradient {
    var tensor: Tensor
    /// Made by the tape and held nowhere else, so later terms are added into it in place. A
    /// gradient a backward returned is never written: it may be that backward's own `g`.
    let owned: Bool
    /// For a sum started from a row slice, which rows (dim 0) hold values so far; nil when all do.
    var written: [Bool]?

    init(tensor: Tensor, owned: Bool, written: [Bool]?) {
        self.tensor = tensor
        self.owned = owned
        self.written = written
    }

    /// The sum's first term: `g`, the gradient of rows `rows` of a tensor of `shape`. Taken as
    /// it is when it covers every row; otherwise placed in a new tensor whose other rows stay
    /// unwritten until a later term or `finished()` fills them.
    init(starting g: Tensor, rows: Range<Int>, of shape: [Int]) {
        let all = allRows(of: shape)
        guard rows != all else {
            self.init(tensor: g, owned: false, written: nil)
            return
        }
        let out = Tensor(uninitialized: shape)
        let per = out.count / max(all.count, 1)
        (out.pointer + rows.lowerBound * per).update(from: g.pointer, count: g.count)
        self.init(tensor: out, owned: true, written: all.map { rows.contains($0) })
    }

    /// This sum plus `g`, the gradient of rows `rows`: in place when the tape owns the sum.
    func adding(_ g: Tensor, rows: Range<Int>) -> PendingGradient {
        let a = tensor
        let rowCount = allRows(of: a.shape).count
        let per = a.count / max(rowCount, 1)
        guard owned else {
            // A fresh tensor: the rows outside `rows` copied, a + g inside.
            let out = Tensor(uninitialized: a.shape)
            out.pointer.update(from: a.pointer, count: rows.lowerBound * per)
            let tail = rows.upperBound * per
            (out.pointer + tail).update(from: a.pointer + tail, count: a.count - tail)
            let start = rows.lowerBound * per
            addElements(a.pointer + start, g.pointer, into: out.pointer + start, count: g.count)
            return PendingGradient(tensor: out, owned: true, written: nil)
        }
        var sum = self
        var row = rows.lowerBound
        while row < rows.upperBound {
            // A run of rows that all hold values (add g in) or all do not (copy g in).
            let holdsValues = written?[row] ?? true
            var end = row + 1
            while end < rows.upperBound, (written?[end] ?? true) == holdsValues { end += 1 }
            let dst = a.pointer + row * per, src = g.pointer + (row - rows.lowerBound) * per
            if holdsValues {
                addElements(dst, src, into: dst, count: (end - row) * per)
            } else {
                dst.update(from: src, count: (end - row) * per)
            }
            row = end
        }
        if var marks = written {
            for r in rows { marks[r] = true }
            sum.written = marks.allSatisfy { $0 } ? nil : marks
        }
        return sum
    }

    /// The summed gradient, with zeros in the rows no term covered.
    func finished() -> Tensor {
        if let written {
            let per = tensor.count / max(written.count, 1)
            for (row, holdsValues) in written.enumerated() where !holdsValues {
                (tensor.pointer + row * per).update(repeating: 0, count: per)
            }
        }
        return tensor
    }
}

/// out[i] = a[i] + b[i] for i < count (`out` may be `a`).
private func addElements(
    _ a: UnsafeMutablePointer<Float>, _ b: UnsafeMutablePointer<Float>, into out: UnsafeMutablePointer<Float>,
    count: Int
) {
    parallelBlocks(count, minBlock: parallelGrain) { r in for i in r { out[i] = a[i] + b[i] } }
}
