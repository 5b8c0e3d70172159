import Foundation

/// The old model's prediction on a batch: per pixel its softmax over the old classes, argmax and
/// maximum probability. A step computes it once from the old logits and hands it to every term
/// that reads it (sharpness mask, relation term, re-labelling, the fake half's labels), which
/// would otherwise each compute the same softmax again. Constants: no gradient flows into them.
public struct OldPrediction {
    /// Softmax over the channels of the whole batch's old logits (N x C x H x W).
    let wholeProbabilities: Tensor
    /// The images of the whole batch this prediction covers.
    let imageRange: Range<Int>
    /// Per pixel of those images (image-major, as the logits): the most probable class...
    public let argmax: [Int32]
    /// ...and its probability.
    public let confidence: [Float]

    /// From the old model's logits (N x C x H x W); the same values `channelArgmax(softmax(logits))` gives.
    public init(_ logits: Tensor) {
        _ = nchw(logits, "old prediction")
        (wholeProbabilities, argmax, confidence) = withNoGrad { softmaxWithArgmax(logits.detached()) }
        imageRange = 0..<logits.shape[0]
    }

    private init(probabilities: Tensor, imageRange: Range<Int>, argmax: [Int32], confidence: [Float]) {
        wholeProbabilities = probabilities
        self.imageRange = imageRange
        self.argmax = argmax
        self.confidence = confidence
    }

    /// The shape of the logits of the images covered (N x C x H x W).
    public var shape: [Int] {
        var shape = wholeProbabilities.shape
        shape[0] = imageRange.count
        return shape
    }

    /// The softmax of the images covered (copied out of the batch's when a part is covered).
    public var probabilities: Tensor {
        imageRange == 0..<wholeProbabilities.shape[0]
            ? wholeProbabilities : withNoGrad { sliceBatch(wholeProbabilities, imageRange) }
    }

    /// The prediction on images `range` of those covered (the argmax and confidence copied, the
    /// softmax copied only when read).
    public func images(_ range: Range<Int>) -> OldPrediction {
        precondition(range.lowerBound >= 0 && range.upperBound <= imageRange.count, "old prediction: images \(range)")
        let pixels = argmax.count / max(imageRange.count, 1)
        let pixelRange = (range.lowerBound * pixels)..<(range.upperBound * pixels)
        return OldPrediction(
            probabilities: wholeProbabilities,
            imageRange: (imageRange.lowerBound + range.lowerBound)..<(imageRange.lowerBound + range.upperBound),
            argmax: Array(argmax[pixelRange]), confidence: Array(confidence[pixelRange]))
    }

    /// The argmax where the probability is at least `threshold`, else 255 (N x H x W).
    public func confidentLabels(threshold: Float) -> Labels {
        let s = shape
        return Labels(shape: [s[0], s[2], s[3]], values: zip(argmax, confidence).map { $1 >= threshold ? $0 : 255 })
    }

    /// 1 where the probability is at least `threshold`, else 0 (N x 1 x H x W).
    public func confidenceMask(threshold: Float) -> Tensor {
        let s = shape
        return Tensor(shape: [s[0], 1, s[2], s[3]], values: confidence.map { $0 >= threshold ? 1 : 0 })
    }
}
