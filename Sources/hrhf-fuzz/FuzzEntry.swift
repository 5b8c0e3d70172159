import Foundation
import HRHF

#if FUZZING
    import CLibFuzzer

    /// The harness libFuzzer drives, named by HRHF_FUZZ_TARGET (tools/fuzz.sh sets it).
    let fuzzTarget: FuzzTarget = {
        let name = ProcessInfo.processInfo.environment["HRHF_FUZZ_TARGET"] ?? ""
        guard let target = FuzzTarget(rawValue: name) else {
            fatalError("HRHF_FUZZ_TARGET must be one of \(FuzzTarget.allCases.map(\.rawValue)), not \"\(name)\"")
        }
        return target
    }()

    /// Refusals seen so far whose message does not name the file: printed once each, up to ten.
    nonisolated(unsafe) var unnamedRefusals = Set<String>()

    @_cdecl("LLVMFuzzerTestOneInput")
    public func fuzzOneInput(_ bytes: UnsafePointer<UInt8>?, _ count: Int) -> Int32 {
        let data = bytes.map { Data(bytes: $0, count: count) } ?? Data()
        switch fuzzTarget.run(data, name: "fuzz-input") {
        case .accepted:
            break
        case .refused(let message):
            if !message.contains("fuzz-input"), unnamedRefusals.count < 10, unnamedRefusals.insert(message).inserted {
                FileHandle.standardError.write(
                    Data("hrhf-fuzz: a refusal that does not name the file: \(message)\n".utf8))
            }
        case .violation(let problem):
            fatalError("hrhf-fuzz: \(problem)")
        }
        return 0
    }

    /// The entry point SwiftPM links as `main`: libFuzzer's driver with its command-line flags.
    @_cdecl("hrhf_fuzz_main")
    func fuzzMain(_ argc: Int32, _ argv: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?) -> Int32 {
        var count = argc, values = argv
        return LLVMFuzzerRunDriver(&count, &values, fuzzOneInput)
    }
#else
    /// Without -DFUZZING: `hrhf-fuzz TARGET FILE...` replays inputs (crash files, a corpus) through
    /// the same harness and prints what each did; exit status 1 if any broke a rule.
    @main
    struct FuzzReplay {
        static func main() {
            let arguments = CommandLine.arguments.dropFirst()
            let targets = FuzzTarget.allCases.map(\.rawValue).joined(separator: "|")
            let usage = """
                usage: hrhf-fuzz \(targets) FILE...
                Replays each FILE (a crash file, a corpus entry) through the reader's fuzz harness and prints
                whether it was accepted, refused with an error naming the file, or broke a rule (exit status 1).
                tools/fuzz.sh TARGET SECONDS builds the libFuzzer version and fuzzes.

                """
            if arguments.first == "--help" || arguments.first == "-h" {
                print(usage, terminator: "")
                return
            }
            guard let first = arguments.first, let target = FuzzTarget(rawValue: first), arguments.count >= 2 else {
                FileHandle.standardError.write(Data(usage.utf8))
                exit(2)
            }
            var failed = false
            for path in arguments.dropFirst() {
                let url = URL(fileURLWithPath: path)
                guard let data = try? Data(contentsOf: url) else {
                    print("\(path): cannot read")
                    failed = true
                    continue
                }
                switch target.run(data, name: url.lastPathComponent) {
                case .accepted: print("\(path): accepted")
                case .refused(let message): print("\(path): refused: \(message)")
                case .violation(let problem):
                    print("\(path): VIOLATION: \(problem)")
                    failed = true
                }
            }
            exit(failed ? 1 : 0)
        }
    }
#endif
