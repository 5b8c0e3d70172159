import XCTest

@testable import HRHF

/// PNG and JPEG decoding against Pillow (Fixtures/images, tools/gen_image_fixtures.py), writing,
/// and clean refusal of damaged files.
final class ImageTests: XCTestCase {
    let dir = Fixtures.directory.appendingPathComponent("images")

    func expected(_ key: String) throws -> [Float] { try Fixtures.tensor("images/expected.safetensors", key).array }

    func testPNGVariantsDecodeExactlyAsPillow() throws {
        for name in ["rgb", "rgba", "grey", "grey_alpha", "palette", "interlaced", "grey16"] {
            let image = try ImageIO.readRGB(dir.appendingPathComponent("\(name).png"))
            XCTAssertEqual(image.width, 17, name)
            XCTAssertEqual(image.height, 13, name)
            XCTAssertEqual(image.pixels.map { Float($0) }, try expected("\(name)/rgb"), name)
        }
    }

    func testIndexMasksKeepRawValues() throws {
        for name in ["palette", "grey", "grey16"] {
            let mask = try ImageIO.readIndexPNG(dir.appendingPathComponent("\(name).png"))
            XCTAssertEqual(mask.values.map { Float($0) }, try expected("\(name)/index"), name)
        }
        let palette = try ImageIO.readIndexPNG(dir.appendingPathComponent("palette.png"))
        XCTAssertTrue(palette.values.contains(255), "the ignore label survives")
        XCTAssertThrowsError(try ImageIO.readIndexPNG(dir.appendingPathComponent("rgb.png"))) { e in
            XCTAssertTrue("\(e)".contains("rgb.png") && "\(e)".contains("palette or greyscale"), "\(e)")
        }
    }

    func testJPEGVariantsMatchPillowWithinOneLevel() throws {
        // Both use libjpeg's default islow IDCT and fancy upsampling; allow one grey level for
        // a different build of the library.
        for name in ["baseline", "progressive", "greyscale"] {
            let image = try ImageIO.readRGB(dir.appendingPathComponent("\(name).jpg"))
            let reference = try expected("\(name)/rgb")
            let worst = zip(image.pixels, reference).map { Swift.abs(Float($0) - $1) }.max() ?? 0
            XCTAssertLessThanOrEqual(worst, 1, name)
        }
    }

    func testDamagedFilesAreRefusedWithTheFileNamed() {
        for (name, phrase) in [
            ("truncated.png", "corrupt or truncated PNG"), ("truncated.jpg", "JPEG"),
            ("not_an_image.png", "neither a PNG nor a JPEG"),
        ] {
            let url = dir.appendingPathComponent(name)
            XCTAssertThrowsError(try ImageIO.readRGB(url), name) { e in
                XCTAssertTrue("\(e)".hasPrefix(url.path) && "\(e)".contains(phrase), "\(e)")
            }
        }
        XCTAssertThrowsError(try ImageIO.readRGB(URL(fileURLWithPath: "/nonexistent/x.png"))) { e in
            XCTAssertTrue("\(e)".contains("/nonexistent/x.png"), "\(e)")
        }
    }

    /// Peak resident memory of this process so far, in bytes.
    func peakResidentBytes() -> Int {
        var usage = rusage()
        getrusage(RUSAGE_SELF.rawValue, &usage)
        return usage.ru_maxrss * 1024
    }

