import Foundation

/// Runs `body(range)` over `0..<count` split into contiguous blocks, on all cores when the
/// work is large enough. Each index is handled by exactly one block, so results never depend
/// on the thread count.
@inline(__always)
public func parallelBlocks(_ count: Int, minBlock: Int = 1, _ body: (Range<Int>) -> Void) {
    guard count > 0 else { return }
    let workers = ParallelConfig.threads
    let blocks = min(workers, max(1, count / max(minBlock, 1)))
    if blocks <= 1 {
        body(0..<count)
        return
    }
    let base = count / blocks, extra = count % blocks
    DispatchQueue.concurrentPerform(iterations: blocks) { b in
        let start = b * base + min(b, extra)
        let end = start + base + (b < extra ? 1 : 0)
        body(start..<end)
    }
}

/// Elementwise loops below this many elements stay on one thread.
let parallelGrain = 1 << 15

public enum ParallelConfig {
    /// Worker threads for the toolkit's own kernels: the active core count.
    nonisolated(unsafe) public static var threads = ProcessInfo.processInfo.activeProcessorCount
}
