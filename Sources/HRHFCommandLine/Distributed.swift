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
