import Foundation

/// The procedural Shapes dataset: 20 foreground classes, each a shape family with its own
/// colour and texture statistics, several objects per image at varied scales and rotations,
/// overlapping (later objects occlude earlier ones), on textured backgrounds. Every image is a
/// pure function of (seed, split, index). Classes share hues and textures in overlapping
/// groups, so neither colour nor texture alone separates them: shape must be seen.
public struct ShapesGenerator: Sendable {
    public var size: Int
    public var seed: UInt64
    /// Objects per image: 1 to this many.
    public var maxObjects = 4

    public init(size: Int, seed: UInt64) {
        precondition(size >= 16, "Shapes images need at least 16 pixels a side")
        self.size = size
        self.seed = seed
    }

    public static let classCount = 20

    /// Base colour per class (index = class id - 1): seven hue families, so hues repeat across
    /// different shapes.
    static let baseColours: [(Float, Float, Float)] = {
        let hues: [(Float, Float, Float)] = [
            (220, 50, 50), (235, 140, 40), (225, 210, 60), (60, 170, 70),
            (50, 190, 200), (60, 90, 215), (150, 70, 190),
        ]
        return (0..<20).map { c in
            let h = hues[(c * 3) % 7]
            let shade: Float = c % 2 == 0 ? 1.0 : 0.75
            return (h.0 * shade, h.1 * shade, h.2 * shade)
        }
    }()

    /// Texture kind per class: 0 flat, 1 stripes, 2 checker, 3 noise, 4 radial gradient.
    static func textureKind(_ c: Int) -> Int { (c * 2 + c / 5) % 5 }

    /// Whether normalised object coordinates (u, v) (radius 1, after rotation) lie inside
    /// class c's shape.
    static func inside(_ c: Int, _ u: Float, _ v: Float) -> Bool {
        let r = (u * u + v * v).squareRoot(), a = atan2(v, u)
        switch c {
        case 1: return r <= 1 // disc
        case 2: return max(Swift.abs(u), Swift.abs(v)) <= 0.8 // square
        case 3: return v >= -0.5 && v <= 1 - 1.732 * Swift.abs(u) // triangle
        case 4: return r >= 0.55 && r <= 1 // ring
        case 5: return (Swift.abs(u) <= 0.3 && Swift.abs(v) <= 1) || (Swift.abs(v) <= 0.3 && Swift.abs(u) <= 1) // cross
        case 6: return r <= 0.42 + 0.58 * Foundation.pow(Swift.abs(Foundation.cos(2.5 * a)), 3) // star
        case 7: return max(Swift.abs(u) * 0.866 + Swift.abs(v) * 0.5, Swift.abs(v)) <= 0.9 // hexagon
        case 8: return u * u + (v / 0.5) * (v / 0.5) <= 1 // ellipse
        case 9: return r <= 1 && (u - 0.45) * (u - 0.45) + v * v > 0.64 // crescent
        case 10: return Swift.abs(u) + Swift.abs(v) <= 1 // diamond
        case 11: // heart
            let x = u * 1.25, y = -v * 1.25 + 0.25
            let q = x * x + y * y - 1
            return q * q * q - x * x * y * y * y <= 0
        case 12:
            return (Swift.abs(v) <= 0.25 && u >= -1 && u <= 0.2)
                || (u >= 0.2 && u <= 1 && Swift.abs(v) <= (1 - u) * 1.1) // arrow
        case 13: // pentagon
            let sector = 2 * Float.pi / 5
            let local = (a + Float.pi / 2).truncatingRemainder(dividingBy: sector)
            let wrapped = (local < 0 ? local + sector : local) - sector / 2
            return r * Foundation.cos(wrapped) <= 0.8
        case 14:
            let m = max(Swift.abs(u), Swift.abs(v))
            return m <= 0.9 && m >= 0.6 // frame
        case 15: return Swift.abs(u) <= 1 && Swift.abs(v) <= 0.35 // bar
        case 16:
            return (u >= -0.8 && u <= 0.8 && v >= -0.8 && v <= -0.3)
                || (u >= -0.8 && u <= -0.3 && v >= -0.8 && v <= 0.8) // L-shape
        case 17: return r <= 1 && v >= 0 // semicircle
        case 18: return r <= 0.35 || (r >= 0.65 && r <= 1) // target
        case 19:
            let d = v - 0.9 * Swift.abs(u)
            return d >= -0.65 && d <= -0.1 && Swift.abs(u) <= 0.95 // chevron
        case 20: // trefoil
            for k in 0..<3 {
                let t = Float.pi / 2 + Float(k) * 2 * Float.pi / 3
                let dx = u - 0.5 * Foundation.cos(t), dy = v - 0.5 * Foundation.sin(t)
                if dx * dx + dy * dy <= 0.2 { return true }
            }
            return false
        default: return false
        }
    }

