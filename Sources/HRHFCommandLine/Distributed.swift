import ArgumentParser
import Foundation
import HRHF

extension ParsableCommand {
    /// `main()` for commands that may run as one rank of an MPI job: ranks other than 0 print
    /// nothing, and a rank that fails prints its rank and error and ends the whole job
    /// (MPI_Abort) instead of leaving the others waiting in a collective.
    public static func mainAsRank() {
        let communicator = Communicator.current
        guard communicator.size > 1 else { return main() }
        communicator.quietUnlessRoot()
        do {
            var command = try parseAsRoot()
            try command.run()
        } catch {
            if exitCode(for: error).isSuccess {
                if communicator.isRoot { print(fullMessage(for: error)) }
                Foundation.exit(0)
            }
            let message = fullMessage(for: error)
            communicator.abort(message.hasPrefix("Error: ") ? String(message.dropFirst(7)) : message)
        }
    }
}

/// What this rank handed to allreduce so far (bytes and calls: gradients, losses, synchronised
/// batch-norm sums) and the time it spent there, per iteration of `iterations`.
public func allreduceSummary(_ communicator: Communicator, iterations: Int) -> String {
    let n = Double(max(iterations, 1))
    return String(
        format: "%.2f MB in %.1f calls, %.1f ms", Double(communicator.allreduceBytes) / 1e6 / n,
        Double(communicator.allreduceCalls) / n, communicator.allreduceSeconds * 1000 / n)
}
