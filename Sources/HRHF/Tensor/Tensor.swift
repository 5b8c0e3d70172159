import CMemory
import Foundation

/// Owned float32 memory. Tensors that are views of one another (reshape, detach) share it; a
/// storage can also be a contiguous part of another (`batchView`), which it keeps alive.
public final class TensorStorage: @unchecked Sendable {
    public let count: Int
    public let pointer: UnsafeMutablePointer<Float>
    /// The storage this one is a part of; nil when this one owns its memory.
    private let owner: TensorStorage?

    /// Zeroed memory, or with `zeroed: false` memory the caller writes in full before anything
    /// reads it (an op's output: calloc would zero reused heap blocks in one serial pass first).
    public init(count: Int, zeroed: Bool = true) {
        precondition(count >= 0, "negative storage size")
        _ = mallocKeepsFreedMemory
        self.count = count
        // calloc: memory fresh from the kernel is already zero, so it is not written twice.
        let bytes = max(count, 1) * MemoryLayout<Float>.stride
        guard let raw = zeroed ? calloc(max(count, 1), MemoryLayout<Float>.stride) : malloc(bytes) else {
            fatalError("out of memory allocating \(count) floats")
        }
        pointer = raw.bindMemory(to: Float.self, capacity: max(count, 1))
        owner = nil
        #if DEBUG
            // NaN where an op forgot to write: the tests then fail instead of reading old values.
            if !zeroed { pointer.update(repeating: .nan, count: max(count, 1)) }
        #endif
        hrhf_tensor_bytes_add(count * MemoryLayout<Float>.stride)
    }

    /// Floats `offset..<offset + count` of `parent`, without a copy.
    init(viewing parent: TensorStorage, offset: Int, count: Int) {
        precondition(offset >= 0 && count >= 0 && offset + count <= parent.count, "storage view out of range")
        self.count = count
        pointer = parent.pointer + offset
        owner = parent
    }

    deinit {
        guard owner == nil else { return }
        hrhf_tensor_bytes_add(-count * MemoryLayout<Float>.stride)
        free(pointer)
    }

    /// Bytes of tensor storage alive now, and the most alive at once since `resetPeakBytes()`.
    public static var liveBytes: Int { hrhf_tensor_bytes_live() }
    public static var peakBytes: Int { hrhf_tensor_bytes_peak() }
    public static func resetPeakBytes() { hrhf_tensor_bytes_reset_peak() }

    public var buffer: UnsafeMutableBufferPointer<Float> {
        UnsafeMutableBufferPointer(start: pointer, count: count)
    }
}

/// Training allocates and frees the same large activations every iteration. glibc would hand
/// blocks over 128 KB back to the kernel on free and fault them in, zeroed, on the next
/// iteration (a third of a ResNet-50 training step went to that); keeping every block in the
/// heap lets the next iteration reuse them. True when glibc took the settings.
let mallocKeepsFreedMemory: Bool = hrhf_keep_freed_memory() == 1

/// A contiguous float32 tensor (NCHW for images) with reference semantics, like PyTorch's.
/// When it was computed from tensors that require gradients while grad mode is on,
/// `gradFn` holds the backward function that the tape walks.
public final class Tensor: @unchecked Sendable {
    public let shape: [Int]
    public let storage: TensorStorage
    /// True for leaves the user marked, and for every result computed from such a tensor.
    public var requiresGrad: Bool
    /// Accumulated gradient of a leaf after `backward()`.
    public var grad: Tensor?
    var gradFn: GradFn?

    public var count: Int { storage.count }
    public var rank: Int { shape.count }
    public var pointer: UnsafeMutablePointer<Float> { storage.pointer }
    public var buffer: UnsafeMutableBufferPointer<Float> { storage.buffer }

    public init(shape: [Int], storage: TensorStorage, requiresGrad: Bool = false) {
        precondition(shape.allSatisfy { $0 >= 0 }, "negative dimension in \(shape)")
        precondition(
            shape.reduce(1, *) == storage.count,
            "shape \(shape) does not match storage of \(storage.count) elements")
        self.shape = shape
        self.storage = storage
        self.requiresGrad = requiresGrad
    }

