import CImageIO
import Foundation

/// A failure reading or writing a file (an image, a dataset file), naming the file.
public struct FileError: Error, CustomStringConvertible, Equatable {
    public var file: String
    public var problem: String

    public init(file: String, _ problem: String) {
        self.file = file
        self.problem = problem
    }

    public var description: String { "\(file): \(problem)" }
}

/// A failure reading or writing an image, naming the file.
public typealias ImageError = FileError

/// 8-bit RGB pixels, row-major, interleaved (HWC).
public struct RGBImage: Equatable, Sendable {
    public var width: Int, height: Int
    public var pixels: [UInt8]

    public init(width: Int, height: Int, pixels: [UInt8]) {
        precondition(pixels.count == width * height * 3, "RGB image needs \(width * height * 3) bytes")
        self.width = width
        self.height = height
        self.pixels = pixels
    }

    public init(width: Int, height: Int, fill: (UInt8, UInt8, UInt8) = (0, 0, 0)) {
        var pixels = [UInt8](repeating: fill.0, count: width * height * 3)
        for i in stride(from: 0, to: pixels.count, by: 3) {
            pixels[i + 1] = fill.1
            pixels[i + 2] = fill.2
        }
        self.init(width: width, height: height, pixels: pixels)
    }
}

/// One integer per pixel: palette indices of a VOC mask, grey values of an ADE or Cityscapes
/// annotation.
public struct IndexMask: Equatable, Sendable {
    public var width: Int, height: Int
    public var values: [UInt16]

    public init(width: Int, height: Int, values: [UInt16]) {
        precondition(values.count == width * height, "mask needs \(width * height) values")
        self.width = width
        self.height = height
        self.values = values
    }
}

