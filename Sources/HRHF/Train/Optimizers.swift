import Foundation

/// Updates parameters in place from their `.grad`, as torch.optim does. Parameters without a
/// gradient are skipped. `state` exposes the moment buffers for checkpoints.
public protocol Optimizer: AnyObject {
    var parameters: [Tensor] { get }
    var learningRate: Float { get set }
    func step()
    /// Named state tensors (momentum, moments, step counts) for checkpoint and resume.
    func stateTensors() -> [(name: String, tensor: Tensor)]
}

extension Optimizer {
    public func zeroGrad() { for p in parameters { p.grad = nil } }
}

/// torch.optim.SGD: d = g + wd * p; buf = momentum * buf + (1 - dampening) * d (buf = d on
/// the first step); d = nesterov ? d + momentum * buf : buf; p -= lr * d.
public final class SGD: Optimizer {
    public let parameters: [Tensor]
    public var learningRate: Float
    public let momentum: Float, dampening: Float, weightDecay: Float, nesterov: Bool
    private var buffers: [Tensor?]

    public init(
        _ parameters: [Tensor], learningRate: Float, momentum: Float = 0, dampening: Float = 0,
        weightDecay: Float = 0, nesterov: Bool = false
    ) {
        precondition(!nesterov || (momentum > 0 && dampening == 0), "nesterov needs momentum and no dampening")
        self.parameters = parameters
        self.learningRate = learningRate
        self.momentum = momentum
        self.dampening = dampening
        self.weightDecay = weightDecay
        self.nesterov = nesterov
        buffers = Array(repeating: nil, count: parameters.count)
    }

    public func step() {
        let (lr, mom, damp, wd, nest) = (learningRate, momentum, dampening, weightDecay, nesterov)
        for (i, p) in parameters.enumerated() {
            guard let g = p.grad else { continue }
            let pp = p.pointer, pg = g.pointer
            var buf = buffers[i]
            let fresh = buf == nil
            if mom != 0 && fresh {
                buf = Tensor(zeros: p.shape)
                buffers[i] = buf
            }
            let pb = buf?.pointer
            parallelBlocks(p.count, minBlock: parallelGrain) { r in
                for j in r {
                    var d = pg[j] + wd * pp[j]
                    if let pb {
                        pb[j] = fresh ? d : mom * pb[j] + (1 - damp) * d
                        d = nest ? d + mom * pb[j] : pb[j]
                    }
                    pp[j] -= lr * d
                }
            }
        }
    }

    public func stateTensors() -> [(name: String, tensor: Tensor)] {
        buffers.enumerated().compactMap { i, b in b.map { ("\(i).momentum_buffer", $0) } }
    }

    /// Restores momentum buffers saved by `stateTensors()`.
    public func loadState(_ state: [String: Tensor]) {
        for i in parameters.indices {
            if let t = state["\(i).momentum_buffer"] { buffers[i] = t.copy() }
        }
    }
}

/// torch.optim.Adam (not AdamW): g += wd * p; m, v moving moments; step size lr / (1 - b1^t);
/// denominator sqrt(v) / sqrt(1 - b2^t) + eps.
public final class Adam: Optimizer {
    public let parameters: [Tensor]
    public var learningRate: Float
    public let beta1: Float, beta2: Float, eps: Float, weightDecay: Float
    private var m: [Tensor], v: [Tensor]
    public private(set) var stepCount = 0

    public init(
        _ parameters: [Tensor], learningRate: Float, betas: (Float, Float) = (0.9, 0.999),
        eps: Float = 1e-8, weightDecay: Float = 0
    ) {
        self.parameters = parameters
        self.learningRate = learningRate
        beta1 = betas.0
        beta2 = betas.1
        self.eps = eps
        self.weightDecay = weightDecay
        m = parameters.map { Tensor(zeros: $0.shape) }
        v = parameters.map { Tensor(zeros: $0.shape) }
    }

    public func step() {
        stepCount += 1
        let (b1, b2, eps, wd) = (beta1, beta2, eps, weightDecay)
        let bc1 = 1 - Foundation.pow(b1, Float(stepCount)), bc2 = 1 - Foundation.pow(b2, Float(stepCount))
        let stepSize = learningRate / bc1, bc2Root = bc2.squareRoot()
        for (i, p) in parameters.enumerated() {
            guard let g = p.grad else { continue }
            let pp = p.pointer, pg = g.pointer, pm = m[i].pointer, pv = v[i].pointer
            parallelBlocks(p.count, minBlock: parallelGrain) { r in
                for j in r {
                    let grad = pg[j] + wd * pp[j]
                    pm[j] = b1 * pm[j] + (1 - b1) * grad
                    pv[j] = b2 * pv[j] + (1 - b2) * grad * grad
                    pp[j] -= stepSize * pm[j] / (pv[j].squareRoot() / bc2Root + eps)
                }
            }
        }
    }

    public func stateTensors() -> [(name: String, tensor: Tensor)] {
        m.enumerated().map { ("\($0.offset).exp_avg", $0.element) }
            + v.enumerated().map { ("\($0.offset).exp_avg_sq", $0.element) }
            + [("step", Tensor(scalar: Float(stepCount)))]
    }

    public func loadState(_ state: [String: Tensor]) {
        for i in parameters.indices {
            if let t = state["\(i).exp_avg"] { m[i].assign(t) }
            if let t = state["\(i).exp_avg_sq"] { v[i].assign(t) }
        }
        if let s = state["step"] { stepCount = Int(s.item) }
    }
}
