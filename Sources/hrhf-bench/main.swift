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

    func run() throws {
        setComputeThreads(threads)
        print("hrhf-bench: \(threads) thread(s), batch \(batch), median of \(repeats) runs after warm-up")
        let sgemm = measureSgemmGFLOPS()
        print(String(format: "sgemm 2048^3: %.1f GFLOP/s (the baseline below)", sgemm))
        print("")
        let header = ["convolution", "fwd ms", "fwd GFLOP/s", "fwd/sgemm", "bwd ms", "bwd GFLOP/s", "bwd/sgemm"]
        var rows: [[String]] = []
        var missed: [String] = []
        for var bc in ConvBenchCase.deepLab256 {
            bc.batch = batch
            let r = benchmarkConvolution(bc, repeats: repeats)
            let f = r.forwardGFLOPS / sgemm, b = r.backwardGFLOPS / sgemm
            rows.append([bc.name, String(format: "%.2f", r.forwardSeconds * 1e3), String(format: "%.1f", r.forwardGFLOPS),
                         String(format: "%.0f%%", f * 100), String(format: "%.2f", r.backwardSeconds * 1e3),
                         String(format: "%.1f", r.backwardGFLOPS), String(format: "%.0f%%", b * 100)])
            if bc.kernel == 3 && (f < 0.6 || b < 0.5) { missed.append(bc.name) }
        }
        print(formatTable(header: header, rows: rows))
        print("")
        print("target: 3x3 convolutions forward >= 60% and backward >= 50% of sgemm: "
              + (missed.isEmpty ? "met" : "missed by \(missed.joined(separator: ", "))"))
    }
}

Bench.main()
