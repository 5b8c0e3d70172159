import Foundation

/// Every knob of SegInversion with Scale-Aware Aggregation (METHOD.md). Defaults are the
/// project's, tuned on the zoo model; all are options of `hrhf-synth`.
public struct InversionOptions: Codable, Equatable, Sendable {
    public var iterations = 250
    public var learningRate: Float = 0.1
    /// Iterations of linear learning-rate warm-up before the cosine decay.
    public var warmup = 20
    public var batchSize = 8
    public var resolution = 128
    /// Random roll of up to this many pixels each iteration (both axes).
    public var jitter = 8
    public var flip = true
    /// Target classes per image: 1...maxClasses.
    public var maxClasses = 3
    public var areaMin: Float = 0.05
    public var areaMax: Float = 0.5
    /// Target areas of one image add up to at most this; background takes the rest.
    public var areaTotalMax: Float = 0.7
    /// SAA (out): pixels ranked after K (1 + margin) must not be the class.
    public var margin: Float = 0.2
    /// Absent classes: their top `absentFraction * H * W` probabilities are pushed down.
    public var absentFraction: Float = 0.02
    public var lambdaOut: Float = 2
    public var lambdaAbsent: Float = 5
    public var weightBN: Float = 0.05
    /// The first batch-norm layer's statistics weigh this much more (DeepInversion's 10).
    public var firstBNMultiplier: Float = 10
    public var weightTV2: Float = 0.3
    public var weightTV1: Float = 0
    public var weightL2: Float = 0.01
    /// Share of the iterations run first at half resolution (0: off).
    public var warmStart: Float = 0
    /// Scale-Aware Aggregation's terms (METHOD.md). Off (the ablation): each image has one target
    /// class over all its pixels and plain DeepInversion-style cross-entropy replaces them.
    public var scaleAwareAggregation: Bool {
        get { scaleAwareAggregationRecord ?? true }
        set { scaleAwareAggregationRecord = newValue ? nil : false }
    }
    /// In the manifest only when off, so that packs made with SAA keep their bytes.
    var scaleAwareAggregationRecord: Bool?

    enum CodingKeys: String, CodingKey {
        case iterations, learningRate, warmup, batchSize, resolution, jitter, flip, maxClasses, areaMin, areaMax
        case areaTotalMax, margin, absentFraction, lambdaOut, lambdaAbsent, weightBN, firstBNMultiplier, weightTV2
        case weightTV1, weightL2, warmStart
        case scaleAwareAggregationRecord = "scaleAwareAggregation"
    }

    public init() {}

    public func validate() throws {
        guard iterations >= 1, batchSize >= 1 else {
            throw OptionError(option: "--synth-iterations, --synth-batch", "at least 1 each")
        }
        guard resolution >= 16 else { throw OptionError(option: "--resolution", "\(resolution): at least 16 pixels") }
        guard maxClasses >= 1 else { throw OptionError(option: "--classes-per-image", "at least one class per image") }
        guard areaMin > 0, areaMin <= areaMax, areaMax < 1, areaTotalMax < 1, areaTotalMax >= areaMin else {
            throw OptionError(
                option: "--area-min, --area-max, --area-total", "areas need 0 < min <= max < 1 and min <= total < 1")
        }
        guard warmStart >= 0 && warmStart < 1 else { throw OptionError(option: "--warm-start", "a share in [0, 1)") }
        guard margin >= 0 else { throw OptionError(option: "--margin", "\(margin): at least 0") }
        guard absentFraction > 0 else { throw OptionError(option: "--absent-fraction", "above 0") }
    }
}

/// What one synthetic image was asked to be and what it became.
public struct SynthesisRecord: Codable, Equatable, Sendable {
    public var index: Int
    public var image: String
    public var label: String
    public var targets: [Int]
    public var targetAreas: [Double]
    /// Share of pixels whose teacher argmax is each target class (same order as targets).
    public var achievedAreas: [Double]
    /// Largest share of pixels any old class outside the targets takes.
    public var absentMaxArea: Double
    public var teacherConfidence: Double
    public var losses: [String: Double]
    public var seed: UInt64
    public var batch: Int

