import ArgumentParser
import Foundation
import HRHF
import HRHFCommandLine

struct Bench: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "hrhf-bench",
        abstract: "Kernel rates of this machine: sgemm, and DeepLabV3's convolutions as a fraction of it.")

    @Option(help: "Threads for OpenBLAS and the toolkit's kernels (default: all cores).")
    var threads: Int = ProcessInfo.processInfo.activeProcessorCount

    @Option(help: "Timed runs per measurement (the median is reported).")
    var repeats: Int = 5

    @Option(help: "Images per convolution call.")
    var batch: Int = 1

    @Option(
        help:
            "Instead of the kernel table, time one whole-network workload (eval, train or invert) of this architecture."
    )
    var network: String?

    @Option(
        help:
            "The workload for --network: eval (batch 1), train (forward+backward, batch 2), invert (input gradient, batch 4)."
    )
    var workload: String = "eval"

    @Option(help: "Image side for --network.")
    var size: Int = 256

    @Option(
        help: .init(
            "Instead, time one iteration of a job of the zoo model: synth (batch 8), mib (16 images) "
                + "or hrhf+gsc (8 real + 8 fake)."))
    var job: String?

    @Option(help: "The model of --job.")
    var model: String = "zoo/shapes-15-5-step0.safetensors"

    @Option(help: "A Shapes root (hrhf-data shapes) for --job mib and hrhf+gsc.")
    var data: String?

    @Option(help: "A synthetic pack for --job hrhf+gsc.")
    var pack: String?

    @Option(
        help: .init(
            "Write the first iteration's inputs and loss of --job to this directory "
                + "(for tools/bench_small_torch.py)."))
    var dump: String?

    @Flag(
        help: .init(
            "With --job: after the timing, a table of where an iteration's time goes by op kind "
                + "(mean of --repeats)."))
    var profile = false

    func run() throws {
        setComputeThreads(threads)
        if let job {
            guard let j = BenchJob(rawValue: job) else { throw ValidationError("--job must be synth, mib or hrhf+gsc") }
            try runJob(j)
            return
        }
        if let network {
            guard let w = NetworkWorkload(rawValue: workload) else {
                throw ValidationError("--workload must be eval, train or invert")
            }
            var arch = try ArchitectureDescription.resolve(network)
            arch.classesPerStep = [21]
            // The reference rate before and after the workload, the better of the two: the
            // machine's speed drifts, and the share should not exceed 100% on a slow minute.
            let before = measureSgemmGFLOPS()
            let r = try benchmarkNetwork(arch, workload: w, size: size, repeats: repeats)
            let sgemm = max(before, measureSgemmGFLOPS())
            // One machine-readable line, for tools/bench-vs-torch.sh.
            print(
                String(
                    format:
                        "hrhf %@ %@ batch=%d seconds=%.4f gflop=%.2f gflops=%.1f sgemm=%.1f peak_mb=%.0f tensor_peak_mb=%.0f",
                    network, workload, w.batch, r.medianSeconds, r.gflopPerRun, r.gflopPerRun / r.medianSeconds, sgemm,
                    r.peakResidentMB, r.tensorPeakMB))
            return
        }
        print("hrhf-bench: \(threads) thread(s), batch \(batch), median of \(repeats) runs after warm-up")
        let sgemm = measureSgemmGFLOPS()
        print(
            String(
                format: "sgemm 2048^3: %.1f GFLOP/s (the baseline below; OpenBLAS's %@ kernels)", sgemm,
                OpenBLASKernels.coreName))
        print("")
        let header = ["convolution", "fwd ms", "fwd GFLOP/s", "fwd/sgemm", "bwd ms", "bwd GFLOP/s", "bwd/sgemm"]
        var rows: [[String]] = []
        var missed: [String] = []
        for var bc in ConvBenchCase.deepLab256 {
            bc.batch = batch
            let r = benchmarkConvolution(bc, repeats: repeats)
            let f = r.forwardGFLOPS / sgemm, b = r.backwardGFLOPS / sgemm
            rows.append([
                bc.name, String(format: "%.2f", r.forwardSeconds * 1e3), String(format: "%.1f", r.forwardGFLOPS),
                String(format: "%.0f%%", f * 100), String(format: "%.2f", r.backwardSeconds * 1e3),
                String(format: "%.1f", r.backwardGFLOPS), String(format: "%.0f%%", b * 100),
            ])
            if bc.kernel == 3 && (f < 0.6 || b < 0.5) { missed.append(bc.name) }
        }
        print(formatTable(header: header, rows: rows))
        print("")
        // Batch 2 at layer 1 of ResNet-50 (the training workload's largest normalisations).
        let norm = benchmarkBatchNormReLU(shape: [2, 256, 64, 64], repeats: repeats)
        print(
            String(
                format: "batch norm + ReLU, training, 2x256x64x64: forward %.2f ms, backward %.2f ms "
                    + "(%.1f and %.1f times one parallel copy of the tensor, %.2f ms)",
                norm.forwardSeconds * 1e3, norm.backwardSeconds * 1e3, norm.forwardSeconds / norm.copySeconds,
                norm.backwardSeconds / norm.copySeconds, norm.copySeconds * 1e3))
        print("")
        print(
            "target: 3x3 convolutions forward >= 60% and backward >= 50% of sgemm: "
                + (missed.isEmpty ? "met" : "missed by \(missed.joined(separator: ", "))"))
    }

    func runJob(_ job: BenchJob) throws {
        let bench = try JobBenchmark(
            job: job, model: URL(fileURLWithPath: model),
            data: data.map { URL(fileURLWithPath: $0) },
            pack: pack.map { URL(fileURLWithPath: $0) })
        if let dump { try bench.dump(to: URL(fileURLWithPath: dump)) }
        var failure: Error?
        let seconds = medianSeconds(repeats: repeats) {
            do { try bench.run() } catch { failure = failure ?? error }
        }
        if let failure { throw failure }
        // One machine-readable line, for tools/bench-vs-torch.sh.
        print(
            String(
                format: "hrhf %@ batch=%d seconds=%.4f it_per_s=%.3f", job.rawValue, bench.batch, seconds,
                1 / seconds))
        guard profile else { return }
        Profiler.start()
        for _ in 0..<max(repeats, 1) { try bench.run() }
        let perIteration = Profiler.stop().mapValues { $0 / Double(max(repeats, 1)) }
        print(
            "\n\(job.rawValue): one iteration by op kind (mean of \(max(repeats, 1)); "
                + "backward counted with its forward's kind)")
        print(profileTable(perIteration))
        let tally = Profiler.convolutionTally
        print("\n\(job.rawValue): its convolutions by shape, per iteration (wall time of each kernel call)")
        print(convolutionTable(tally, iterations: max(repeats, 1), sgemm: measureSgemmGFLOPS()))
    }
}

Bench.main()