    func testImagesOverThePixelBudgetAreRefusedFromTheirHeader() throws {
        // 32768 x 32768 in 1 bit: 57 bytes that libpng once expanded to 3.2 GB of RGB, then copied.
        let before = peakResidentBytes()
        let bomb = HostilePackTests.hugeOneBitPNG()
        let limit = ImageIO.defaultPixelLimit
        XCTAssertEqual(limit, 67_108_864)
        let decoders = [
            { _ = try ImageIO.decodeRGB(bomb, name: "bomb.png") },
            { _ = try ImageIO.decodeIndexPNG(bomb, name: "bomb.png") },
        ]
        for decode in decoders {
            XCTAssertThrowsError(try decode()) { e in
                let expected = "32768x32768 pixels is over the limit of \(limit) pixels per image"
                XCTAssertEqual(e as? ImageError, ImageError(file: "bomb.png", expected))
            }
        }
        let wide = HostilePackTests.hugeOneBitPNG(side: 1 << 20, bitDepth: 8)
        XCTAssertThrowsError(try ImageIO.decodeRGB(wide, name: "wide.png")) { e in
            XCTAssertTrue("\(e)".hasPrefix("wide.png: 1048576x1048576 pixels is over the limit"), "\(e)")
        }
        XCTAssertLessThan(peakResidentBytes() - before, 64 << 20, "nothing near the image's size was allocated")

        // The budget is the caller's: the 17 x 13 fixture needs 221 pixels.
        let rgb = dir.appendingPathComponent("rgb.png")
        XCTAssertEqual(try ImageIO.readRGB(rgb, maxPixels: 221).width, 17)
        XCTAssertThrowsError(try ImageIO.readRGB(rgb, maxPixels: 220)) { e in
            XCTAssertEqual("\(e)", "\(rgb.path): 17x13 pixels is over the limit of 220 pixels per image")
        }
        XCTAssertThrowsError(try ImageIO.readIndexPNG(dir.appendingPathComponent("palette.png"), maxPixels: 0)) { e in
            XCTAssertTrue("\(e)".contains("the pixel limit must be positive"), "\(e)")
        }

        // JPEG: the frame header's 65500 x 65500 is refused before libjpeg allocates for it.
        for (name, marker) in [("baseline", UInt8(0xC0)), ("progressive", UInt8(0xC2))] {
            var bytes = [UInt8](try Data(contentsOf: dir.appendingPathComponent("\(name).jpg")))
            let sof = try XCTUnwrap(
                (0..<(bytes.count - 1)).first { bytes[$0] == 0xFF && bytes[$0 + 1] == marker },
                name)
            for at in [sof + 5, sof + 7] {
                bytes[at] = 0xFF
                bytes[at + 1] = 0xDC
            }
            XCTAssertThrowsError(try ImageIO.decodeRGB(Data(bytes), name: name)) { e in
                XCTAssertEqual("\(e)", "\(name): 65500x65500 pixels is over the limit of \(limit) pixels per image")
            }
            XCTAssertThrowsError(
                try ImageIO.decodeRGB(
                    try Data(contentsOf: dir.appendingPathComponent("\(name).jpg")),
                    name: name, maxPixels: 100)
            ) { e in
                XCTAssertTrue("\(e)".contains("pixels is over the limit of 100 pixels"), "\(e)")
            }
        }
    }

    /// An 8 x 8 grey progressive JPEG of all-zero coefficients: a DC scan, then for each of
    /// `bands` AC coefficients a first scan at 7 bits of approximation and 7 refinement scans.
    static func progressiveJPEG(bands: Int) -> Data {
        func segment(_ marker: UInt8, _ body: [UInt8]) -> [UInt8] {
            [0xFF, marker, UInt8((body.count + 2) >> 8), UInt8((body.count + 2) & 0xFF)] + body
        }
        // One Huffman code, "0", for symbol 0 (a DC difference of 0, or an end of band).
        let table = [UInt8(1)] + [UInt8](repeating: 0, count: 15) + [0]
        var bytes: [UInt8] =
            [0xFF, 0xD8] + segment(0xDB, [0] + [UInt8](repeating: 1, count: 64))
            + segment(0xC2, [8, 0, 8, 0, 8, 1, 1, 0x11, 0]) + segment(0xC4, [0x00] + table + [0x10] + table)
        func scan(_ start: Int, _ end: Int, _ high: Int, _ low: Int) {
            bytes += segment(0xDA, [1, 1, 0, UInt8(start), UInt8(end), UInt8(high << 4 | low)]) + [0x7F]
        }
        scan(0, 0, 0, 0)
        for k in 1...bands {
            scan(k, k, 0, 7)
            for low in stride(from: 6, through: 0, by: -1) { scan(k, k, low + 1, low) }
        }
        return Data(bytes + [0xFF, 0xD9])
    }

    func testJPEGsOfMoreThan500ScansAreRefused() throws {
        let allowed = try ImageIO.decodeRGB(Self.progressiveJPEG(bands: 62), name: "497 scans")
        XCTAssertEqual(allowed.width, 8)
        XCTAssertThrowsError(try ImageIO.decodeRGB(Self.progressiveJPEG(bands: 63), name: "505 scans")) { e in
            XCTAssertEqual("\(e)", "505 scans: corrupt or truncated JPEG: more than 500 scans")
        }
    }

    func testTextAndProfileChunksAreSkippedUnread() throws {
        let plain = try Data(contentsOf: dir.appendingPathComponent("rgb.png"))
        // After the signature and IHDR (8 + 25 bytes): a 9 MB tEXt (over libpng's 8 MB chunk limit,
        // which would refuse it were it read) and a 1 MB iCCP of junk.
        func chunk(_ type: String, _ body: [UInt8]) -> [UInt8] {
            let typed = Array(type.utf8) + body
            let crc = HostilePackTests.crc32(typed)
            return HostilePackTests.bigEndian(body.count) + typed + HostilePackTests.bigEndian(Int(crc))
        }
        let text = chunk("tEXt", Array("Comment\0".utf8) + [UInt8](repeating: 0x61, count: 9 << 20))
        let profile = chunk("iCCP", Array("icc\0\0".utf8) + [UInt8](repeating: 0x5A, count: 1 << 20))
        let padded = Data(plain.prefix(33) + text + profile + plain.dropFirst(33))
        XCTAssertEqual(
            try ImageIO.decodeRGB(padded, name: "padded.png"),
            try ImageIO.decodeRGB(plain, name: "plain.png"))
    }