    /// Every target is present in the prediction and no absent old class covers over 1%.
    public var faithful: Bool { achievedAreas.allSatisfy { $0 > 0 } && absentMaxArea <= 0.01 }

    /// The teacher gave every target at least `share` of the area asked of it.
    public func reaches(_ share: Float) -> Bool {
        targetAreas.count == achievedAreas.count && !targetAreas.isEmpty
            && zip(targetAreas, achievedAreas).allSatisfy { $1 >= Double(share) * $0 }
    }
}

/// One synthesised image with its teacher pseudo-label.
public struct SynthesizedImage: Sendable {
    public var image: RGBImage
    public var label: IndexMask
    public var record: SynthesisRecord
}

/// Inverts a frozen segmentation model into images of chosen old classes (METHOD.md's
/// SegInversion with Scale-Aware Aggregation). Gradients flow to the images only.
public final class SegInversion {
    public let teacher: DeepLabV3
    public let normalization: Normalization
    /// The old foreground classes images are made of.
    public let classes: [Int]
    /// Every foreground class of the teacher: those outside an image's targets are its absent
    /// classes, even when the pack holds only some of them (a pack made between steps).
    var foreground: Range<Int> { 1..<teacher.numClasses }
    public let options: InversionOptions
    let recorder: BatchNormStatisticsRecorder

    public init(teacher: DeepLabV3, normalization: Normalization, classes: [Int], options: InversionOptions) throws {
        try options.validate()
        guard !classes.isEmpty, classes.allSatisfy({ $0 >= 1 && $0 < teacher.numClasses }) else {
            throw OptionError(
                option: "--classes",
                "\(classes) must be foreground classes of the teacher (1-\(teacher.numClasses - 1))")
        }
        do {
            try teacher.checkInput(height: options.resolution, width: options.resolution, name: "synthesis")
        } catch let error as WeightFileError {
            throw OptionError(option: "--resolution", error.problem)
        }
        self.teacher = teacher
        self.normalization = normalization
        self.classes = classes
        self.options = options
        teacher.eval()
        teacher.setRequiresGrad(false)
        recorder = BatchNormStatisticsRecorder(attachingTo: teacher)
    }

    deinit { recorder.detach() }

    /// A seed for batch `b` of a run seeded `seed` (so shards compute the same batches).
    public static func batchSeed(_ seed: UInt64, _ b: Int) -> UInt64 {
        var g = SeededGenerator(seed: seed ^ (UInt64(b) &* 0x9E37_79B9_7F4A_7C15))
        return g.next()
    }

    /// Draws the target classes and areas of the `count` images numbered from `firstIndex`.
    /// Every class is drawn equally often: image i leads with class `order[i mod C]`, `order` a
    /// permutation fixed by the run's `seed` (so shards agree), and takes up to maxClasses - 1
    /// others at random. Drawing every class independently left some classes in a 64-image
    /// pack with 4 images and others with 13. Without SAA an image is its lead class alone, all
    /// over (area 1).
    func drawTargets(firstIndex: Int, count: Int, seed: UInt64, rng: inout SeededGenerator) -> [(
        classes: [Int], areas: [Float]
    )] {
        var orderRNG = SeededGenerator(seed: seed ^ 0x5851_F42D_4C95_7F2D)
        let order = classes.shuffled(using: &orderRNG)
        return (firstIndex..<(firstIndex + count)).map { i in
            let lead = order[i % order.count]
            guard options.scaleAwareAggregation else { return ([lead], [1]) }
            let k = 1 + Int(rng.next() % UInt64(min(options.maxClasses, classes.count)))
            let others = classes.filter { $0 != lead }.shuffled(using: &rng).prefix(k - 1)
            let picked = ([lead] + others).sorted()
            var areas = picked.map { _ in options.areaMin + (options.areaMax - options.areaMin) * rng.nextUnitFloat() }
            let total = areas.reduce(0, +)
            if total > options.areaTotalMax {
                areas = areas.map { max(options.areaMin * 0.5, $0 * options.areaTotalMax / total) }
            }
            return (picked, areas)
        }
    }

