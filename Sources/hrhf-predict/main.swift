import ArgumentParser
import Foundation
import HRHF
import HRHFCommandLine

struct Predict: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "hrhf-predict",
        abstract: "Segment images with a native model: palette masks, overlays, and optionally raw logits.")

    @Option(help: "A native model (.safetensors written by hrhf-convert or hrhf-train).")
    var model: String

    @Argument(help: "PNG or JPEG images.")
    var images: [String]

    @Option(help: "Directory for NAME_mask.png and NAME_overlay.png.")
    var out: String

    @Option(help: "Write the logits of all images as one float32 NCHW .npy (images must share a size).")
    var logits: String?

    @Option(help: "Resize inputs to HxW first (bilinear); by default images keep their size.")
    var size: String?

    @OptionGroup var compute: ComputeOptions

    func run() throws {
        compute.apply()
        guard !images.isEmpty else { throw ValidationError("give at least one image") }
        let (net, card) = try ModelFile.load(URL(fileURLWithPath: model))
        let predictor = Predictor(model: net, card: card)
        let size = try self.size.map(parseSize)
        let outDir = URL(fileURLWithPath: out)
        // Each image's outputs are named by its file's stem: one safe name per image, all different.
        let stems = images.map { URL(fileURLWithPath: $0).deletingPathExtension().lastPathComponent }
        var seen = Set<String>()
        for (path, stem) in zip(images, stems) {
            _ = try outputURL(in: outDir, name: stem, suffix: "_mask.png")
            guard seen.insert(stem).inserted else {
                throw DatasetError(
                    file: path,
                    "another image has the name \(stem): their outputs would overwrite each other")
            }
        }
        try FileManager.default.createDirectory(at: outDir, withIntermediateDirectories: true)
        var collected: [Tensor] = []
        var rows: [[String]] = []
        let progress = ProgressLine("predict", total: images.count, unit: "img")
        for (i, path) in images.enumerated() {
            let url = URL(fileURLWithPath: path)
            var image = try ImageIO.readRGB(url)
            let (input, output) = try predictor.logits(for: image, size: size, name: path)
            if size != nil { image = card.normalization.image(input) }
            let mask = argmaxMasks(output)[0]
            let stem = stems[i]
            try ImageIO.writePalettePNG(mask, to: try outputURL(in: outDir, name: stem, suffix: "_mask.png"))
            try ImageIO.writePNG(
                try overlay(image, mask, name: path),
                to: try outputURL(in: outDir, name: stem, suffix: "_overlay.png"))
            if logits != nil { collected.append(output) }
            var counts = [Int](repeating: 0, count: card.classes.count)
            for v in mask.values { counts[Int(v)] += 1 }
            let top = counts.enumerated().filter { $0.element > 0 }.sorted { $0.element > $1.element }.prefix(3)
                .map {
                    String(
                        format: "%@ %.0f%%", card.classNames[$0.offset],
                        100 * Double($0.element) / Double(mask.values.count))
                }
            rows.append([stem, "\(mask.width)x\(mask.height)", top.joined(separator: ", ")])
            progress.update(i + 1)
        }
        progress.finish()
        if let logits {
            guard collected.allSatisfy({ $0.shape == collected[0].shape }) else {
                throw ValidationError("--logits needs images of one size (or --size)")
            }
            try NPY.write(concatBatch(collected), to: URL(fileURLWithPath: logits))
        }
        print(formatTable(header: ["image", "size", "largest classes"], rows: rows))
        if let logits { print("logits: \(logits)") }
        print("masks and overlays: \(out)")
    }
}

Predict.main()