    /// Zero-filled tensor.
    public convenience init(zeros shape: [Int], requiresGrad: Bool = false) {
        self.init(
            shape: shape, storage: TensorStorage(count: shape.reduce(1, *)),
            requiresGrad: requiresGrad)
    }

    /// A tensor whose every element the caller writes before anything reads it (NaN-filled in
    /// debug builds).
    convenience init(uninitialized shape: [Int], requiresGrad: Bool = false) {
        self.init(
            shape: shape, storage: TensorStorage(count: shape.reduce(1, *), zeroed: false), requiresGrad: requiresGrad)
    }

    public convenience init(shape: [Int], repeating value: Float, requiresGrad: Bool = false) {
        self.init(uninitialized: shape, requiresGrad: requiresGrad)
        pointer.update(repeating: value, count: count)
    }

    public convenience init(shape: [Int], values: [Float], requiresGrad: Bool = false) {
        precondition(
            shape.reduce(1, *) == values.count,
            "shape \(shape) needs \(shape.reduce(1, *)) values, got \(values.count)")
        self.init(uninitialized: shape, requiresGrad: requiresGrad)
        values.withUnsafeBufferPointer { pointer.update(from: $0.baseAddress!, count: values.count) }
    }

    public convenience init(scalar: Float) {
        self.init(shape: [], values: [scalar])
    }

    /// Standard normal values from a seeded generator.
    public static func randn(
        _ shape: [Int], std: Float = 1, rng: inout SeededGenerator,
        requiresGrad: Bool = false
    ) -> Tensor {
        let t = Tensor(zeros: shape, requiresGrad: requiresGrad)
        for i in 0..<t.count { t.pointer[i] = rng.nextNormal() * std }
        return t
    }

    /// Uniform values in [low, high) from a seeded generator.
    public static func uniform(
        _ shape: [Int], low: Float, high: Float, rng: inout SeededGenerator,
        requiresGrad: Bool = false
    ) -> Tensor {
        let t = Tensor(zeros: shape, requiresGrad: requiresGrad)
        for i in 0..<t.count { t.pointer[i] = low + (high - low) * rng.nextUnitFloat() }
        return t
    }

    public var array: [Float] { Array(buffer) }

    /// The single value of a one-element tensor.
    public var item: Float {
        precondition(count == 1, "item() needs one element, tensor has shape \(shape)")
        return pointer[0]
    }

    /// A tensor sharing this one's memory, outside the autograd graph.
    public func detached() -> Tensor { Tensor(shape: shape, storage: storage) }

    /// A new tensor with its own copy of the values, outside the autograd graph.
    public func copy() -> Tensor {
        let t = Tensor(uninitialized: shape)
        t.pointer.update(from: pointer, count: count)
        return t
    }

    /// Copies values from a tensor of the same element count (in place, outside autograd).
    public func assign(_ other: Tensor) {
        precondition(other.count == count, "assign: \(other.shape) into \(shape)")
        pointer.update(from: other.pointer, count: count)
    }

    public func fill(_ value: Float) { pointer.update(repeating: value, count: count) }

    /// Marks a leaf as needing a gradient; returns self for chaining.
    @discardableResult
    public func requiringGrad(_ flag: Bool = true) -> Tensor {
        requiresGrad = flag
        return self
    }

    public func zeroGrad() { grad = nil }

    subscript(_ n: Int, _ c: Int, _ h: Int, _ w: Int) -> Float {
        get { pointer[((n * shape[1] + c) * shape[2] + h) * shape[3] + w] }
        set { pointer[((n * shape[1] + c) * shape[2] + h) * shape[3] + w] = newValue }
    }
}

extension Tensor: CustomStringConvertible {
    public var description: String {
        let shown = array.prefix(8).map { String(format: "%.5g", $0) }.joined(separator: ", ")
        return "Tensor(shape: \(shape), values: [\(shown)\(count > 8 ? ", ..." : "")])"
    }
}

/// Reads the four NCHW dimensions of a rank-4 tensor.
@inline(__always)
func nchw(_ t: Tensor, _ op: String) -> (n: Int, c: Int, h: Int, w: Int) {
    precondition(t.rank == 4, "\(op) expects an NCHW tensor, got shape \(t.shape)")
    return (t.shape[0], t.shape[1], t.shape[2], t.shape[3])
}
