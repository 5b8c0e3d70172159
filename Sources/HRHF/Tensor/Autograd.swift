import Foundation

/// One recorded operation: the tensors it read and the function that turns the gradient of
/// its output into gradients of those inputs (nil for inputs that need none).
final class GradFn {
    let name: String
    let inputs: [Tensor]
    let backward: (Tensor) -> [Tensor?]
    /// What the backward step counts as in a profile (the kind current when the op ran).
    let profileKind: ProfileKind

    init(name: String, inputs: [Tensor], backward: @escaping (Tensor) -> [Tensor?]) {
        self.name = name
        self.inputs = inputs
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

        var grads: [ObjectIdentifier: Tensor] = [ObjectIdentifier(self): seed]
        for t in order.reversed() {
            guard let g = grads.removeValue(forKey: ObjectIdentifier(t)) else { continue }
            guard let fn = t.gradFn else {
                // A copy: a passed-through gradient may alias another tensor's.
                t.grad = t.grad.map { accumulate($0, g) } ?? g.copy()
                leafReady?(t)
                continue
            }
            let inputGrads = Profiler.region(fn.profileKind) { fn.backward(g) }
            precondition(inputGrads.count == fn.inputs.count, "\(fn.name): wrong gradient count")
            for (input, ig) in zip(fn.inputs, inputGrads) {
                guard let ig, input.requiresGrad else { continue }
                precondition(
                    ig.shape == input.shape,
                    "\(fn.name): gradient shape \(ig.shape) for input \(input.shape)")
                let key = ObjectIdentifier(input)
                grads[key] = grads[key].map { accumulate($0, ig) } ?? ig
            }
            t.gradFn = nil
        }
    }
}

/// a + b into fresh memory (either may be aliased elsewhere in the graph).
private func accumulate(_ a: Tensor, _ b: Tensor) -> Tensor {
    let out = Tensor(uninitialized: a.shape)
    let pa = a.pointer, pb = b.pointer, po = out.pointer
    parallelBlocks(a.count, minBlock: parallelGrain) { r in for i in r { po[i] = pa[i] + pb[i] } }
    return out
}
