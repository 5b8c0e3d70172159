import Foundation

/// The class of each pixel (argmax over channels) of every image in a batch of logits.
public func argmaxMasks(_ logits: Tensor) -> [IndexMask] {
    let (n, _, h, w) = nchw(logits, "argmax")
    let indices = channelArgmax(logits).indices
    return (0..<n).map { b in
        IndexMask(width: w, height: h, values: indices[(b * h * w)..<((b + 1) * h * w)].map { UInt16($0) })
    }
}

/// The image with each labelled pixel blended half and half with its class colour
/// (background 0 and ignore 255 left as they are). `name` is what an error calls the mask.
public func overlay(
    _ image: RGBImage, _ mask: IndexMask, palette: [UInt8] = vocPalette,
    name: String = "mask"
) throws -> RGBImage {
    guard image.width == mask.width, image.height == mask.height, mask.values.count * 3 == image.pixels.count else {
        throw ImageError(
            file: name,
            "mask is \(mask.width)x\(mask.height) but its image is \(image.width)x\(image.height)")
    }
    guard palette.count == 768 else {
        throw ImageError(file: name, "a palette needs 256 RGB triples, got \(palette.count) bytes")
    }
    var out = image
    for i in 0..<mask.values.count {
        let k = Int(mask.values[i])
        guard k != 0 && k != 255 else { continue }
        for ch in 0..<3 {
            out.pixels[3 * i + ch] = UInt8((Int(image.pixels[3 * i + ch]) + Int(palette[3 * (k % 256) + ch]) + 1) / 2)
        }
    }
    return out
}

/// Evaluation-mode inference of a native model on images.
public struct Predictor {
    public let model: DeepLabV3
    public let card: ModelCard

    public init(model: DeepLabV3, card: ModelCard) {
        self.model = model
        self.card = card
        model.eval()
    }

    /// The normalised input (resized bilinearly to `size` when given) and the logits at the
    /// input's size.
    public func logits(for image: RGBImage, size: (Int, Int)? = nil, name: String = "image") throws -> (
        input: Tensor, logits: Tensor
    ) {
        try model.checkInput(height: size?.0 ?? image.height, width: size?.1 ?? image.width, name: name)
        var x = card.normalization.tensor(image)
        if let size { x = resizeBilinear(x, size: size) }
        let logits = withNoGrad { model.run(x).logits }
        return (x, logits)
    }
}
