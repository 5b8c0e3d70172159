import CMPI
import Foundation

/// The processes of one job: a single process (rank 0 of 1, no MPI at all) or the MPI world when
/// the process was started by `mpirun`/`srun`. Every collective is called by all ranks in the
/// same order from the thread that owns the training loop (MPI is initialised FUNNELED).
public final class Communicator: @unchecked Sendable {
    public let rank: Int
    public let size: Int
    /// Nil for a process that was not started by an MPI launcher: no MPI call is ever made then.
    private let world: MPI_Comm?
    /// A duplicate of `world` for the gradient sums started during the backward pass: collectives
    /// on it match among themselves, never with the blocking ones the passes make meanwhile.
    private let gradientWorld: MPI_Comm?

    /// Bytes each rank handed to allreduce, the calls and the seconds spent in them (for reports
    /// and benchmarks).
    public private(set) var allreduceBytes = 0
    public private(set) var allreduceCalls = 0
    public private(set) var allreduceSeconds = 0.0

    /// Elements per MPI call: MPI counts are 32-bit, and a bucket of 2^24 floats (64 MiB) is
    /// large enough that latency is negligible next to transfer for any model (ResNet-101's
    /// 58 M parameters take four calls).
    public static let bucketElements = 1 << 24

    private init(rank: Int, size: Int, world: MPI_Comm?, gradientWorld: MPI_Comm?) {
        self.rank = rank
        self.size = size
        self.world = world
        self.gradientWorld = gradientWorld
    }

    /// One process, no MPI.
    public static let single = Communicator(rank: 0, size: 1, world: nil, gradientWorld: nil)

    /// This process's communicator: the MPI world (initialised on first use, finalised at exit)
    /// when a launcher started it, otherwise `single`.
    public static let current: Communicator = launchedByMPI(ProcessInfo.processInfo.environment) ? startMPI() : single

    /// Whether `environment` is that of a process started by Open MPI's `mpirun`, or by `srun`
    /// with PMIx or PMI-2: each sets the world size or rank for its processes.
    public static func launchedByMPI(_ environment: [String: String]) -> Bool {
        ["OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_SIZE"].contains { environment[$0] != nil }
    }

    private static func startMPI() -> Communicator {
        var provided: Int32 = 0
        guard MPI_Init_thread(nil, nil, HRHF_MPI_THREAD_FUNNELED, &provided) == HRHF_MPI_SUCCESS else {
            FileHandle.standardError.write(Data("error: MPI_Init_thread failed\n".utf8))
            exit(1)
        }
        let world = hrhf_mpi_comm_world()
        var rank: Int32 = 0, size: Int32 = 0
        MPI_Comm_rank(world, &rank)
        MPI_Comm_size(world, &size)
        var gradientWorld: MPI_Comm?
        guard MPI_Comm_dup(world, &gradientWorld) == HRHF_MPI_SUCCESS, let gradientWorld else {
            FileHandle.standardError.write(Data("error: MPI_Comm_dup failed\n".utf8))
            MPI_Abort(world, 1)
            exit(1)
        }
        // A clean exit finalises; failures end the job through `abort` instead.
        atexit { MPI_Finalize() }
        return Communicator(rank: Int(rank), size: Int(size), world: world, gradientWorld: gradientWorld)
    }

    public var isRoot: Bool { rank == 0 }

    /// Prints `message` naming this rank and ends every process of the job (MPI_Abort), so no
    /// rank waits forever in a collective for one that has failed. A single process just exits.
    public func abort(_ message: String) -> Never {
        let text = size > 1 ? "error: rank \(rank) of \(size): \(message)\n" : "error: \(message)\n"
        _ = text.withCString { write(Communicator.errorDescriptor, $0, strlen($0)) }
        if let world { MPI_Abort(world, 1) }
        exit(1)
    }

    /// Where `abort` writes: the standard error this process started with, even when
    /// `quietUnlessRoot` has silenced it.
    nonisolated(unsafe) private static var errorDescriptor = STDERR_FILENO

    /// Sends the standard output and error of ranks other than 0 to /dev/null, so a job prints
    /// one progress line and one report (`HRHF_ALL_RANKS_OUTPUT=1` keeps them all).
    public func quietUnlessRoot() {
        guard !isRoot, ProcessInfo.processInfo.environment["HRHF_ALL_RANKS_OUTPUT"] != "1" else { return }
        let null = open("/dev/null", O_WRONLY), saved = dup(STDERR_FILENO)
        guard null >= 0, saved >= 0 else { return }
        Communicator.errorDescriptor = saved
        dup2(null, STDOUT_FILENO)
        dup2(null, STDERR_FILENO)
        close(null)
    }

    private func check(_ code: Int32, _ call: String) {
        if code != HRHF_MPI_SUCCESS { abort("\(call) failed with MPI error \(code)") }
    }

    private func allreduceSum(_ base: UnsafeMutableRawPointer, count: Int, stride: Int, type: MPI_Datatype) {
        guard let world, size > 1, count > 0 else { return }
        let start = Date()
        var done = 0
        while done < count {
            let n = min(Communicator.bucketElements, count - done)
            check(
                MPI_Allreduce(hrhf_mpi_in_place(), base + done * stride, Int32(n), type, hrhf_mpi_sum(), world),
                "MPI_Allreduce")
            done += n
        }
        allreduceCalls += (count + Communicator.bucketElements - 1) / Communicator.bucketElements
        allreduceBytes += count * stride
        allreduceSeconds += Date().timeIntervalSince(start)
    }

    /// Replaces every element by its sum over all ranks, in place.
    public func allreduceSum(_ buffer: UnsafeMutableBufferPointer<Float>) {
        guard let base = buffer.baseAddress else { return }
        allreduceSum(base, count: buffer.count, stride: MemoryLayout<Float>.stride, type: hrhf_mpi_float())
    }

