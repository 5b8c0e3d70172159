import ArgumentParser
import Foundation
import HRHF
import HRHFCommandLine

struct Convert: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "hrhf-convert",
        abstract: "Convert a PyTorch DeepLabV3 checkpoint (.pth zip or legacy, or safetensors) into a native model.")

    @Argument(help: "The checkpoint to convert.")
    var input: String?

    @Option(help: "Architecture preset (see --list-archs) or a description JSON file.")
    var arch: String?

    @Option(help: "auto, torchvision or mib.")
    var flavor: String = "auto"

    @Option(name: .customLong("output-stride"), help: "Output stride the weights were trained for (8 or 16).")
    var outputStride: Int?

    @Option(help: "Class names: voc, ade, cityscapes, shapes, or a comma-separated list.")
    var classes: String = "voc"

    @Option(name: .customLong("step-classes"), help: "Outputs added per incremental step, e.g. 16,1,1,1,1.")
    var stepClasses: String?

    @Option(name: .customLong("allow-missing"), help: "Keys the checkpoint may lack (pattern with *), repeatable.")
    var allowMissing: [String] = []

    @Option(name: .customLong("allow-unexpected"), help: "Checkpoint keys to drop (pattern with *), repeatable.")
    var allowUnexpected: [String] = []

    @Option(help: "Where to write the native model (.safetensors).")
    var out: String?

    @Flag(name: .customLong("list-archs"), help: "List the known architectures and class lists.")
    var listArchs = false

    @Option(
        name: .customLong("write-cards"),
        help: "Write a JSON card per architecture and class list into DIR (the zoo's cards).")
    var writeCards: String?

    func run() throws {
        if listArchs {
            print(architectureListing())
            return
        }
        if let writeCards {
            let written = try writeZooCards(to: URL(fileURLWithPath: writeCards))
            print("wrote \(written.count) cards to \(writeCards)")
            return
        }
        guard let input, let arch, let out else {
            throw ValidationError("give a checkpoint, --arch and --out (or --list-archs)")
        }
        let flavorValue: ArchitectureDescription.Flavor?
        switch flavor {
        case "auto": flavorValue = nil
        default:
            guard let f = ArchitectureDescription.Flavor(rawValue: flavor) else {
                throw ValidationError("--flavor must be auto, torchvision or mib")
            }
            flavorValue = f
        }
        let options = ConversionOptions(
            architecture: try ArchitectureDescription.resolve(arch), flavor: flavorValue, outputStride: outputStride,
            classNames: DatasetClasses.resolve(classes), stepClasses: try stepClasses.map(parseIntList),
            allowMissing: allowMissing, allowUnexpected: allowUnexpected)
        let start = Date()
        let (model, card, report) = try Converter.convert(URL(fileURLWithPath: input), options)
        try ModelFile.save(model, card: card, to: URL(fileURLWithPath: out))
        let seconds = Date().timeIntervalSince(start)
        print(conversionSummary(report, card: card, out: out, seconds: seconds))
    }
}

Convert.main()
