import Foundation

// The losses of incremental steps (METHOD.md): MiB's unbiased cross-entropy and knowledge
// distillation, LwF's plain distillation, and GSC's gradient compensation, soft, sharp and
// relation terms. Logits are N x C x H x W; the old model's outputs are constants. Under data
// parallelism each rank passes its share of the batch and a `BatchReduction` that sums the
// batch-wide statistics (counts, group sums, class means) over the ranks: a term is then this
// rank's part of the whole batch's value, the parts adding up to it.

/// Negative log-likelihood of log-probabilities (N x C x H x W) at the labels, ignoring 255,
/// optionally weighted per pixel; mean over pixels not ignored (0 when there are none).
public func nllLoss(_ logProbs: Tensor, _ target: Labels, ignoreIndex: Int32 = 255, pixelWeights: Tensor? = nil)
    -> Tensor
{
    let (n, c, inner) = channelLayout(logProbs, "nll_loss")
    precondition(target.count == n * inner, "nll_loss: target \(target.shape) does not match \(logProbs.shape)")
    let labels = target.values
    let valid = labels.reduce(0) { $0 + ($1 == ignoreIndex ? 0 : 1) }
    let scale = valid > 0 ? 1 / Float(valid) : 0
    let weights = pixelWeights?.detached()
    var total = 0.0
    let px = logProbs.pointer
    for j in 0..<(n * inner) where labels[j] != ignoreIndex {
        let y = Int(labels[j])
        precondition(y >= 0 && y < c, "nll_loss: label \(y) outside 0..<\(c)")
        total -= Double(px[(j / inner * c + y) * inner + j % inner] * (weights?.pointer[j] ?? 1))
    }
    let out = Tensor(scalar: Float(total) * scale)
    let shape = logProbs.shape
    record(out, "nll_loss", [logProbs]) { g in
        let gx = Tensor(zeros: shape)
        for j in 0..<(n * inner) where labels[j] != ignoreIndex {
            gx.pointer[(j / inner * c + Int(labels[j])) * inner + j % inner] =
                -g.item * scale * (weights?.pointer[j] ?? 1)
        }
        return [gx]
    }
    return out
}

/// Negative log-likelihood in which label 0 stands for the union of the `merged` channels
/// (channel 0 among them) and labels 1..<kept for their own channels:
/// log p(union) = logsumexp over the merged channels - logsumexp over all.
/// `logSumExps`, when given, are the logits' over all channels and over `merged` (computed once per step).
func mergedBackgroundNLL(
    _ logits: Tensor, _ target: Labels, merged: [Range<Int>], kept: Int, pixelWeights: Tensor?,
    reduction: BatchReduction, logSumExps: ChannelSetLogSumExps? = nil
) -> Tensor {
    reduction.share(
        ofMean: channelSetNLL(
            logits, target, merged: merged, kept: kept, pixelWeights: pixelWeights, logSumExps: logSumExps),
        count: labelledPixels(target))
}

/// The channels the unbiased cross-entropy scores as background: background and the old classes.
func unbiasedBackground(oldClasses: Int) -> [Range<Int>] { [0..<oldClasses] }

/// The channels the folded cross-entropy and the unbiased KD score as background: background and the new classes.
func foldedBackground(oldClasses: Int, classes: Int) -> [Range<Int>] { [0..<1, oldClasses..<classes] }

/// The pixels of `labels` not ignored (255).
func labelledPixels(_ labels: Labels) -> Double { Double(labels.values.reduce(0) { $0 + ($1 == 255 ? 0 : 1) }) }

/// MiB's unbiased cross-entropy: the background's probability is that of background or any
/// old class (channels 0..<oldClasses), since old objects are labelled background in new
/// images. A pixel labelled with an old class (GSC's prototypical re-labelling) is scored on
/// that class alone; new classes (>= oldClasses) on theirs; 255 is ignored.
public func unbiasedCrossEntropy(
    _ logits: Tensor, _ target: Labels, oldClasses: Int, pixelWeights: Tensor? = nil,
    reduction: BatchReduction = .local
) -> Tensor {
    let c = logits.shape[1]
    precondition(oldClasses >= 1 && oldClasses < c, "unbiased CE: \(oldClasses) old of \(c) classes")
    return mergedBackgroundNLL(
        logits, target, merged: unbiasedBackground(oldClasses: oldClasses), kept: c, pixelWeights: pixelWeights,
        reduction: reduction)
}

