import Foundation

/// The three workloads the performance issue compares with PyTorch.
public enum NetworkWorkload: String, CaseIterable, Sendable {
    /// Evaluation forward, batch 1.
    case eval
    /// Training forward and backward (cross-entropy), batch 2.
    case train
    /// Gradient with respect to the input only, frozen weights, batch 4 (model inversion).
    case invert

    public var batch: Int {
        switch self {
        case .eval: 1
        case .train: 2
        case .invert: 4
        }
    }
}

public struct NetworkBenchResult: Sendable {
    public var medianSeconds: Double
    public var gflopPerRun: Double
    public var peakResidentMB: Double
    /// The most tensor storage alive at once during the timed runs (activations, gradients,
    /// weights); the resident peak adds scratch buffers, the runtime and heap slack.
    public var tensorPeakMB: Double
}

/// Peak resident memory of this process so far, in MB.
public func peakResidentMB() -> Double {
    var usage = rusage()
    getrusage(RUSAGE_SELF.rawValue, &usage)
    return Double(usage.ru_maxrss) / 1024
}

/// Runs one workload on `arch` at `size` x `size`: one warm-up, then the median of `repeats`.
public func benchmarkNetwork(_ arch: ArchitectureDescription, workload: NetworkWorkload, size: Int, repeats: Int) throws
    -> NetworkBenchResult
{
    let model = try DeepLabV3(arch, seed: 1)
    var rng = SeededGenerator(seed: 2)
    let x = Tensor.randn([workload.batch, 3, size, size], rng: &rng)
    let labels = Labels(
        shape: [workload.batch, size, size],
        values: (0..<(workload.batch * size * size)).map { _ in Int32(rng.next() % UInt64(arch.numClasses)) })
    let body: () -> Void
    switch workload {
    case .eval:
        model.eval()
        body = { _ = withNoGrad { model.run(x).logits } }
    case .train:
        model.train()
        body = {
            model.zeroGrad()
            crossEntropy(model.run(x).logits, labels).backward()
        }
    case .invert:
        model.eval()
        model.setRequiresGrad(false)
        x.requiresGrad = true
        body = {
            x.grad = nil
            sum(model.run(x).logits).backward()
        }
    }
    body()
    Profiler.startCountingFlops()
    body()
    let flops = Profiler.stopCountingFlops()
    TensorStorage.resetPeakBytes()
    let seconds = medianSeconds(repeats: repeats, body)
    return NetworkBenchResult(
        medianSeconds: seconds, gflopPerRun: flops / 1e9, peakResidentMB: peakResidentMB(),
        tensorPeakMB: Double(TensorStorage.peakBytes) / 1_048_576)
}