    func testWriteThenReadRoundTrips() throws {
        let out = temporaryDirectory()
        var rng = SeededGenerator(seed: 3)
        let image = RGBImage(width: 9, height: 5, pixels: (0..<135).map { _ in UInt8(rng.next() % 256) })
        try ImageIO.writePNG(image, to: out.appendingPathComponent("a.png"))
        XCTAssertEqual(try ImageIO.readRGB(out.appendingPathComponent("a.png")), image)
        let mask = IndexMask(width: 9, height: 5, values: (0..<45).map { UInt16($0 % 21) })
        try ImageIO.writePalettePNG(mask, to: out.appendingPathComponent("m.png"))
        XCTAssertEqual(try ImageIO.readIndexPNG(out.appendingPathComponent("m.png")), mask)
        // The palette is VOC's: class 1 is (128, 0, 0), 15 (person) is (192, 128, 128).
        XCTAssertEqual(Array(vocPalette[3..<6]), [128, 0, 0])
        XCTAssertEqual(Array(vocPalette[45..<48]), [192, 128, 128])
        let colours = try ImageIO.readRGB(out.appendingPathComponent("m.png"))
        XCTAssertEqual(Array(colours.pixels[3..<6]), [128, 0, 0])
        XCTAssertFalse(FileManager.default.fileExists(atPath: out.appendingPathComponent("m.png.partial").path))
    }

    func testNormalizationRoundTrip() {
        let image = RGBImage(width: 2, height: 1, pixels: [0, 128, 255, 10, 20, 30])
        let t = Normalization.imagenet.tensor(image)
        XCTAssertEqual(t.shape, [1, 3, 1, 2])
        XCTAssertEqual(t[0, 0, 0, 0], (0 - 0.485) / 0.229, accuracy: 1e-6)
        XCTAssertEqual(t[0, 2, 0, 0], (1 - 0.406) / 0.225, accuracy: 1e-6)
        XCTAssertEqual(Normalization.imagenet.image(t), image)
    }

    func testNPYRoundTripAndHeader() throws {
        let t = randn([2, 3, 4, 5], seed: 4)
        let url = temporaryDirectory().appendingPathComponent("x.npy")
        try NPY.write(t, to: url)
        let data = try Data(contentsOf: url)
        XCTAssertEqual((10 + Int(data[8]) + Int(data[9]) << 8) % 64, 0, "header aligned to 64 bytes")
        XCTAssertTrue(String(decoding: data[10..<80], as: UTF8.self).contains("'shape': (2, 3, 4, 5)"))
        let back = try NPY.read(url)
        XCTAssertEqual(back.shape, t.shape)
        XCTAssertEqual(back.array, t.array)
    }

    func testPredictCommandWritesMasksOverlaysAndLogits() throws {
        let work = temporaryDirectory()
        let (model, card, _) = try Converter.convert(
            Fixtures.directory.appendingPathComponent("models/tv_small.pth"),
            ConversionOptions(
                architecture: ModelParityTests.tvSmall,
                classNames: DatasetClasses.voc))
        let modelURL = work.appendingPathComponent("m.safetensors")
        try ModelFile.save(model, card: card, to: modelURL)
        let imageURL = dir.appendingPathComponent("rgb.png")
        let npy = work.appendingPathComponent("logits.npy")
        let r = try runTool(
            "hrhf-predict", ["--model", modelURL.path, imageURL.path, "--out", work.path, "--logits", npy.path])
        XCTAssertEqual(r.status, 0, r.stderr)
        let logits = try NPY.read(npy)
        XCTAssertEqual(logits.shape, [1, 5, 13, 17])
        // The same logits as the library computes for the same image.
        let reference = try Predictor(model: model, card: card).logits(for: try ImageIO.readRGB(imageURL)).logits
        assertClose(logits, reference, "CLI logits")
        let mask = try ImageIO.readIndexPNG(work.appendingPathComponent("rgb_mask.png"))
        XCTAssertEqual(mask, argmaxMasks(reference)[0])
        let overlayImage = try ImageIO.readRGB(work.appendingPathComponent("rgb_overlay.png"))
        XCTAssertEqual(overlayImage.width, 17)
    }
}
