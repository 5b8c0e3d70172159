import Foundation

/// A 5 x 7 pixel font for labels on contact sheets: digits, letters (drawn upper case) and a
/// little punctuation. Each glyph is seven rows of five bits, high bit on the left.
enum BitmapFont {
    static let glyphs: [Character: [UInt8]] = [
        "A": [0x0E, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11], "B": [0x1E, 0x11, 0x11, 0x1E, 0x11, 0x11, 0x1E],
        "C": [0x0E, 0x11, 0x10, 0x10, 0x10, 0x11, 0x0E], "D": [0x1E, 0x11, 0x11, 0x11, 0x11, 0x11, 0x1E],
        "E": [0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x1F], "F": [0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x10],
        "G": [0x0E, 0x11, 0x10, 0x17, 0x11, 0x11, 0x0F], "H": [0x11, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11],
        "I": [0x0E, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E], "J": [0x07, 0x02, 0x02, 0x02, 0x02, 0x12, 0x0C],
        "K": [0x11, 0x12, 0x14, 0x18, 0x14, 0x12, 0x11], "L": [0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x1F],
        "M": [0x11, 0x1B, 0x15, 0x15, 0x11, 0x11, 0x11], "N": [0x11, 0x11, 0x19, 0x15, 0x13, 0x11, 0x11],
        "O": [0x0E, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E], "P": [0x1E, 0x11, 0x11, 0x1E, 0x10, 0x10, 0x10],
        "Q": [0x0E, 0x11, 0x11, 0x11, 0x15, 0x12, 0x0D], "R": [0x1E, 0x11, 0x11, 0x1E, 0x14, 0x12, 0x11],
        "S": [0x0F, 0x10, 0x10, 0x0E, 0x01, 0x01, 0x1E], "T": [0x1F, 0x04, 0x04, 0x04, 0x04, 0x04, 0x04],
        "U": [0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E], "V": [0x11, 0x11, 0x11, 0x11, 0x11, 0x0A, 0x04],
        "W": [0x11, 0x11, 0x11, 0x15, 0x15, 0x15, 0x0A], "X": [0x11, 0x11, 0x0A, 0x04, 0x0A, 0x11, 0x11],
        "Y": [0x11, 0x11, 0x11, 0x0A, 0x04, 0x04, 0x04], "Z": [0x1F, 0x01, 0x02, 0x04, 0x08, 0x10, 0x1F],
        "0": [0x0E, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0E], "1": [0x04, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E],
        "2": [0x0E, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1F], "3": [0x1F, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0E],
        "4": [0x02, 0x06, 0x0A, 0x12, 0x1F, 0x02, 0x02], "5": [0x1F, 0x10, 0x1E, 0x01, 0x01, 0x11, 0x0E],
        "6": [0x06, 0x08, 0x10, 0x1E, 0x11, 0x11, 0x0E], "7": [0x1F, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08],
        "8": [0x0E, 0x11, 0x11, 0x0E, 0x11, 0x11, 0x0E], "9": [0x0E, 0x11, 0x11, 0x0F, 0x01, 0x02, 0x0C],
        "-": [0, 0, 0, 0x1F, 0, 0, 0], ".": [0, 0, 0, 0, 0, 0x0C, 0x0C],
        "%": [0x18, 0x19, 0x02, 0x04, 0x08, 0x13, 0x03],
        ":": [0, 0x0C, 0x0C, 0, 0x0C, 0x0C, 0], ",": [0, 0, 0, 0, 0x0C, 0x04, 0x08],
        "/": [0, 0x01, 0x02, 0x04, 0x08, 0x10, 0],
        "(": [0x02, 0x04, 0x08, 0x08, 0x08, 0x04, 0x02], ")": [0x08, 0x04, 0x02, 0x02, 0x02, 0x04, 0x08],
        "+": [0, 0x04, 0x04, 0x1F, 0x04, 0x04, 0], "=": [0, 0, 0x1F, 0, 0x1F, 0, 0], " ": [0, 0, 0, 0, 0, 0, 0],
    ]

