import Foundation

/// A network building block that owns parameters, buffers and child modules under the names
/// PyTorch's state dict uses, so `stateDict()` keys equal torch's (`layer1.0.conv1.weight`).
open class Module {
    public private(set) var training = true
    private(set) var parameterSlots: [(name: String, tensor: Tensor)] = []
    private(set) var bufferSlots: [(name: String, tensor: Tensor)] = []
    private(set) var childSlots: [(name: String, module: Module)] = []

    public init() {}

    /// Registers a trainable tensor under `name` and returns it.
    @discardableResult
    public func registerParameter(_ name: String, _ tensor: Tensor) -> Tensor {
        precondition(!parameterSlots.contains { $0.name == name }, "parameter \(name) registered twice")
        tensor.requiresGrad = true
        parameterSlots.append((name, tensor))
        return tensor
    }

    /// Registers a non-trainable state tensor (running statistics) under `name`.
    @discardableResult
    public func registerBuffer(_ name: String, _ tensor: Tensor) -> Tensor {
        precondition(!bufferSlots.contains { $0.name == name }, "buffer \(name) registered twice")
        bufferSlots.append((name, tensor))
        return tensor
    }

    /// Registers a child whose entries appear as `name.<entry>`.
    @discardableResult
    public func registerModule<M: Module>(_ name: String, _ module: M) -> M {
        precondition(!childSlots.contains { $0.name == name }, "module \(name) registered twice")
        childSlots.append((name, module))
        return module
    }

    open func forward(_ x: Tensor) -> Tensor {
        fatalError("\(type(of: self)) does not define forward(_:)")
    }

    public func callAsFunction(_ x: Tensor) -> Tensor { forward(x) }

    public var children: [(name: String, module: Module)] { childSlots }

    /// This module and every descendant with its dotted path ("" for self).
    public func namedModules(prefix: String = "") -> [(name: String, module: Module)] {
        var result: [(String, Module)] = [(prefix, self)]
        for (name, child) in childSlots {
            result += child.namedModules(prefix: prefix.isEmpty ? name : "\(prefix).\(name)")
        }
        return result
    }

    public func namedParameters() -> [(name: String, tensor: Tensor)] {
        namedModules().flatMap { path, m in
            m.parameterSlots.map { (path.isEmpty ? $0.name : "\(path).\($0.name)", $0.tensor) }
        }
    }

    public func namedBuffers() -> [(name: String, tensor: Tensor)] {
        namedModules().flatMap { path, m in
            m.bufferSlots.map { (path.isEmpty ? $0.name : "\(path).\($0.name)", $0.tensor) }
        }
    }

    public var parameters: [Tensor] { namedParameters().map(\.tensor) }

    /// Every parameter and buffer by state-dict key, in PyTorch's order: a module's own
    /// parameters, then its buffers, then its children's entries.
    public func stateDict(prefix: String = "") -> [(name: String, tensor: Tensor)] {
        func key(_ name: String) -> String { prefix.isEmpty ? name : "\(prefix).\(name)" }
        return parameterSlots.map { (key($0.name), $0.tensor) } + bufferSlots.map { (key($0.name), $0.tensor) }
            + childSlots.flatMap { $0.module.stateDict(prefix: key($0.name)) }
    }

    /// Sets training or evaluation mode on this module and all descendants.
    public func train(_ on: Bool = true) {
        for (_, m) in namedModules() { m.training = on }
    }

    public func eval() { train(false) }

    /// Freezes or unfreezes every parameter (a frozen teacher computes no weight gradients).
    public func setRequiresGrad(_ on: Bool) {
        for p in parameters { p.requiresGrad = on }
    }

    public func zeroGrad() {
        for p in parameters { p.grad = nil }
    }

    public var parameterCount: Int { parameters.reduce(0) { $0 + $1.count } }
}

/// Children applied in order, named "0", "1", ... as torch.nn.Sequential, or with the names
/// given (Sequential(OrderedDict(...)) in PyTorch).
public final class Sequential: Module {
    public init(_ modules: [Module]) {
        super.init()
        for (i, m) in modules.enumerated() { registerModule(String(i), m) }
    }

    public init(named modules: [(String, Module)]) {
        super.init()
        for (name, m) in modules { registerModule(name, m) }
    }

    public subscript(_ i: Int) -> Module { children[i].module }

    public override func forward(_ x: Tensor) -> Tensor {
        runLayers(children.map(\.module), x)
    }
}

extension Module {
    /// Copies values into this module's parameters and buffers by state-dict key. Every key
    /// must be present with the right shape, and no other key may be given, unless
    /// `allowMissing` or `allowUnexpected` accept it. Nothing is changed when it throws.
    public func loadStateDict(
        _ values: [String: Tensor], source: String = "state dict",
        allowMissing: (String) -> Bool = { _ in false },
        allowUnexpected: (String) -> Bool = { _ in false }
    ) throws {
        let own = stateDict()
        let ownKeys = Set(own.map(\.name))
        var problems: [String] = []
        let missing = own.map(\.name).filter { values[$0] == nil && !allowMissing($0) }
        if !missing.isEmpty { problems.append("missing keys: \(missing.joined(separator: ", "))") }
        let unexpected = values.keys.filter { !ownKeys.contains($0) && !allowUnexpected($0) }.sorted()
        if !unexpected.isEmpty { problems.append("unexpected keys: \(unexpected.joined(separator: ", "))") }
        var shapeProblems: [String] = []
        for (name, t) in own {
            guard let v = values[name] else { continue }
            // A scalar buffer (num_batches_tracked) may arrive as shape [] or [1].
            if v.shape != t.shape && !(v.count == 1 && t.count == 1) {
                shapeProblems.append("\(name): shape \(v.shape) where the model has \(t.shape)")
            }
        }
        if shapeProblems.count > 8 {
            shapeProblems = Array(shapeProblems.prefix(8)) + ["and \(shapeProblems.count - 8) more shape mismatches"]
        }
        problems += shapeProblems
        guard problems.isEmpty else {
            throw WeightFileError(file: source, problems.joined(separator: "; "))
        }
        for (name, t) in own {
            if let v = values[name] { t.assign(v) }
        }
    }
}

/// Children named "0", "1", ... that the owner applies itself (torch.nn.ModuleList).
public final class ModuleList: Module {
    public init(_ modules: [Module]) {
        super.init()
        for (i, m) in modules.enumerated() { registerModule(String(i), m) }
    }

    public subscript(_ i: Int) -> Module { children[i].module }
    public var count: Int { children.count }
}
