import XCTest

@testable import HRHF

/// Convolutions as one product per tap over the rectangle where it reads the image, against
/// the im2col path (PyTorch parity of both is in PyTorchParityTests.testConv2dCases).
final class ConvPerTapTests: XCTestCase {
    func geometry(channels: Int, size: Int, dilation: Int, padding: Int? = nil) -> Conv2dGeometry {
        Conv2dGeometry(
            inChannels: channels, outChannels: 256, kernelH: 3, kernelW: 3, strideH: 1, strideW: 1,
            padH: padding ?? dilation, padW: padding ?? dilation, dilationH: dilation, dilationW: dilation,
            groups: 1, inH: size, inW: size)
    }

    /// Rectangles and counts by hand for ASPP's rate 12 on a 32x32 map: a corner tap reads the
    /// image at 20x20 outputs, an edge tap at 20x32, the centre at all 32x32, so
    /// 4 * 400 + 4 * 640 + 1024 = 5184 of 9 * 1024 positions (56.25%).
    func testTapRectanglesAndTheWorkTheyCount() {
        let d12 = geometry(channels: 2048, size: 32, dilation: 12)
        let rects = d12.tapRects
        XCTAssertEqual(rects.map(\.tap), Array(0..<9))
        XCTAssertEqual(rects[0].rows, 12..<32)
        XCTAssertEqual(rects[0].cols, 12..<32)
        XCTAssertEqual(rects[0].dy, -12)
        XCTAssertEqual(rects[5].rows, 0..<32)
        XCTAssertEqual(rects[5].cols, 0..<20)
        XCTAssertEqual(rects[5].dx, 12)
        XCTAssertEqual(d12.imageReadingTapPositions, 5184)
        XCTAssertEqual(d12.imageReadingShare, 0.5625, accuracy: 1e-12)
        XCTAssertEqual(d12.flopsPerImage, 2 * 256 * 2048 * 5184)
        // Rate 36: only the centre tap reads the image.
        XCTAssertEqual(geometry(channels: 2048, size: 32, dilation: 36).tapRects.map(\.tap), [4])
        // Stride 2, padding 1, 7x7 input: tap 0 reads from output 1 on, tap 2 up to output 2.
        XCTAssertEqual(Conv2dGeometry.liveOutputs(0, stride: 2, pad: 1, dilation: 1, inSize: 7, outSize: 4), 1..<4)
        XCTAssertEqual(Conv2dGeometry.liveOutputs(2, stride: 2, pad: 1, dilation: 1, inSize: 7, outSize: 4), 0..<3)
        XCTAssertEqual(Conv2dGeometry.liveOutputs(2, stride: 1, pad: 6, dilation: 6, inSize: 5, outSize: 5), 0..<0)
    }

    /// Which convolutions of DeepLabV3-ResNet at 256x256 (32x32 maps at output stride 8) and of
    /// the zoo model (16x16 maps, 128 channels into the ASPP) take it.
    func testTheAutomaticChoice() {
        XCTAssertTrue(
            geometry(channels: 2048, size: 32, dilation: 12).runsPerTap, "ASPP rate 12: 56% of im2col reads the image")
        XCTAssertTrue(geometry(channels: 2048, size: 32, dilation: 24).runsPerTap, "ASPP rate 24: 25%")
        XCTAssertTrue(geometry(channels: 512, size: 32, dilation: 4).runsPerTap, "layer4's rate 4: 84%")
        XCTAssertTrue(geometry(channels: 256, size: 32, dilation: 2).runsPerTap, "layer3's rate 2: 92%")
        XCTAssertFalse(geometry(channels: 256, size: 64, dilation: 1).runsPerTap, "rate 1 on a 64x64 map: 97%")
        XCTAssertFalse(geometry(channels: 64, size: 64, dilation: 1).runsPerTap, "layer1: too shallow a product")
        XCTAssertFalse(geometry(channels: 128, size: 16, dilation: 4).runsPerTap, "128 channels, 69%: too shallow")
        XCTAssertTrue(geometry(channels: 128, size: 16, dilation: 12).runsPerTap, "the zoo model's ASPP rate 12: 25%")
        XCTAssertTrue(geometry(channels: 128, size: 16, dilation: 36).runsPerTap, "rate 36: the centre tap, 11%")
        XCTAssertFalse(geometry(channels: 64, size: 16, dilation: 12).runsPerTap, "64 channels: too shallow")
        var strided = geometry(channels: 2048, size: 32, dilation: 12)
        strided.strideH = 2
        XCTAssertFalse(strided.runsPerTap, "stride 2 stays on im2col")
    }

