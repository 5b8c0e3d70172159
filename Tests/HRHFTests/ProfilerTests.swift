import XCTest

@testable import HRHF

final class ProfilerTests: XCTestCase {
    func testBackwardStepsCountAsTheKindTheirOpRanIn() throws {
        let conv = Conv2d(3, 4, kernelSize: 3, padding: 1, bias: false, rng: &Self.rng)
        let x = randn([1, 3, 8, 8], seed: 1)
        x.requiresGrad = true
        XCTAssertFalse(Profiler.isEnabled, "off unless a benchmark turns it on")
        XCTAssertEqual(conv(x).gradFn?.profileKind, .other)

        Profiler.start()
        defer { _ = Profiler.stop() }
        // Op hooks count inside a network's forward only: elsewhere the op is what encloses it.
        XCTAssertEqual(conv(x).gradFn?.profileKind, .other)
        let y = Profiler.network { relu(conv(x)) }
        XCTAssertEqual(y.gradFn?.profileKind, .elementwise)
        XCTAssertEqual(y.gradFn?.inputs[0].gradFn?.profileKind, .convolution)
        let loss = Profiler.region(.loss) { Profiler.network { sum(conv(x)) } }
        XCTAssertEqual(loss.gradFn?.profileKind, .elementwise)
        XCTAssertEqual(Profiler.region(.loss) { mean(y) }.gradFn?.profileKind, .loss)
        XCTAssertEqual(Profiler.region(.data) { Profiler.op(.convolution) { conv(x) } }.gradFn?.profileKind, .data)
    }

    func testConvolutionFlopsAreCountedOnlyWhileAsked() {
        let conv = Conv2d(3, 4, kernelSize: 3, padding: 1, bias: false, rng: &Self.rng)
        let x = randn([2, 3, 8, 8], seed: 1)
        x.requiresGrad = true
        _ = conv(x)
        Profiler.startCountingFlops()
        sum(conv(x)).backward()
        // 2 x Cout x Cin x (tap positions reading the image: 8x8 for the centre, fewer at the
        // edges; 6x6 + 4 x 6x7 + ... = 484 in all) per image; forward, input and weight gradient.
        let forward = 2.0 * 4 * 3 * 484 * 2
        XCTAssertEqual(Profiler.stopCountingFlops(), 3 * forward)
        _ = conv(x)
        XCTAssertEqual(Profiler.convolutionFlops, 3 * forward, "not counted once stopped")
    }

    func testConvolutionsAreTalliedByShapeAndPass() {
        let conv = Conv2d(3, 4, kernelSize: 3, padding: 1, bias: false, rng: &Self.rng)
        let pointwise = Conv2d(4, 2, kernelSize: 1, bias: false, rng: &Self.rng)
        let x = randn([2, 3, 8, 8], seed: 1)
        x.requiresGrad = true
        Profiler.start()
        sum(pointwise(conv(x))).backward()
        _ = conv(x)
        _ = Profiler.stop()
        let tally = Profiler.convolutionTally
        XCTAssertEqual(tally.count, 2)
        let shape = tally.keys.first { $0.geometry.kernelH == 3 }!
        XCTAssertEqual(shape.label, "3x3 d1 s1 3->4 @8x8 b2")
        XCTAssertEqual(shape.batch, 2)
        let t = tally[shape]!
        // Two forwards, one of each gradient; FLOPs as `testConvolutionFlopsAreCountedOnlyWhileAsked`.
        XCTAssertEqual(t.calls, [2, 1, 1])
        let forward = 2.0 * 4 * 3 * 484 * 2
        XCTAssertEqual(t.flops, [2 * forward, forward, forward])
        XCTAssertTrue(t.nanoseconds.allSatisfy { $0 > 0 })
        // Rows slowest first, one per shape, and a total row.
        let table = convolutionTable(tally, iterations: 2, sgemm: 100).split(separator: "\n")
        XCTAssertEqual(table.count, 2 + 2 + 1)
        XCTAssertTrue(table.last!.hasPrefix("total"))
        let slowest = tally.max { $0.value.totalSeconds < $1.value.totalSeconds }!.key
        XCTAssertTrue(table[2].hasPrefix(slowest.label))
        // Calls per iteration: the 3x3's two forwards over two iterations.
        XCTAssertEqual(table.first { $0.hasPrefix(shape.label) }!.split(separator: " ")[6], "1")
        Profiler.start()
        _ = Profiler.stop()
        XCTAssertTrue(Profiler.convolutionTally.isEmpty, "start clears the tally")
    }