private func cMessage(_ buffer: [CChar]) -> String {
    String(decoding: buffer.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
}

private func decodeBytes(
    _ data: Data, name: String, maxPixels: Int,
    _ decoder: (
        UnsafePointer<UInt8>, Int, Int, UnsafeMutablePointer<hrhf_image>,
        UnsafeMutablePointer<CChar>, Int
    ) -> Int32
) throws -> hrhf_image {
    var image = hrhf_image()
    var err = [CChar](repeating: 0, count: 512)
    guard !data.isEmpty else { throw ImageError(file: name, "empty file") }
    guard maxPixels > 0 else { throw ImageError(file: name, "the pixel limit must be positive, got \(maxPixels)") }
    let status = data.withUnsafeBytes { raw in
        decoder(raw.bindMemory(to: UInt8.self).baseAddress!, raw.count, maxPixels, &image, &err, err.count)
    }
    guard status == 0 else { throw ImageError(file: name, cMessage(err)) }
    return image
}

/// Width x height of what a decoder returned, checked again here (the C side bounds them by the
/// same budget) so no buffer is read past its end whatever the decoder did.
private func decodedPixelCount(_ image: hrhf_image, channels: Int32, maxPixels: Int, name: String) throws -> Int {
    let width = Int(image.width), height = Int(image.height)
    let (count, overflow) = width.multipliedReportingOverflow(by: height)
    guard image.pixels != nil, image.channels == channels, width > 0, height > 0, !overflow, count <= maxPixels else {
        hrhf_free(image.pixels)
        throw ImageError(file: name, "the decoder returned \(width)x\(height)x\(image.channels): not a valid image")
    }
    return count
}

private func readFile(_ url: URL) throws -> Data {
    do { return try Data(contentsOf: url) } catch {
        throw ImageError(file: url.path, "cannot open file")
    }
}

/// What a PNG's IHDR chunk says, read without decoding anything.
public struct PNGHeader: Equatable, Sendable {
    public var width: Int, height: Int
    public var bitDepth: Int
    /// 0 grey, 2 RGB, 3 palette, 4 grey + alpha, 6 RGBA.
    public var colorType: Int
    /// Adam7 interlacing (IHDR's interlace method 1).
    public var interlaced: Bool

    /// Reads the signature and the IHDR chunk that must follow it (PNG: 13 bytes of data).
    public init(_ data: Data, name: String) throws {
        let bytes = [UInt8](data.prefix(29))
        guard bytes.count == 29, bytes.starts(with: [0x89, 0x50, 0x4E, 0x47, 0x0D, 0x0A, 0x1A, 0x0A]) else {
            throw ImageError(file: name, "not a PNG file (bad signature or shorter than its header)")
        }
        func big32(_ at: Int) -> Int { bytes[at..<(at + 4)].reduce(0) { $0 << 8 | Int($1) } }
        guard big32(8) == 13, Array(bytes[12..<16]) == Array("IHDR".utf8) else {
            throw ImageError(file: name, "the PNG does not start with a 13-byte IHDR chunk")
        }
        width = big32(16)
        height = big32(20)
        bitDepth = Int(bytes[24])
        colorType = Int(bytes[25])
        interlaced = bytes[28] != 0
        // The PNG standard: 1 ... 2^31 - 1 pixels a side.
        guard (1...0x7FFF_FFFF).contains(width), (1...0x7FFF_FFFF).contains(height) else {
            throw ImageError(file: name, "IHDR gives \(width)x\(height) pixels: outside the PNG range")
        }
    }
}

public enum ImageIO {
    /// Pixels one image may have unless a caller says otherwise: 64 Mpixel (8192 x 8192) is far
    /// above ADE20K's and Cityscapes' largest images (about 2 and 2.1 Mpixel) yet bounds one
    /// decoded image to 192 MB of RGB, plus at most 512 MB of libjpeg's own progressive buffers.
    public static let defaultPixelLimit = 64 << 20

    /// Reads a PNG or JPEG (decided by the file's first bytes) as 8-bit RGB.
    public static func readRGB(_ url: URL, maxPixels: Int = defaultPixelLimit) throws -> RGBImage {
        try decodeRGB(try readFile(url), name: url.path, maxPixels: maxPixels)
    }

    /// Decodes PNG or JPEG bytes; `name` is what errors call them (a file, a pack entry). An
    /// image of more than `maxPixels` pixels is refused from its header, before decoding.
    public static func decodeRGB(_ data: Data, name: String, maxPixels: Int = defaultPixelLimit) throws -> RGBImage {
        let magic = [UInt8](data.prefix(4))
        let image: hrhf_image
        if magic.starts(with: [0x89, 0x50, 0x4E, 0x47]) {
            image = try decodeBytes(data, name: name, maxPixels: maxPixels) {
                hrhf_png_decode_rgb($0, $1, $2, $3, $4, $5)
            }
        } else if magic.starts(with: [0xFF, 0xD8]) {
            image = try decodeBytes(data, name: name, maxPixels: maxPixels) {
                hrhf_jpeg_decode_rgb($0, $1, $2, $3, $4, $5)
            }
        } else {
            throw ImageError(file: name, "neither a PNG nor a JPEG file")
        }
        let count = try decodedPixelCount(image, channels: 3, maxPixels: maxPixels, name: name)
        defer { hrhf_free(image.pixels) }
        let bytes = UnsafeBufferPointer(start: image.pixels.assumingMemoryBound(to: UInt8.self), count: 3 * count)
        return RGBImage(width: Int(image.width), height: Int(image.height), pixels: Array(bytes))
    }

    /// Reads a palette or greyscale PNG's raw values (a label mask).
    public static func readIndexPNG(_ url: URL, maxPixels: Int = defaultPixelLimit) throws -> IndexMask {
        try decodeIndexPNG(try readFile(url), name: url.path, maxPixels: maxPixels)
    }

    public static func decodeIndexPNG(
        _ data: Data, name: String,
        maxPixels: Int = defaultPixelLimit
    ) throws -> IndexMask {
        let image = try decodeBytes(data, name: name, maxPixels: maxPixels) {
            hrhf_png_decode_index($0, $1, $2, $3, $4, $5)
        }
        let count = try decodedPixelCount(image, channels: 1, maxPixels: maxPixels, name: name)
        defer { hrhf_free(image.pixels) }
        let values = UnsafeBufferPointer(start: image.pixels.assumingMemoryBound(to: UInt16.self), count: count)
        return IndexMask(width: Int(image.width), height: Int(image.height), values: Array(values))
    }

    /// PNG bytes; the same pixels always give the same bytes.
    private static func encode(
        width: Int, height: Int, channels: Int, pixels: [UInt8], palette: [UInt8]?,
        name: String
    ) throws -> Data {
        var err = [CChar](repeating: 0, count: 512)
        var out: UnsafeMutablePointer<UInt8>?
        var length = 0
        let status = pixels.withUnsafeBufferPointer { px in
            if let palette {
                return palette.withUnsafeBufferPointer { pal in
                    hrhf_png_encode(
                        Int32(width), Int32(height), Int32(channels), px.baseAddress, pal.baseAddress,
                        &out, &length, &err, err.count)
                }
            }
            return hrhf_png_encode(
                Int32(width), Int32(height), Int32(channels), px.baseAddress, nil, &out, &length,
                &err, err.count)
        }
        guard status == 0, let out else { throw ImageError(file: name, cMessage(err)) }
        defer { hrhf_free(out) }
        return Data(bytes: out, count: length)
    }

    public static func encodePNG(_ image: RGBImage, name: String = "image") throws -> Data {
        try encode(
            width: image.width, height: image.height, channels: 3, pixels: image.pixels, palette: nil, name: name)
    }

    /// An 8-bit palette PNG of class indices (VOC palette by default; 255 is the ignore colour).
    public static func encodePalettePNG(_ mask: IndexMask, palette: [UInt8] = vocPalette, name: String = "mask") throws
        -> Data
    {
        guard mask.values.allSatisfy({ $0 <= 255 }) else {
            throw ImageError(file: name, "palette PNG values must be at most 255")
        }
        guard palette.count == 768 else {
            throw ImageError(file: name, "a palette needs 256 RGB triples, got \(palette.count) bytes")
        }
        return try encode(
            width: mask.width, height: mask.height, channels: 1, pixels: mask.values.map { UInt8($0) },
            palette: palette, name: name)
    }

    public static func encodeGreyPNG(_ mask: IndexMask, name: String = "mask") throws -> Data {
        guard mask.values.allSatisfy({ $0 <= 255 }) else {
            throw ImageError(file: name, "8-bit PNG values must be at most 255")
        }
        return try encode(
            width: mask.width, height: mask.height, channels: 1, pixels: mask.values.map { UInt8($0) },
            palette: nil, name: name)
    }

    /// Files are written to `NAME.partial` and renamed when complete.
    public static func writePNG(_ image: RGBImage, to url: URL) throws {
        try write(try encodePNG(image, name: url.path), to: url)
    }

    public static func writePalettePNG(_ mask: IndexMask, to url: URL, palette: [UInt8] = vocPalette) throws {
        try write(try encodePalettePNG(mask, palette: palette, name: url.path), to: url)
    }

    public static func writeGreyPNG(_ mask: IndexMask, to url: URL) throws {
        try write(try encodeGreyPNG(mask, name: url.path), to: url)
    }

    /// writeAtomically's errors already name the file.
    private static func write(_ data: Data, to url: URL) throws { try writeAtomically(data, to: url) }
}

/// PASCAL VOC's colour map: 256 RGB triples built from the bits of the index.
public let vocPalette: [UInt8] = (0..<256).flatMap { (i: Int) -> [UInt8] in
    var r = 0, g = 0, b = 0, c = i
    for j in 0..<8 {
        r |= ((c >> 0) & 1) << (7 - j)
        g |= ((c >> 1) & 1) << (7 - j)
        b |= ((c >> 2) & 1) << (7 - j)
        c >>= 3
    }
    return [UInt8(r), UInt8(g), UInt8(b)]
}

/// Input normalisation of a model: x = (pixel / 255 - mean) / std per channel.
public struct Normalization: Codable, Equatable, Sendable {
    public var mean: [Float]
    public var std: [Float]

    public init(mean: [Float], std: [Float]) {
        self.mean = mean
        self.std = std
    }

    public static let imagenet = Normalization(mean: [0.485, 0.456, 0.406], std: [0.229, 0.224, 0.225])

    /// A 1 x 3 x H x W tensor of the normalised image.
    public func tensor(_ image: RGBImage) -> Tensor {
        let plane = image.width * image.height
        let t = Tensor(zeros: [1, 3, image.height, image.width])
        let p = t.pointer
        image.pixels.withUnsafeBufferPointer { px in
            for c in 0..<3 {
                let scale = 1 / (255 * std[c]), shift = -mean[c] / std[c]
                for i in 0..<plane { p[c * plane + i] = Float(px[3 * i + c]) * scale + shift }
            }
        }
        return t
    }

    /// The image a normalised 3 x H x W slice (image `index` of a batch) shows, clipped to 0-255.
    public func image(_ t: Tensor, index: Int = 0) -> RGBImage {
        let (_, c, h, w) = nchw(t, "image")
        precondition(c == 3, "an RGB image needs 3 channels, got \(c)")
        let plane = h * w
        let base = t.pointer + index * 3 * plane
        var pixels = [UInt8](repeating: 0, count: plane * 3)
        for ch in 0..<3 {
            for i in 0..<plane {
                let v = (base[ch * plane + i] * std[ch] + mean[ch]) * 255
                pixels[3 * i + ch] = UInt8(max(0, min(255, v.rounded())))
            }
        }
        return RGBImage(width: w, height: h, pixels: pixels)
    }
}