/// Cross-entropy of fake images (old classes only) with the new classes folded into background,
/// as the unbiased KD beside it does: a synthetic background is no evidence about what the new
/// classes look like. Labels hold old classes (< oldClasses) or 255.
public func foldedCrossEntropy(
    _ logits: Tensor, _ target: Labels, oldClasses: Int, pixelWeights: Tensor? = nil,
    reduction: BatchReduction = .local
) -> Tensor {
    let c = logits.shape[1]
    precondition(oldClasses >= 1 && oldClasses < c, "folded CE: \(oldClasses) old of \(c) classes")
    return mergedBackgroundNLL(
        logits, target, merged: foldedBackground(oldClasses: oldClasses, classes: c), kept: oldClasses,
        pixelWeights: pixelWeights, reduction: reduction)
}

/// MiB's unbiased knowledge distillation: the new model's probabilities of background and the
/// new classes are summed into background, then compared with the old model's distribution:
/// -mean over pixels of (sum_c q_c log p'_c) / |old classes|, at temperature T on both sides.
public func unbiasedDistillation(
    _ newLogits: Tensor, _ oldLogits: Tensor, temperature: Float = 1, mask: Tensor? = nil,
    reduction: BatchReduction = .local
) -> Tensor {
    unbiasedDistillation(
        newLogits, oldLogits, temperature: temperature, mask: mask, reduction: reduction, logSumExps: nil)
}

/// `unbiasedDistillation` from the new logits' log-sum-exps over `foldedBackground` at 1 / T, when
/// given, and the old softmax at T 1 (`unbiasedDistillationLoss`), when given.
func unbiasedDistillation(
    _ newLogits: Tensor, _ oldLogits: Tensor, temperature: Float, mask: Tensor?, reduction: BatchReduction,
    logSumExps: ChannelSetLogSumExps?, oldSoftmax: (probabilities: Tensor, firstImage: Int)? = nil
) -> Tensor {
    precondition(oldLogits.shape[1] < newLogits.shape[1], "unbiased KD: the new model must have more classes")
    return reduction.share(
        ofMean: unbiasedDistillationLoss(
            newLogits, oldLogits, temperature: temperature, mask: mask, logSumExps: logSumExps,
            oldSoftmax: oldSoftmax),
        count: Double(mask?.array.reduce(0, +) ?? Float(newLogits.count / newLogits.shape[1])))
}

/// LwF's distillation as MiB implements it: the new model's log-softmax over the old classes
/// against the old model's softmax, averaged over classes and pixels.
public func plainDistillation(
    _ newLogits: Tensor, _ oldLogits: Tensor, temperature: Float = 1, reduction: BatchReduction = .local
) -> Tensor {
    let old = oldLogits.shape[1]
    let logP = logSoftmax(sliceChannels(newLogits, 0..<old) * (1 / temperature))
    let q = withNoGrad { softmax(oldLogits * (1 / temperature)) }
    return -sum(logP * q) * (1 / Float(reduction.total(Double(logP.count))))
}

/// GSC soft distillation: KL(old || new) between the temperature-softened distributions over
/// the old classes, on every pixel, times T^2.
public func softDistillation(
    _ newLogits: Tensor, _ oldLogits: Tensor, temperature: Float, reduction: BatchReduction = .local
) -> Tensor {
    gscTermSums(
        newLogits, oldLogits, channels: oldLogits.shape[1], GSCTermRequest(softTemperature: temperature)
    ).softDistillation(reduction: reduction)
}