    /// An ASPP-shaped layer (256 input channels, so the automatic choice takes the per-tap path)
    /// at rates whose taps cover the map partly, wholly and not at all, odd sizes and padding
    /// unlike the rate, one and two images, one to three threads, whole and one-row products:
    /// values, input and weight gradients match im2col's to relative 1e-5 (the same products
    /// summed in another order: tap by tap instead of in one long dot product).
    func testPerTapProductsMatchIm2col() {
        let saved = (ParallelConfig.threads, Im2colBlocking.floats, PerTapProducts.mode)
        defer { (ParallelConfig.threads, Im2colBlocking.floats, PerTapProducts.mode) = saved }
        // (batch, height, width, dilation, padding, kernel)
        let cases = [
            (1, 9, 11, 4, 4, 3), (2, 7, 6, 3, 2, 3), (1, 6, 5, 2, 3, 3), (2, 5, 7, 1, 1, 3), (1, 6, 6, 6, 6, 3),
            (1, 8, 7, 2, 4, 5),
        ]
        for (i, c) in cases.enumerated() {
            let x = randn([c.0, 256, c.1, c.2], seed: UInt64(300 + i))
            let w = randn([6, 256, c.5, c.5], seed: UInt64(310 + i), std: 0.05)
            let bias = randn([6], seed: UInt64(320 + i))
            let geo = Conv2dGeometry(
                inChannels: 256, outChannels: 6, kernelH: c.5, kernelW: c.5, strideH: 1, strideW: 1,
                padH: c.4, padW: c.4, dilationH: c.3, dilationW: c.3, groups: 1, inH: c.1, inW: c.2)
            func run() -> [Tensor] {
                let (xi, wi, bi) = (x.detached(), w.detached(), bias.detached())
                for t in [xi, wi, bi] { t.requiresGrad = true }
                let y = conv2d(xi, weight: wi, bias: bi, padding: (c.4, c.4), dilation: (c.3, c.3))
                sum(y * randn(y.shape, seed: UInt64(330 + i))).backward()
                return [y, xi.grad!, wi.grad!, bi.grad!]
            }
            PerTapProducts.mode = .never
            ParallelConfig.threads = 1
            let reference = run()
            PerTapProducts.mode = .auto
            XCTAssertEqual(geo.runsPerTap, geo.imageReadingShare <= 0.95, "case \(i)")
            PerTapProducts.mode = .always
            for (threads, floats) in [(1, saved.1), (2, saved.1), (3, saved.1), (2, 1)] {
                (ParallelConfig.threads, Im2colBlocking.floats) = (threads, floats)
                let got = run()
                for (k, what) in ["output", "input gradient", "weight gradient", "bias gradient"].enumerated() {
                    assertClose(
                        got[k], reference[k], tolerance: 1e-5,
                        "case \(i) \(what) at \(threads) threads, block \(floats)")
                }
            }
        }
    }

    /// The evaluation block (folded batch norm and ReLU) and its input gradient, per tap and by
    /// im2col; and finite differences through the per-tap path of conv2d.
    func testPerTapEvaluationBlockAndFiniteDifferences() {
        let saved = (ParallelConfig.threads, PerTapProducts.mode)
        defer { (ParallelConfig.threads, PerTapProducts.mode) = saved }
        ParallelConfig.threads = 2
        let x = randn([1, 256, 7, 8], seed: 340), w = randn([5, 256, 3, 3], seed: 341, std: 0.05)
        let scale = randn([5], seed: 342), shift = randn([5], seed: 343)
        var results: [[Tensor]] = []
        for mode in [PerTapProducts.Mode.never, .always] {
            PerTapProducts.mode = mode
            let xi = x.detached()
            xi.requiresGrad = true
            let y = conv2dAffine(
                xi, weight: w, scale: scale, shift: shift, negativeSlope: 0, padding: (5, 5), dilation: (5, 5))
            sum(y * randn(y.shape, seed: 344)).backward()
            results.append([y, xi.grad!])
        }
        assertClose(results[1][0], results[0][0], tolerance: 1e-5, "per-tap evaluation block values")
        assertClose(results[1][1], results[0][1], tolerance: 1e-5, "per-tap evaluation block input gradient")
        PerTapProducts.mode = .always
        let small = randn([2, 3, 6, 5], seed: 345), ws = randn([4, 3, 3, 3], seed: 346, std: 0.3),
            bs = randn([4], seed: 347)
        checkGradients([small, ws, bs], samples: 8) { t in
            conv2d(t[0], weight: t[1], bias: t[2], padding: (3, 3), dilation: (3, 3))
        }
    }
}