    /// The valid range of each normalised channel (pixels 0...255).
    var channelBounds: [(Float, Float)] {
        (0..<3).map { (c: Int) -> (Float, Float) in
            let m = normalization.mean[c], s = normalization.std[c]
            return (-m / s, (1 - m) / s)
        }
    }

    /// Per-image loss terms of one forward pass, each a length-B tensor, and the batch-level
    /// feature-statistics term.
    struct Terms {
        var objective: Objective
        var tv2, tv1, l2: Tensor
        var bn: Tensor
    }

    /// What pulls each image towards its targets.
    enum Objective {
        /// SAA (in), SAA (out) and the absent-class term.
        case scaleAware(inside: Tensor, outside: Tensor, absent: Tensor)
        /// DeepInversion-style cross-entropy of every pixel against the image's one target class.
        case wholeImage(crossEntropy: Tensor)

        /// The per-image terms under the names a pack's records give them.
        var named: [(String, Tensor)] {
            switch self {
            case .scaleAware(let inside, let outside, let absent):
                [("in", inside), ("out", outside), ("absent", absent)]
            case .wholeImage(let crossEntropy): [("ce", crossEntropy)]
            }
        }
    }

    /// Total variation over the four neighbour directions, per image: mean squared (L2) and
    /// mean absolute (L1) differences, summed over directions (`totalVariationRows`, rows split).
    static func totalVariation(_ x: Tensor) -> (l2: Tensor, l1: Tensor) {
        let rows = totalVariationRows(x), n = x.shape[0]
        return (reshape(sliceBatch(rows, 0..<1), [n]), reshape(sliceBatch(rows, 1..<2), [n]))
    }

    /// Per (image, class), B x C row-major: the top-K counts of SAA (in), SAA (out) and the absent
    /// classes, and the weights the terms give them (0 where a class takes no part).
    struct SAACounts {
        var kIn, kOut, kAbs: [Int]
        var inMask, outA, outB, absMask: [Float]
    }

    func saaCounts(_ targets: [(classes: [Int], areas: [Float])], classes c: Int, pixels hw: Int) -> SAACounts {
        let b = targets.count
        var kIn = [Int](repeating: 0, count: b * c), kOut = [Int](repeating: 0, count: b * c)
        var kAbs = [Int](repeating: 0, count: b * c)
        var inMask = [Float](repeating: 0, count: b * c), outA = [Float](repeating: 0, count: b * c)
        var outB = [Float](repeating: 0, count: b * c), absMask = [Float](repeating: 0, count: b * c)
        let kMin = max(1, Int((options.absentFraction * Float(hw)).rounded()))
        for (i, t) in targets.enumerated() {
            var used = 0
            for (cls, a) in zip(t.classes, t.areas) {
                let k = max(1, Int((a * Float(hw)).rounded()))
                used += k
                kIn[i * c + cls] = k
                inMask[i * c + cls] = 1
                let kPrime = min(hw - 1, Int((Float(k) * (1 + options.margin)).rounded(.up)))
                kOut[i * c + cls] = kPrime
                outA[i * c + cls] = 1 / Float(hw - kPrime)
                outB[i * c + cls] = Float(kPrime) / Float(hw - kPrime)
            }
            kIn[i * c] = max(1, hw - used)
            inMask[i * c] = 1
            let absent = foreground.filter { !t.classes.contains($0) }
            for cls in absent {
                kAbs[i * c + cls] = kMin
                absMask[i * c + cls] = 1 / Float(absent.count)
            }
        }
        return SAACounts(kIn: kIn, kOut: kOut, kAbs: kAbs, inMask: inMask, outA: outA, outB: outB, absMask: absMask)
    }