/// GSC sharpness: the entropy of the new model's prediction, averaged over the pixels where
/// the old model is confident (max probability at least `confidence`); minimised. `oldPrediction`,
/// when given, is the old model's on these images (computed once per step), else it is computed here.
public func sharpEntropy(
    _ newLogits: Tensor, _ oldLogits: Tensor, confidence: Float, reduction: BatchReduction = .local,
    oldPrediction: OldPrediction? = nil
) -> Tensor {
    let prediction = oldPrediction ?? OldPrediction(oldLogits)
    precondition(prediction.shape == oldLogits.shape, "sharp: prediction \(prediction.shape) for \(oldLogits.shape)")
    return gscTermSums(
        newLogits, oldLogits, channels: oldLogits.shape[1],
        GSCTermRequest(sharpMask: prediction.confidenceMask(threshold: confidence))
    ).sharpEntropy(reduction: reduction)
}

/// GSC relation distillation: for each old class the old model predicts in the batch, the mean
/// probability vector (over old classes) of the new and of the old model on those pixels are
/// row c of two class-relation matrices; the loss is the mean absolute difference over the
/// rows of the classes present. Over ranks, each rank's class means are weighted by its share of
/// the class's pixels and summed (the backward sends each rank the gradient of its part).
/// `oldPrediction` as for `sharpEntropy`.
public func relationDistillation(
    _ newLogits: Tensor, _ oldLogits: Tensor, reduction: BatchReduction = .local, oldPrediction: OldPrediction? = nil
) -> Tensor {
    let prediction = oldPrediction ?? OldPrediction(oldLogits)
    precondition(prediction.shape == oldLogits.shape, "relation: prediction \(prediction.shape) for \(oldLogits.shape)")
    return gscTermSums(
        newLogits, oldLogits, channels: oldLogits.shape[1], GSCTermRequest(relation: relationInputs(prediction))
    ).relationDistillation(reduction: reduction)
}

/// What the relation term reads of the old model's prediction: its classes and softmax.
func relationInputs(_ prediction: OldPrediction) -> (assignment: [Int32], classes: Int, constant: Tensor?) {
    (prediction.argmax, prediction.shape[1], prediction.probabilities)
}

/// GSC's terms from their per-pixel sums (each computed by one `gscTermSums` for all that a
/// step's half needs), over every rank's share of the batch.
extension GSCTermSums {
    func softDistillation(reduction: BatchReduction) -> Tensor {
        reduction.share(ofMean: soft, count: Double(pixels))
    }

    func sharpEntropy(reduction: BatchReduction) -> Tensor {
        reduction.share(ofMean: entropy, count: Double(selected))
    }

    func relationDistillation(reduction: BatchReduction) -> Tensor {
        let old = channels
        let counts = counts.map { Double($0) }
        let totals = reduction.total(counts)
        let rows = totals.filter { $0 > 0 }.count
        var (rowsNew, rowsOld) = (means, constantMeans!)
        if !reduction.isLocal {
            let part = Tensor(shape: [old, 1], values: zip(counts, totals).map { $1 > 0 ? Float($0 / $1) : 0 })
            rowsNew = reduction.sum(rowsNew * part)
            rowsOld = withNoGrad { reduction.sum(rowsOld * part) }
        }
        // Absent classes have zero rows in both, so they add nothing.
        return reduction.share(ofReplicated: sum(abs(rowsNew - rowsOld)) * (1 / Float(max(rows, 1) * old)))
    }
}

/// GSC step-aware gradient compensation: pixel weights for the cross-entropy. For a pixel of
/// an old class (background included) g = 1 - p(y) under the new model (detached; with
/// `backgroundIncludes`, p(0) adds those classes' probabilities, as the unbiased or folded
/// cross-entropy does);
/// w = g^z / mean(g^z over the pixels of the same step group), z = |old| / |current| classes;
/// new-class pixels weigh 1; weights clamped to [wMin, wMax] (`DistillationOptions.compensationMin`
/// and `compensationMax`). Ignored pixels get 0.
public func gradientCompensationWeights(
    _ logits: Tensor, _ target: Labels, stepOfClass: [Int], currentStep: Int,
    z: Float, wMin: Float, wMax: Float,
    backgroundIncludes merged: Range<Int>? = nil, reduction: BatchReduction = .local
) -> Tensor {
    gradientCompensationWeights(
        logits, target, stepOfClass: stepOfClass, currentStep: currentStep, z: z, wMin: wMin, wMax: wMax,
        backgroundIncludes: merged, reduction: reduction, logSumExps: nil)
}