    /// A seed that differs for every (seed, split, index).
    func imageSeed(split: String, index: Int) -> UInt64 {
        var h: UInt64 = seed &* 0x9E37_79B9_7F4A_7C15
        for b in split.utf8 { h = (h ^ UInt64(b)) &* 0x100_0000_01B3 }
        return h ^ (UInt64(index) &* 0xBF58_476D_1CE4_E5B9)
    }

    public func sample(split: String, index: Int) -> (image: RGBImage, mask: IndexMask) {
        var rng = SeededGenerator(seed: imageSeed(split: split, index: index))
        let s = size, n = s * s
        var rgb = [Float](repeating: 0, count: n * 3)
        var labels = [UInt16](repeating: 0, count: n)
        // Background: two muted colours blended along a random direction, plus a wavy texture.
        func muted() -> (Float, Float, Float) {
            let base = 60 + 120 * rng.nextUnitFloat()
            return (
                base + 40 * (rng.nextUnitFloat() - 0.5), base + 40 * (rng.nextUnitFloat() - 0.5),
                base + 40 * (rng.nextUnitFloat() - 0.5)
            )
        }
        let c0 = muted(), c1 = muted()
        let angle = 2 * Float.pi * rng.nextUnitFloat()
        let (dx, dy) = (Foundation.cos(angle), Foundation.sin(angle))
        let waves = (0..<3).map { _ in
            (
                f: 2 + 10 * rng.nextUnitFloat(), a: 2 * Float.pi * rng.nextUnitFloat(),
                p: 2 * Float.pi * rng.nextUnitFloat(), amp: 6 + 14 * rng.nextUnitFloat()
            )
        }
        for y in 0..<s {
            for x in 0..<s {
                let fx = Float(x) / Float(s), fy = Float(y) / Float(s)
                let t = min(max((fx - 0.5) * dx + (fy - 0.5) * dy + 0.5, 0), 1)
                var texture: Float = 0
                for w in waves {
                    texture +=
                        w.amp
                        * Foundation.sin(
                            w.f * 2 * Float.pi * (fx * Foundation.cos(w.a) + fy * Foundation.sin(w.a)) + w.p)
                }
                let i = (y * s + x) * 3
                rgb[i] = c0.0 * (1 - t) + c1.0 * t + texture
                rgb[i + 1] = c0.1 * (1 - t) + c1.1 * t + texture
                rgb[i + 2] = c0.2 * (1 - t) + c1.2 * t + texture
            }
        }
        // Objects, painted in order: later ones occlude earlier ones.
        let count = 1 + Int(rng.next() % UInt64(maxObjects))
        for _ in 0..<count {
            let c = 1 + Int(rng.next() % UInt64(Self.classCount))
            let radius = Float(s) * (0.1 + 0.25 * rng.nextUnitFloat())
            let cx = Float(s) * (0.1 + 0.8 * rng.nextUnitFloat()), cy = Float(s) * (0.1 + 0.8 * rng.nextUnitFloat())
            let rot = 2 * Float.pi * rng.nextUnitFloat()
            let (cr, sr) = (Foundation.cos(rot), Foundation.sin(rot))
            let base = Self.baseColours[c - 1]
            let jitter = (
                30 * (rng.nextUnitFloat() - 0.5), 30 * (rng.nextUnitFloat() - 0.5), 30 * (rng.nextUnitFloat() - 0.5)
            )
            let kind = Self.textureKind(c)
            let freq = 3 + 4 * rng.nextUnitFloat(), texAngle = Float.pi * rng.nextUnitFloat()
            let amp = 25 + 30 * rng.nextUnitFloat()
            let x0 = max(0, Int(cx - radius * 1.3)), x1 = min(s - 1, Int(cx + radius * 1.3))
            let y0 = max(0, Int(cy - radius * 1.3)), y1 = min(s - 1, Int(cy + radius * 1.3))
            guard x0 <= x1, y0 <= y1 else { continue }
            for y in y0...y1 {
                for x in x0...x1 {
                    let px = (Float(x) + 0.5 - cx) / radius, py = (Float(y) + 0.5 - cy) / radius
                    let u = px * cr + py * sr, v = -px * sr + py * cr
                    guard Self.inside(c, u, v) else { continue }
                    var m: Float = 0
                    switch kind {
                    case 1:
                        m =
                            Foundation.sin(
                                freq * Float.pi * (u * Foundation.cos(texAngle) + v * Foundation.sin(texAngle))) > 0
                            ? amp : -amp
                    case 2:
                        m = (Int(floor((u + 2) * freq * 0.7)) + Int(floor((v + 2) * freq * 0.7))) % 2 == 0 ? amp : -amp
                    case 3: m = amp * 1.6 * (rng.nextUnitFloat() - 0.5)
                    case 4: m = amp * (1 - 2 * min((u * u + v * v).squareRoot(), 1))
                    default: m = 0
                    }
                    let i = (y * s + x) * 3
                    rgb[i] = base.0 + jitter.0 + m
                    rgb[i + 1] = base.1 + jitter.1 + m
                    rgb[i + 2] = base.2 + jitter.2 + m
                    labels[y * s + x] = UInt16(c)
                }
            }
        }
        // Sensor noise over everything.
        var pixels = [UInt8](repeating: 0, count: n * 3)
        for i in 0..<(n * 3) {
            pixels[i] = UInt8(max(0, min(255, (rgb[i] + 16 * (rng.nextUnitFloat() - 0.5)).rounded())))
        }
        return (RGBImage(width: s, height: s, pixels: pixels), IndexMask(width: s, height: s, values: labels))
    }