    func terms(_ x: Tensor, targets: [(classes: [Int], areas: [Float])]) -> Terms {
        let (b, _, h, w) = nchw(x, "inversion")
        let c = teacher.numClasses
        recorder.reset()
        let logits = teacher.run(x).logits
        let logP = logSoftmax(logits)
        func constant(_ v: [Float]) -> Tensor { Tensor(shape: [b, c], values: v) }
        let objective: Objective
        if options.scaleAwareAggregation {
            let k = saaCounts(targets, classes: c, pixels: h * w)
            let p = exp(logP)
            // SAA (in): mean of the top-K log-probabilities of each target class and background.
            let inside = -sum(spatialTopKMean(logP, k: k.kIn) * constant(k.inMask), axes: [1])
            // SAA (out): mean probability of the class beyond its K (1 + margin) strongest pixels.
            // Target classes rank to kOut, absent ones to kAbs: disjoint planes, one top-K op for both.
            let ranked = spatialTopKMean(p, k: zip(k.kOut, k.kAbs).map { $0 + $1 })
            let pSums = sum(p, axes: [2, 3])
            let outside = sum(pSums * constant(k.outA) - ranked * constant(k.outB), axes: [1])
            // Absent old classes: their strongest responses pushed down.
            let absent = sum(ranked * constant(k.absMask), axes: [1])
            objective = .scaleAware(inside: inside, outside: outside, absent: absent)
        } else {
            var target = [Float](repeating: 0, count: b * c)
            for (i, t) in targets.enumerated() { target[i * c + t.classes[0]] = 1 }
            objective = .wholeImage(crossEntropy: -sum(mean(logP, axes: [2, 3]) * constant(target), axes: [1]))
        }
        let (tv2, tv1) = Self.totalVariation(x)
        let l2 = sqrt(mean(square(x), axes: [1, 2, 3]) + 1e-12)
        var bn = Tensor(scalar: 0)
        for (layer, r) in recorder.records.enumerated() {
            let wl: Float = layer == 0 ? options.firstBNMultiplier : 1
            bn =
                bn + wl
                * (sqrt(sum(square(r.mean - r.runningMean)) + 1e-12)
                    + sqrt(sum(square(r.variance - r.runningVar)) + 1e-12))
        }
        return Terms(objective: objective, tv2: tv2, tv1: tv1, l2: l2, bn: bn)
    }

    func perImage(_ t: Terms) -> Tensor {
        let task: Tensor
        switch t.objective {
        case .scaleAware(let inside, let outside, let absent):
            task = inside + options.lambdaOut * outside + options.lambdaAbsent * absent
        case .wholeImage(let crossEntropy): task = crossEntropy
        }
        let priors: Tensor = options.weightTV2 * t.tv2 + options.weightTV1 * t.tv1 + options.weightL2 * t.l2
        return task + priors
    }

    /// Clips every value to the range of valid pixels of its channel, in place.
    func clip(_ x: Tensor) {
        let (n, _, h, w) = nchw(x, "clip")
        let plane = h * w
        for b in 0..<n {
            for (ch, (lo, hi)) in channelBounds.enumerated() {
                let p = x.pointer + (b * 3 + ch) * plane
                for i in 0..<plane { p[i] = min(max(p[i], lo), hi) }
            }
        }
    }

    /// One iteration's augmentation: a roll by (dy, dx) when jitter is on, and a horizontal flip.
    struct View {
        var roll: (dy: Int, dx: Int)?
        var flip: Bool
    }