/// `gradientCompensationWeights` from the logits' log-sum-exps over background and `merged`, when given.
func gradientCompensationWeights(
    _ logits: Tensor, _ target: Labels, stepOfClass: [Int], currentStep: Int,
    z: Float, wMin: Float, wMax: Float,
    backgroundIncludes merged: Range<Int>?, reduction: BatchReduction, logSumExps: ChannelSetLogSumExps?
) -> Tensor {
    withNoGrad {
        let (n, c, h, w) = nchw(logits, "gradient compensation")
        let hw = h * w
        precondition(target.count == n * hw, "gradient compensation: labels \(target.shape) for \(logits.shape)")
        // Per pixel of an earlier step's class: g = (1 - p(y))^z, p(y) from the logsumexp over
        // the label's channels (background with `merged`) less that over all of them.
        let background = [0..<1] + (merged.map { [$0] } ?? [])
        let sums = logSumExps ?? channelSetLogSumExps(logits, merged: background, scale: 1)
        precondition(sums.matches(logits, merged: background, scale: 1), "gradient compensation: other log-sum-exps")
        // Per pixel block (fixed blocks, summed in block order after: the same sums whatever the
        // thread count), each step group's sum of g and count, on both cores.
        let groups = currentStep + 1, blocksPerImage = (hw + pixelBlock - 1) / pixelBlock
        var g = [Float](repeating: 0, count: n * hw)
        var partial = [Double](repeating: 0, count: n * blocksPerImage * 2 * groups)
        let px = logits.pointer, all = sums.all.pointer, own = sums.union.pointer
        target.values.withUnsafeBufferPointer { labels in
            g.withUnsafeMutableBufferPointer { g in
                partial.withUnsafeMutableBufferPointer { partial in
                    forEachPixelBlock(n: n, c: c, inner: hw) { b, i0, count in
                        let j0 = b * hw + i0, x = px + b * c * hw + i0
                        let groupSums = partial.baseAddress! + (b * blocksPerImage + i0 / pixelBlock) * 2 * groups
                        for i in 0..<count {
                            let y = Int(labels[j0 + i])
                            guard y != 255, y < c, stepOfClass[y] < currentStep else { continue }
                            let logP = y == 0 ? own[j0 + i] - all[j0 + i] : x[y * hw + i] - all[j0 + i]
                            g[j0 + i] = Foundation.pow(max(1 - Foundation.exp(logP), 0), z)
                            groupSums[stepOfClass[y]] += Double(g[j0 + i])
                            groupSums[groups + stepOfClass[y]] += 1
                        }
                    }
                }
            }
        }
        var groupTotals = [Double](repeating: 0, count: 2 * groups)
        for block in 0..<(n * blocksPerImage) {
            for e in 0..<(2 * groups) { groupTotals[e] += partial[block * 2 * groups + e] }
        }
        // The groups of the whole batch: sums and counts over every rank's share.
        let totals = reduction.total(groupTotals)
        let means = (0..<groups).map { totals[$0] / max(totals[groups + $0], 1) }
        let weights = Tensor(uninitialized: target.shape)
        let pw = weights.pointer
        target.values.withUnsafeBufferPointer { labels in
            g.withUnsafeBufferPointer { g in
                forEachPixelBlock(n: n, c: 1, inner: hw) { b, i0, count in
                    let j0 = b * hw + i0
                    for j in j0..<(j0 + count) {
                        let y = Int(labels[j])
                        guard y != 255, y < c else {
                            pw[j] = 0
                            continue
                        }
                        let step = stepOfClass[y], mean = step < currentStep ? means[step] : 0
                        pw[j] =
                            step >= currentStep ? 1 : mean > 0 ? min(max(Float(Double(g[j]) / mean), wMin), wMax) : 1
                    }
                }
            }
        }
        return weights
    }
}