    public func allreduceSum(_ buffer: UnsafeMutableBufferPointer<Double>) {
        guard let base = buffer.baseAddress else { return }
        allreduceSum(base, count: buffer.count, stride: MemoryLayout<Double>.stride, type: hrhf_mpi_double())
    }

    public func allreduceSum(_ values: inout [Double]) { values.withUnsafeMutableBufferPointer { allreduceSum($0) } }

    public func allreduceSum(_ values: inout [Int]) {
        var wide = values.map { Int64($0) }
        wide.withUnsafeMutableBufferPointer { buffer in
            guard let base = buffer.baseAddress else { return }
            allreduceSum(base, count: buffer.count, stride: MemoryLayout<Int64>.stride, type: hrhf_mpi_int64())
        }
        values = wide.map { Int($0) }
    }

    /// The sum of `value` over all ranks.
    public func sum(_ value: Double) -> Double {
        var v = [value]
        allreduceSum(&v)
        return v[0]
    }

    /// A sum over ranks started by `startAllreduceSum`, complete once `poll` says so or `wait` returns.
    public struct PendingSum {
        fileprivate var requests: [MPI_Request?] = []
    }

    /// Starts replacing every element of `buffer` by its sum over all ranks (MPI_Iallreduce on
    /// the gradient communicator, in calls of at most `bucketElements`) and returns at once.
    /// Every rank starts its sums in the same order; `buffer` stays untouched until complete.
    public func startAllreduceSum(_ buffer: UnsafeMutableBufferPointer<Float>) -> PendingSum {
        var pending = PendingSum()
        guard let gradientWorld, size > 1, let base = buffer.baseAddress else { return pending }
        let start = Date()
        var done = 0
        while done < buffer.count {
            let n = min(Communicator.bucketElements, buffer.count - done)
            var request = hrhf_mpi_request_null()
            check(
                MPI_Iallreduce(
                    hrhf_mpi_in_place(), base + done, Int32(n), hrhf_mpi_float(), hrhf_mpi_sum(), gradientWorld,
                    &request),
                "MPI_Iallreduce")
            pending.requests.append(request)
            done += n
        }
        allreduceCalls += pending.requests.count
        allreduceBytes += buffer.count * MemoryLayout<Float>.stride
        allreduceSeconds += Date().timeIntervalSince(start)
        return pending
    }

    /// Lets MPI move `pending` on (with no progress thread, a started collective advances only
    /// inside MPI calls); returns whether it is complete.
    @discardableResult
    public func poll(_ pending: inout PendingSum) -> Bool {
        let start = Date()
        for i in pending.requests.indices where pending.requests[i] != nil {
            var done: Int32 = 0
            check(MPI_Test(&pending.requests[i], &done, nil), "MPI_Test")
            if done == 0 { break }
            pending.requests[i] = nil
        }
        pending.requests.removeAll { $0 == nil }
        allreduceSeconds += Date().timeIntervalSince(start)
        return pending.requests.isEmpty
    }

    /// Waits until `pending` is complete (the seconds count as time in allreduce).
    public func wait(_ pending: inout PendingSum) {
        let start = Date()
        for i in pending.requests.indices { check(MPI_Wait(&pending.requests[i], nil), "MPI_Wait") }
        pending.requests = []
        allreduceSeconds += Date().timeIntervalSince(start)
    }

    /// Waits until every rank has arrived.
    public func barrier() {
        guard let world, size > 1 else { return }
        check(MPI_Barrier(world), "MPI_Barrier")
    }

    /// Rank 0's `data` on every rank.
    public func broadcast(_ data: Data) -> Data {
        guard let world, size > 1 else { return data }
        var length = [Int64(data.count)]
        check(MPI_Bcast(&length, 1, hrhf_mpi_int64(), 0, world), "MPI_Bcast")
        guard let count = Int32(exactly: length[0]) else {
            abort("broadcast of \(length[0]) bytes exceeds MPI's count")
        }
        var bytes = isRoot ? [UInt8](data) : [UInt8](repeating: 0, count: Int(count))
        check(MPI_Bcast(&bytes, count, hrhf_mpi_byte(), 0, world), "MPI_Bcast")
        return Data(bytes)
    }

    /// Every rank's `data`, in rank order, on rank 0; nil on the other ranks.
    public func gather(_ data: Data) -> [Data]? {
        guard let world, size > 1 else { return [data] }
        guard let mine = Int32(exactly: data.count) else { abort("gather of \(data.count) bytes exceeds MPI's count") }
        var lengths = [Int32](repeating: 0, count: size)
        var own = [mine]
        check(MPI_Gather(&own, 1, hrhf_mpi_int32(), &lengths, 1, hrhf_mpi_int32(), 0, world), "MPI_Gather")
        var offsets = [Int32](repeating: 0, count: size)
        var total: Int32 = 0
        for r in 0..<size {
            offsets[r] = total
            let (next, overflow) = total.addingReportingOverflow(lengths[r])
            if overflow { abort("gather of more than 2 GiB exceeds MPI's count") }
            total = next
        }
        var received = [UInt8](repeating: 0, count: isRoot ? Int(total) : 0)
        var sent = [UInt8](data)
        check(
            MPI_Gatherv(&sent, mine, hrhf_mpi_byte(), &received, &lengths, &offsets, hrhf_mpi_byte(), 0, world),
            "MPI_Gatherv")
        guard isRoot else { return nil }
        return (0..<size).map { Data(received[Int(offsets[$0])..<Int(offsets[$0] + lengths[$0])]) }
    }
}