    /// Draws `text` with its top-left corner at (x, y), clipped to the image; unknown
    /// characters are drawn as '?' boxes. Returns the x after the text.
    @discardableResult
    static func draw(_ text: String, into image: inout RGBImage, x: Int, y: Int, colour: (UInt8, UInt8, UInt8)) -> Int {
        var cx = x
        for ch in text.uppercased() {
            let rows = glyphs[ch] ?? [0x1F, 0x11, 0x11, 0x11, 0x11, 0x11, 0x1F]
            for (r, bits) in rows.enumerated() {
                for c in 0..<5 where bits & (0x10 >> UInt8(c)) != 0 {
                    let px = cx + c, py = y + r
                    guard px >= 0, py >= 0, px < image.width, py < image.height else { continue }
                    let i = (py * image.width + px) * 3
                    image.pixels[i] = colour.0
                    image.pixels[i + 1] = colour.1
                    image.pixels[i + 2] = colour.2
                }
            }
            cx += 6
        }
        return cx
    }
}

/// Copies `source` into `target` with its top-left corner at (x, y).
func paste(_ source: RGBImage, into target: inout RGBImage, x: Int, y: Int) {
    for sy in 0..<source.height where y + sy < target.height {
        for sx in 0..<source.width where x + sx < target.width {
            for c in 0..<3 {
                target.pixels[((y + sy) * target.width + x + sx) * 3 + c] =
                    source.pixels[(sy * source.width + sx) * 3 + c]
            }
        }
    }
}

/// A grid of pack images, each beside its pseudo-label overlay, captioned with the target
/// classes and their target/achieved areas. The sheet is at most `maxPixels` pixels.
public func contactSheet(
    _ pack: SyntheticPack, columns: Int = 4, limit: Int = 16,
    maxPixels: Int = ImageIO.defaultPixelLimit
) throws -> RGBImage {
    let path = pack.url.path
    guard columns >= 1, limit >= 1 else {
        throw PackError(
            file: path,
            "a contact sheet needs at least one column and one image (columns \(columns), limit \(limit))")
    }
    let records = Array(pack.manifest.images.prefix(limit))
    guard !records.isEmpty else { throw PackError(file: path, "the pack has no images") }
    // The pack's verified resolution and classes bound every cell (a record has at most one target per class).
    let names = pack.manifest.teacher.card.classNames
    let side = pack.manifest.generator.options.resolution
    let captionLines = min(pack.manifest.generator.options.maxClasses, pack.manifest.classes.count)
    let cellW = 2 * side + 12, cellH = side + 10 + 9 * captionLines
    let columns = min(columns, records.count), rows = (records.count + columns - 1) / columns
    let (sheetW, wideOverflow) = columns.multipliedReportingOverflow(by: cellW)
    let (sheetH, highOverflow) = rows.multipliedReportingOverflow(by: cellH)
    let (pixels, areaOverflow) = (sheetW + 4).multipliedReportingOverflow(by: sheetH + 4)
    guard !wideOverflow, !highOverflow, !areaOverflow, pixels <= maxPixels else {
        throw PackError(
            file: path,
            "a sheet of \(records.count) images in \(columns) columns is over the limit of "
                + "\(maxPixels) pixels: lower --limit")
    }
    var sheet = RGBImage(width: sheetW + 4, height: sheetH + 4, fill: (24, 24, 24))
    for (i, r) in records.enumerated() {
        let x = 4 + (i % columns) * cellW, y = 4 + (i / columns) * cellH
        let image = try pack.image(r), label = try pack.label(r)
        paste(image, into: &sheet, x: x, y: y)
        paste(try overlay(image, label, name: "\(path): \(r.label)"), into: &sheet, x: x + side + 4, y: y)
        for (line, (c, (target, achieved))) in zip(r.targets, zip(r.targetAreas, r.achievedAreas)).enumerated() {
            let colour = (vocPalette[3 * c], vocPalette[3 * c + 1], vocPalette[3 * c + 2])
            let top = y + side + 3 + 9 * line
            for dy in 0..<7 {
                for dx in 0..<5 {
                    let p = ((top + dy) * sheet.width + x + dx) * 3
                    sheet.pixels[p] = colour.0
                    sheet.pixels[p + 1] = colour.1
                    sheet.pixels[p + 2] = colour.2
                }
            }
            BitmapFont.draw(
                String(format: "%@ %.0f%%/%.0f%%", names[c], 100 * target, 100 * achieved), into: &sheet,
                x: x + 8, y: top, colour: (230, 230, 230))
        }
    }
    return sheet
}
