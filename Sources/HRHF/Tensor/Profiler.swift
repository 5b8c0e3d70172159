import Foundation

/// What a span of time was spent on, in `hrhf-bench --profile`'s table.
public enum ProfileKind: Int, CaseIterable, Sendable {
    case convolution, batchNorm, elementwise, loss, data, optimizer, other

    public var title: String {
        switch self {
        case .convolution: "convolutions"
        case .batchNorm: "batch norm"
        case .elementwise: "elementwise (activations, pooling, resize, concat)"
        case .loss: "loss terms"
        case .data: "data loading and augmentation"
        case .optimizer: "optimiser"
        case .other: "other (graph walk, bookkeeping)"
        }
    }
}

/// Where the time of a job goes, by op kind; off unless a benchmark turns it on. Time is
/// exclusive: a span counts for the innermost region open. Regions are explicit (data, loss,
/// optimiser, a network's forward) or op hooks (convolution, batch norm), which only count
/// inside a network's forward, so the ops a loss term runs stay loss. Backward steps count for
/// the kind that was current when their op was recorded. Single-threaded use: the op entry
/// points and the tape run on the calling thread (kernels parallelise inside an op).
public enum Profiler {
    nonisolated(unsafe) public private(set) static var isEnabled = false
    nonisolated(unsafe) private static var stack: [ProfileKind] = []
    nonisolated(unsafe) private static var mark: UInt64 = 0
    nonisolated(unsafe) private static var nanoseconds = [UInt64](repeating: 0, count: ProfileKind.allCases.count)

    /// Starts counting from zero; time outside every region is `other`.
    public static func start() {
        nanoseconds = [UInt64](repeating: 0, count: ProfileKind.allCases.count)
        stack = [.other]
        convolutionCalls = [:]
        mark = DispatchTime.now().uptimeNanoseconds
        isEnabled = true
    }

    /// Stops counting and returns the seconds per kind.
    public static func stop() -> [ProfileKind: Double] {
        charge()
        isEnabled = false
        stack = []
        let seconds = ProfileKind.allCases.map { ($0, Double(nanoseconds[$0.rawValue]) / 1e9) }
        return Dictionary(uniqueKeysWithValues: seconds)
    }

    /// Charges the time since the last change of region to the current kind.
    private static func charge() {
        let now = DispatchTime.now().uptimeNanoseconds
        if let top = stack.last { nanoseconds[top.rawValue] += now &- mark }
        mark = now
    }

    /// Runs `body` as an explicit region of `kind` (data, loss, optimiser).
    @inline(__always)
    public static func region<T>(_ kind: ProfileKind, _ body: () throws -> T) rethrows -> T {
        guard isEnabled else { return try body() }
        charge()
        stack.append(kind)
        defer {
            charge()
            stack.removeLast()
        }
        return try body()
    }

    /// A network's forward: its convolutions and batch norms count as such, the rest as elementwise.
    @inline(__always)
    public static func network<T>(_ body: () throws -> T) rethrows -> T { try region(.elementwise, body) }

    /// An op entry point's hook: `kind` counts only inside a network's forward.
    @inline(__always)
    static func op<T>(_ kind: ProfileKind, _ body: () throws -> T) rethrows -> T {
        guard isEnabled, stack.last == .elementwise else { return try body() }
        return try region(kind, body)
    }

    /// Multiply-adds times two of the convolutions run since `startCountingFlops` (whole-network
    /// throughput figures); convolutions run one at a time, so a plain tally.
    nonisolated(unsafe) public private(set) static var convolutionFlops: Double = 0
    nonisolated(unsafe) private static var countsFlops = false

    public static func startCountingFlops() {
        convolutionFlops = 0
        countsFlops = true
    }

    /// Stops counting and returns the FLOPs counted.
    public static func stopCountingFlops() -> Double {
        countsFlops = false
        return convolutionFlops
    }

    /// A convolution's hook: its work, counted while `startCountingFlops` is in effect.
    @inline(__always)
    static func convolution(flops: @autoclosure () -> Double) {
        if countsFlops { convolutionFlops += flops() }
    }

    /// The kind a backward step of an op recorded now is charged to.
    static var recordingKind: ProfileKind { stack.last ?? .other }

    /// Wall time of each convolution kernel call by shape and pass, while enabled (the second
    /// table of `hrhf-bench --profile`: which layers the convolution time is).
    nonisolated(unsafe) private static var convolutionCalls: [ConvolutionShape: ConvolutionTally] = [:]

