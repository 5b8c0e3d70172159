import COpenBLAS
import Foundation

/// C = alpha * op(A) * op(B) + beta * C, row-major. OpenBLAS runs single-threaded (see
/// `blasConfigured`): the convolutions split their products between the toolkit's own
/// threads, which keeps both cores busy through im2col, col2im and bias passes too.
@inline(__always)
func sgemm(
    transA: Bool = false, transB: Bool = false, m: Int, n: Int, k: Int, alpha: Float = 1,
    a: UnsafePointer<Float>, lda: Int, b: UnsafePointer<Float>, ldb: Int, beta: Float = 0,
    c: UnsafeMutablePointer<Float>, ldc: Int
) {
    _ = blasConfigured
    cblas_sgemm(
        CblasRowMajor, transA ? CblasTrans : CblasNoTrans, transB ? CblasTrans : CblasNoTrans,
        blasint(m), blasint(n), blasint(k), alpha, a, blasint(lda), b, blasint(ldb), beta,
        c, blasint(ldc))
}

/// Set once, before the first product: OpenBLAS's kernels chosen for this CPU
/// (`OpenBLASKernels`), and one OpenBLAS thread, since its own threads would fight the toolkit's.
let blasConfigured: Void = {
    OpenBLASKernels.selectForThisCPU()
    openblas_set_num_threads(1)
}()

/// Runs `body` with OpenBLAS on `threads` threads (the sgemm reference rate of the benchmarks).
public func withBLASThreads<T>(_ threads: Int, _ body: () -> T) -> T {
    _ = blasConfigured
    openblas_set_num_threads(Int32(threads))
    defer { openblas_set_num_threads(1) }
    return body()
}

/// Which of OpenBLAS's kernels run the products. A DYNAMIC_ARCH OpenBLAS picks them by CPU
/// model, and one older than the CPU does not know it: Debian 12's 0.3.21 takes this
/// machine's Xeon (family 6, model 207, AVX-512) for a Prescott and runs SSE3 kernels, 4-5x
/// slower than its AVX-512 ones (sgemm 13-16 against 35-80 GFLOP/s on one core, at the
/// shapes of the zoo model's convolutions and at 1024^3). When OpenBLAS fell back to Prescott,
/// the kernels are chosen again by the CPU's features instead; an `OPENBLAS_CORETYPE` the user
/// set is kept.
public enum OpenBLASKernels {
    /// The kernels OpenBLAS runs, by its name for them ("SkylakeX", "Haswell", "Prescott").
    public static var coreName: String {
        _ = blasConfigured
        return openblas_get_corename().map { String(cString: $0) } ?? "unknown"
    }

    /// The kernels to ask for instead of `detected` on a CPU with `cpuFlags` (/proc/cpuinfo's
    /// names), or nil to keep them: only OpenBLAS's fallback for an unknown x86-64 CPU is replaced.
    static func replacement(detected: String, cpuFlags: Set<String>) -> String? {
        guard detected == "Prescott" else { return nil }
        if cpuFlags.isSuperset(of: ["avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"]) { return "SkylakeX" }
        if cpuFlags.isSuperset(of: ["avx2", "fma"]) { return "Haswell" }
        return nil
    }

    /// The feature flags of the first CPU in /proc/cpuinfo (empty where there is none).
    static func cpuFlags() -> Set<String> {
        guard let info = try? String(contentsOfFile: "/proc/cpuinfo", encoding: .utf8),
            let line = info.split(separator: "\n").first(where: { $0.hasPrefix("flags") }),
            let colon = line.firstIndex(of: ":")
        else { return [] }
        return Set(line[line.index(after: colon)...].split(separator: " ").map(String.init))
    }

    /// Re-runs OpenBLAS's kernel selection with `OPENBLAS_CORETYPE` set when `replacement` says
    /// so (through its exported gotoblas_dynamic_quit/init, which a build without DYNAMIC_ARCH
    /// lacks: then nothing changes). Runs once, before the first product; the variable is unset
    /// again so the process's environment stays the user's.
    static func selectForThisCPU() {
        guard ProcessInfo.processInfo.environment["OPENBLAS_CORETYPE"] == nil,
            let detected = openblas_get_corename().map({ String(cString: $0) }),
            let core = replacement(detected: detected, cpuFlags: cpuFlags()),
            let quit = dlsym(nil, "gotoblas_dynamic_quit"), let initialise = dlsym(nil, "gotoblas_dynamic_init")
        else { return }
        typealias Entry = @convention(c) () -> Void
        setenv("OPENBLAS_CORETYPE", core, 1)
        unsafeBitCast(quit, to: Entry.self)()
        unsafeBitCast(initialise, to: Entry.self)()
        unsetenv("OPENBLAS_CORETYPE")
    }
}
