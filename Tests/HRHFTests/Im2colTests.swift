import XCTest

@testable import HRHF

/// The im2col copy against its definition, element by element.
final class Im2colTests: XCTestCase {
    /// Entry (c, j) x (oy, ox) of the im2col matrix by the definition: the input at
    /// (oy * stride - pad + ki * dilation, ox * stride - pad + kj * dilation), zero outside.
    func referenceEntry(
        _ x: [Float], _ geo: Conv2dGeometry, taps: [Int], row: Int, position: Int
    ) -> Float {
        let c = row / taps.count, tap = taps[row % taps.count]
        let (ki, kj) = (tap / geo.kernelW, tap % geo.kernelW)
        let (oy, ox) = (position / geo.outW, position % geo.outW)
        let iy = oy * geo.strideH - geo.padH + ki * geo.dilationH
        let ix = ox * geo.strideW - geo.padW + kj * geo.dilationW
        guard iy >= 0 && iy < geo.inH && ix >= 0 && ix < geo.inW else { return 0 }
        return x[(c * geo.inH + iy) * geo.inW + ix]
    }

    /// Strides 1 and 2, padding smaller, equal and larger than the reach, dilation 1 to 5 (taps
    /// on padding only), odd sizes, non-square kernels, every tap or a subset, all rows or a
    /// slice, the whole map or column blocks that start and end inside output rows: every entry
    /// equals the definition exactly (a copy, no arithmetic).
    func testIm2colMatchesTheDefinition() {
        var rng = SeededGenerator(seed: 11)
        var checked = 0
        for (kh, kw) in [(3, 3), (7, 7), (1, 3), (3, 1)] {
            for stride in [1, 2] {
                for dilation in [1, 2, 5] {
                    for pad in [0, 1, 3, 6] {
                        for (ih, iw) in [(9, 9), (7, 12), (16, 5)] {
                            let geo = Conv2dGeometry(
                                inChannels: 3, outChannels: 4, kernelH: kh, kernelW: kw, strideH: stride,
                                strideW: stride, padH: pad, padW: (pad + 1) / 2 * (kw > 1 ? 1 : 0),
                                dilationH: dilation, dilationW: dilation, groups: 1, inH: ih, inW: iw)
                            guard geo.outH > 0 && geo.outW > 0 else { continue }
                            let x = Tensor.randn([1, 3, ih, iw], rng: &rng)
                            let allTaps = Array(0..<(kh * kw))
                            for taps in [allTaps, allTaps.filter { $0 % 2 == 0 }] {
                                let k = 3 * taps.count, plane = geo.outH * geo.outW
                                for rows in [0..<k, 1..<(k - 1)] where !rows.isEmpty {
                                    for columns in [0..<plane, (plane / 3)..<(plane - 1)] where !columns.isEmpty {
                                        checked += compare(x.array, geo, taps: taps, rows: rows, columns: columns)
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        XCTAssertGreaterThan(checked, 100_000)
    }

    /// Fills the block with NaN first (so an entry left unwritten fails), then compares; returns
    /// the entries compared.
    func compare(_ x: [Float], _ geo: Conv2dGeometry, taps: [Int], rows: Range<Int>, columns: Range<Int>) -> Int {
        let width = columns.count
        var col = [Float](repeating: .nan, count: rows.count * width)
        x.withUnsafeBufferPointer { px in
            col.withUnsafeMutableBufferPointer { pc in
                im2col(px.baseAddress!, geo, taps: taps, rows: rows, columns: columns, into: pc.baseAddress!)
            }
        }
        for (i, row) in rows.enumerated() {
            for (j, p) in columns.enumerated() {
                let want = referenceEntry(x, geo, taps: taps, row: row, position: p)
                if col[i * width + j] != want {
                    XCTFail("\(geo) taps \(taps) row \(row) position \(p): \(col[i * width + j]) != \(want)")
                    return 0
                }
            }
        }
        return rows.count * width
    }

    /// col2im adds each im2col entry back to the input pixel it was read from: against that
    /// scatter, entry by entry in the same order (taps in turn), on the geometries of
    /// `testIm2colMatchesTheDefinition` with every tap live or not, whole maps and blocks of
    /// output rows. Exact: the same sums in the same order.
    func testCol2imAddsEachEntryWhereIm2colReadIt() {
        var rng = SeededGenerator(seed: 12)
        var checked = 0
        for (kh, kw) in [(3, 3), (1, 3)] {
            for stride in [1, 2] {
                for (dilation, pad) in [(1, 1), (2, 2), (5, 6), (1, 0)] {
                    for (ih, iw) in [(9, 9), (7, 12)] {
                        let geo = Conv2dGeometry(
                            inChannels: 2, outChannels: 3, kernelH: kh, kernelW: kw, strideH: stride, strideW: stride,
                            padH: pad, padW: kw > 1 ? pad : 0, dilationH: dilation, dilationW: dilation, groups: 1,
                            inH: ih, inW: iw)
                        guard geo.outH > 1 else { continue }
                        let taps = geo.liveTaps
                        for outRows in [0..<geo.outH, 1..<geo.outH] {
                            checked += compareCol2im(geo, taps: taps, outRows: outRows, rng: &rng)
                        }
                    }
                }
            }
        }
        XCTAssertGreaterThan(checked, 1000)
    }

    /// Returns the input entries compared.
    func compareCol2im(_ geo: Conv2dGeometry, taps: [Int], outRows: Range<Int>, rng: inout SeededGenerator) -> Int {
        let (h, w, ow) = (geo.inH, geo.inW, geo.outW)
        let width = outRows.count * ow, rows = geo.inChannels * taps.count
        let col = Tensor.randn([rows * width], rng: &rng).array
        let start = Tensor.randn([geo.inChannels * h * w], rng: &rng).array
        var want = start
        for row in 0..<rows {
            let c = row / taps.count, tap = taps[row % taps.count]
            for (i, oy) in outRows.enumerated() {
                for ox in 0..<ow {
                    let iy = oy * geo.strideH - geo.padH + tap / geo.kernelW * geo.dilationH
                    let ix = ox * geo.strideW - geo.padW + tap % geo.kernelW * geo.dilationW
                    if iy >= 0 && iy < h && ix >= 0 && ix < w {
                        want[(c * h + iy) * w + ix] += col[row * width + i * ow + ox]
                    }
                }
            }
        }
        var got = start, scratch = col
        scratch.withUnsafeMutableBufferPointer { pc in
            got.withUnsafeMutableBufferPointer { pg in
                col2im(
                    pc.baseAddress!, geo, taps: taps, channels: 0..<geo.inChannels, outRows: outRows,
                    into: pg.baseAddress!)
            }
        }
        XCTAssertEqual(got, want, "\(geo) output rows \(outRows)")
        return got.count
    }
}