    /// Runs one convolution pass, timed under its shape while the profiler is on.
    @inline(__always)
    static func convolutionPass<T>(_ pass: ConvolutionPass, _ geo: Conv2dGeometry, batch: Int, _ body: () -> T) -> T {
        guard isEnabled else { return body() }
        let start = DispatchTime.now().uptimeNanoseconds
        let result = body()
        let shape = ConvolutionShape(geometry: geo, batch: batch)
        convolutionCalls[shape, default: ConvolutionTally()].add(
            pass, nanoseconds: DispatchTime.now().uptimeNanoseconds &- start, flops: geo.flopsPerImage * Double(batch))
        return result
    }

    /// The convolution tally since `start`, cleared by the next `start`.
    public static var convolutionTally: [ConvolutionShape: ConvolutionTally] { convolutionCalls }
}

/// The three kernels of a convolution.
public enum ConvolutionPass: Int, CaseIterable, Sendable {
    case forward, inputGradient, weightGradient
}

/// A convolution call's shape: its geometry and batch.
public struct ConvolutionShape: Hashable, Sendable {
    public let geometry: Conv2dGeometry
    public let batch: Int

    /// "3x3 d4 s1 128->128 @16x16 b16", with "per tap" when it runs one product per tap.
    public var label: String {
        let g = geometry
        return "\(g.kernelH)x\(g.kernelW) d\(g.dilationH) s\(g.strideH) \(g.inChannels)->\(g.outChannels) "
            + "@\(g.inH)x\(g.inW) b\(batch)" + (g.groups > 1 ? " g\(g.groups)" : "") + (g.runsPerTap ? " per tap" : "")
    }
}

/// Calls, nanoseconds and FLOPs of one convolution shape, per pass.
public struct ConvolutionTally: Sendable {
    public private(set) var calls = [Int](repeating: 0, count: ConvolutionPass.allCases.count)
    public private(set) var nanoseconds = [UInt64](repeating: 0, count: ConvolutionPass.allCases.count)
    public private(set) var flops = [Double](repeating: 0, count: ConvolutionPass.allCases.count)

    mutating func add(_ pass: ConvolutionPass, nanoseconds ns: UInt64, flops f: Double) {
        calls[pass.rawValue] += 1
        nanoseconds[pass.rawValue] += ns
        flops[pass.rawValue] += f
    }

    public var totalSeconds: Double { Double(nanoseconds.reduce(0, +)) / 1e9 }
}

/// The convolutions of `iterations` profiled iterations by shape, slowest first: calls and
/// milliseconds per iteration of each pass, and the rate over all three against `sgemm` GFLOP/s.
public func convolutionTable(_ tally: [ConvolutionShape: ConvolutionTally], iterations: Int, sgemm: Double) -> String {
    let per = 1 / Double(max(iterations, 1))
    let total = tally.values.reduce(0) { $0 + $1.totalSeconds }
    let rows = tally.sorted { $0.value.totalSeconds > $1.value.totalSeconds }.map { shape, t -> [String] in
        let ms = ConvolutionPass.allCases.map { Double(t.nanoseconds[$0.rawValue]) / 1e6 * per }
        let gflops = t.flops.reduce(0, +) / max(t.totalSeconds, 1e-12) / 1e9
        return [
            shape.label, String(format: "%.0f", Double(t.calls.max() ?? 0) * per),
            String(format: "%.1f", ms[0]), String(format: "%.1f", ms[1]), String(format: "%.1f", ms[2]),
            String(format: "%.1f", t.totalSeconds * 1e3 * per),
            String(format: "%.0f%%", 100 * t.totalSeconds / max(total, 1e-12)),
            String(format: "%.0f", gflops), String(format: "%.0f%%", 100 * gflops / sgemm),
        ]
    }
    let allFlops = tally.values.reduce(0) { $0 + $1.flops.reduce(0, +) }
    let totalRow = [
        "total", "", "", "", "", String(format: "%.1f", total * 1e3 * per), "100%",
        String(format: "%.0f", allFlops / max(total, 1e-12) / 1e9),
        String(format: "%.0f%%", 100 * allFlops / max(total, 1e-12) / 1e9 / sgemm),
    ]
    return formatTable(
        header: ["convolution", "calls", "fwd ms", "bwd in ms", "bwd w ms", "ms", "share", "GFLOP/s", "of sgemm"],
        rows: rows + [totalRow])
}

/// The per-kind table of one profiled iteration, with each kind's share.
public func profileTable(_ seconds: [ProfileKind: Double]) -> String {
    let total = seconds.values.reduce(0, +)
    let rows = ProfileKind.allCases.map { kind -> [String] in
        let s = seconds[kind] ?? 0
        return [kind.title, String(format: "%.1f", s * 1e3), String(format: "%.0f%%", total > 0 ? 100 * s / total : 0)]
    }
    let totalRow = ["total", String(format: "%.1f", total * 1e3), "100%"]
    return formatTable(header: ["op kind", "ms", "share"], rows: rows + [totalRow])
}