    func testTimeCountsForTheInnermostRegionOnly() {
        Profiler.start()
        Profiler.region(.data) {
            usleep(30_000)
            Profiler.region(.loss) { _ = usleep(150_000) }
        }
        let seconds = Profiler.stop()
        XCTAssertFalse(Profiler.isEnabled)
        XCTAssertGreaterThanOrEqual(seconds[.loss]!, 0.15)
        XCTAssertGreaterThanOrEqual(seconds[.data]!, 0.03)
        XCTAssertLessThan(seconds[.data]!, 0.15, "the nested loss region is not data's")
        XCTAssertEqual(seconds[.convolution], 0)
    }

    func testAProfiledTrainingStepChargesEveryKindAndAllItsTime() throws {
        let model = try DeepLabV3(SynthesisTests.tinyArch, seed: 3)
        model.train()
        let sgd = SGD(model.parameters, learningRate: 0.01, momentum: 0.9)
        let x = randn([2, 3, 32, 32], seed: 4)
        let target = Labels(shape: [2, 32, 32], values: (0..<2048).map { Int32($0 % 6) })
        let start = DispatchTime.now().uptimeNanoseconds
        Profiler.start()
        let logits = model.run(x).logits
        let loss = Profiler.region(.loss) { crossEntropy(logits, target) }
        loss.backward()
        Profiler.region(.optimizer) { sgd.step() }
        let seconds = Profiler.stop()
        let wall = Double(DispatchTime.now().uptimeNanoseconds - start) / 1e9
        for kind in [ProfileKind.convolution, .batchNorm, .elementwise, .loss, .optimizer] {
            XCTAssertGreaterThan(seconds[kind]!, 0, "\(kind)")
        }
        XCTAssertEqual(seconds[.data], 0)
        let total = seconds.values.reduce(0, +)
        XCTAssertLessThanOrEqual(total, wall)
        XCTAssertGreaterThan(total, wall * 0.9, "every span between start and stop is charged to a kind")
    }

    func testTheTableGivesMillisecondsAndShares() {
        let table = profileTable([.convolution: 0.3, .loss: 0.1])
        let lines = table.split(separator: "\n").map { $0.split(separator: " ").joined(separator: " ") }
        XCTAssertEqual(lines[0], "op kind ms share")
        XCTAssertEqual(lines[2], "convolutions 300.0 75%")
        XCTAssertEqual(lines[5], "loss terms 100.0 25%")
        XCTAssertEqual(lines[6], "data loading and augmentation 0.0 0%")
        XCTAssertEqual(lines.last, "total 400.0 100%")
    }

    func testDistillationJobsRefuseToStartWithoutTheirData() throws {
        let (url, _, _) = try SynthesisTests.tinyTeacher()
        XCTAssertThrowsError(try JobBenchmark(job: .mib, model: url, data: nil, pack: nil)) { e in
            XCTAssertEqual(e as? OptionError, OptionError(option: "--data", "job mib needs a Shapes root"))
        }
        XCTAssertThrowsError(try JobBenchmark(job: .hrhfGSC, model: url, data: temporaryDirectory(), pack: nil)) { e in
            XCTAssertEqual(e as? OptionError, OptionError(option: "--pack", "job hrhf+gsc needs a pack"))
        }
    }

    nonisolated(unsafe) static var rng = SeededGenerator(seed: 7)
}