    /// Draws one iteration's random roll of up to `jitter` pixels and its flip (p 0.5).
    func drawView(jitter: Int, rng: inout SeededGenerator) -> View {
        var roll: (dy: Int, dx: Int)?
        if jitter > 0 {
            let dy = Int(rng.next() % UInt64(2 * jitter + 1)) - jitter
            let dx = Int(rng.next() % UInt64(2 * jitter + 1)) - jitter
            roll = (dy, dx)
        }
        return View(roll: roll, flip: options.flip && rng.nextUnitFloat() < 0.5)
    }

    /// The per-image losses and the total of one iteration on `view` of the images `x`.
    func iterationLoss(
        _ x: Tensor, view: View,
        targets: [(classes: [Int], areas: [Float])]
    ) -> (per: Tensor, loss: Tensor) {
        let augmented = Profiler.region(.data) { () -> Tensor in
            var v = x
            if let r = view.roll { v = roll(v, dy: r.dy, dx: r.dx) }
            return view.flip ? flipHorizontal(v) : v
        }
        return Profiler.region(.loss) {
            let t = terms(augmented, targets: targets)
            let per = perImage(t)
            return (per, mean(per) + options.weightBN * t.bn)
        }
    }

    /// Each image keeps its lowest-loss state (the batch-level statistics term aside).
    static func keepBest(_ x: Tensor, per: Tensor, best: Tensor, bestLoss: inout [Float]) {
        let n = x.count / max(x.shape[0], 1)
        for b in 0..<x.shape[0] where per.pointer[b] < bestLoss[b] {
            bestLoss[b] = per.pointer[b]
            (best.pointer + b * n).update(from: x.pointer + b * n, count: n)
        }
    }

    /// The gradient of `loss` for the images, Adam's step, and the clip to valid pixels.
    func update(_ x: Tensor, loss: Tensor, adam: Adam) {
        x.grad = nil
        loss.backward()
        Profiler.region(.optimizer) {
            adam.step()
            clip(x)
        }
    }

    /// Synthesises one batch. `firstIndex` numbers its images in the pack; `batch` and `seed`
    /// fix every random choice. `progress` sees (iteration, total, current loss).
    public func synthesize(
        batch: Int, firstIndex: Int, count: Int, seed: UInt64,
        progress: ((Int, Int, Float) -> Void)? = nil
    ) -> [SynthesizedImage] {
        var rng = SeededGenerator(seed: Self.batchSeed(seed, batch))
        let targets = drawTargets(firstIndex: firstIndex, count: count, seed: seed, rng: &rng)
        let full = options.resolution
        let warmIterations = Int(Float(options.iterations) * options.warmStart)
        var phases: [(size: Int, iterations: Int)] = []
        if warmIterations > 0 { phases.append((max(16, full / 2), warmIterations)) }
        phases.append((full, options.iterations - warmIterations))

        var x = Tensor.randn([count, 3, phases[0].size, phases[0].size], rng: &rng)
        var best = x.copy()
        var bestLoss = [Float](repeating: .infinity, count: count)
        var done = 0
        for (phase, (size, iterations)) in phases.enumerated() {
            if phase > 0 {
                x = withNoGrad { resizeBilinear(best, size: (size, size)) }.copy()
                best = x.copy()
                bestLoss = [Float](repeating: .infinity, count: count)
            }
            x.requiresGrad = true
            let adam = Adam([x], learningRate: options.learningRate, betas: (0.5, 0.9))
            let jitter = max(0, options.jitter * size / full)
            for it in 0..<iterations {
                adam.learningRate = LearningRateSchedule.cosine.rate(
                    base: options.learningRate, iteration: it, total: iterations,
                    warmup: min(options.warmup, iterations - 1))
                let (per, loss) = iterationLoss(x, view: drawView(jitter: jitter, rng: &rng), targets: targets)
                Self.keepBest(x, per: per, best: best, bestLoss: &bestLoss)
                update(x, loss: loss, adam: adam)
                done += 1
                progress?(done, options.iterations, loss.item)
            }
        }
        // Keep the last step's improvement too.
        return withNoGrad { finish(best: best, targets: targets, batch: batch, firstIndex: firstIndex, seed: seed) }
    }