    /// Writes `train` and `val` images in the VOC layout the VOC loader reads:
    /// JPEGImages/NAME.png, SegmentationClass/NAME.png (palette),
    /// ImageSets/Segmentation/{train,val}.txt. Returns the number of images written.
    @discardableResult
    public func write(to root: URL, train: Int, val: Int, progress: ((Int, Int) -> Void)? = nil) throws -> Int {
        let fm = FileManager.default
        let images = root.appendingPathComponent("JPEGImages"), masks = root.appendingPathComponent("SegmentationClass")
        let lists = root.appendingPathComponent("ImageSets/Segmentation")
        for d in [images, masks, lists] { try fm.createDirectory(at: d, withIntermediateDirectories: true) }
        let jobs = [("train", train), ("val", val)].flatMap { split, n in (0..<n).map { (split, $0) } }
        let lock = NSLock()
        var failure: Error?
        var done = 0
        DispatchQueue.concurrentPerform(iterations: ParallelConfig.threads) { worker in
            for j in stride(from: worker, to: jobs.count, by: ParallelConfig.threads) {
                let (split, index) = jobs[j]
                let name = Self.name(split: split, index: index)
                let (image, mask) = sample(split: split, index: index)
                do {
                    try ImageIO.writePNG(image, to: images.appendingPathComponent(name + ".png"))
                    try ImageIO.writePalettePNG(mask, to: masks.appendingPathComponent(name + ".png"))
                } catch {
                    lock.lock()
                    failure = failure ?? error
                    lock.unlock()
                    return
                }
                lock.lock()
                done += 1
                let d = done
                lock.unlock()
                progress?(d, jobs.count)
            }
        }
        if let failure { throw failure }
        for (split, n) in [("train", train), ("val", val)] {
            let text = (0..<n).map { Self.name(split: split, index: $0) }.joined(separator: "\n") + (n > 0 ? "\n" : "")
            try writeAtomically(Data(text.utf8), to: lists.appendingPathComponent("\(split).txt"))
        }
        let info =
            "{\"generator\": \"hrhf shapes\", \"size\": \(size), \"seed\": \(seed), \"train\": \(train), \"val\": \(val)}\n"
        try writeAtomically(Data(info.utf8), to: root.appendingPathComponent("shapes.json"))
        return jobs.count
    }

    public static func name(split: String, index: Int) -> String { String(format: "shapes_%@_%06d", split, index) }
}