    /// Teacher pseudo-labels and the record of each image.
    func finish(
        best: Tensor, targets: [(classes: [Int], areas: [Float])], batch: Int, firstIndex: Int,
        seed: UInt64
    ) -> [SynthesizedImage] {
        let count = best.shape[0]
        let t = terms(best, targets: targets)
        let logits = teacher.run(best).logits
        let probabilities = softmax(logits)
        let masks = argmaxMasks(logits)
        let (_, c, h, w) = nchw(probabilities, "finish")
        let hw = h * w
        return (0..<count).map { b in
            let mask = masks[b]
            var counts = [Int](repeating: 0, count: c)
            for v in mask.values { counts[Int(v)] += 1 }
            var confidence = 0.0
            for i in 0..<hw {
                confidence += Double(probabilities.pointer[(b * c + Int(mask.values[i])) * hw + i])
            }
            let tg = targets[b]
            let absentMax =
                foreground.filter { !tg.classes.contains($0) }.map { Double(counts[$0]) / Double(hw) }.max() ?? 0
            let index = firstIndex + b
            let record = SynthesisRecord(
                index: index, image: String(format: "images/%06d.png", index),
                label: String(format: "labels/%06d.png", index),
                targets: tg.classes, targetAreas: tg.areas.map { Double($0) },
                achievedAreas: tg.classes.map { Double(counts[$0]) / Double(hw) }, absentMaxArea: absentMax,
                teacherConfidence: confidence / Double(hw),
                losses: Dictionary(
                    uniqueKeysWithValues: (t.objective.named + [("tv2", t.tv2), ("tv1", t.tv1), ("l2", t.l2)]).map {
                        ($0.0, Double($0.1.pointer[b]))
                    } + [("bn_batch", Double(t.bn.item))]),
                seed: seed, batch: batch)
            return SynthesizedImage(image: normalization.image(best, index: b), label: mask, record: record)
        }
    }
}

/// Pearson correlation of two equally long series (0 when either is constant).
public func pearson(_ a: [Double], _ b: [Double]) -> Double {
    precondition(a.count == b.count, "pearson: lengths differ")
    guard a.count > 1 else { return 0 }
    let ma = a.reduce(0, +) / Double(a.count), mb = b.reduce(0, +) / Double(b.count)
    var sab = 0.0, saa = 0.0, sbb = 0.0
    for (x, y) in zip(a, b) {
        sab += (x - ma) * (y - mb)
        saa += (x - ma) * (x - ma)
        sbb += (y - mb) * (y - mb)
    }
    return saa > 0 && sbb > 0 ? sab / (saa * sbb).squareRoot() : 0
}

/// The pack-level quality figures: scale control and class fidelity.
public struct SynthesisQuality: Codable, Equatable, Sendable {
    public var images: Int
    public var areaCorrelation: Double
    public var areaMeanAbsoluteDifference: Double
    public var fidelity: Double
    public var meanConfidence: Double
    public var imagesPerMinute: Double?

    public init(records: [SynthesisRecord], imagesPerMinute: Double?) {
        let target = records.flatMap(\.targetAreas), achieved = records.flatMap(\.achievedAreas)
        images = records.count
        areaCorrelation = pearson(target, achieved)
        areaMeanAbsoluteDifference =
            zip(target, achieved).map { Swift.abs($0 - $1) }.reduce(0, +) / Double(max(target.count, 1))
        fidelity = Double(records.filter(\.faithful).count) / Double(max(records.count, 1))
        meanConfidence = records.map(\.teacherConfidence).reduce(0, +) / Double(max(records.count, 1))
        self.imagesPerMinute = imagesPerMinute
    }
}
