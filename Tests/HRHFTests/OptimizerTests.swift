import XCTest

@testable import HRHF

/// torch.optim parity on one gradient sequence (Fixtures/core_ops.safetensors), and schedules.
final class OptimizerTests: XCTestCase {
    let file = "core_ops.safetensors"

    func run(_ name: String, _ make: (Tensor) -> Optimizer) throws {
        let p = try Fixtures.tensor(file, "optim/p0").requiringGrad()
        let opt = make(p)
        for i in 0..<5 {
            p.grad = try Fixtures.tensor(file, "optim/grad\(i)")
            opt.step()
            // Five chained float32 updates: relative error within 1e-5 of the float64 reference.
            assertClose(p, try Fixtures.tensor(file, "optim/\(name)/step\(i)"), tolerance: 1e-5, "\(name) step \(i)")
        }
    }

    func testSGDMatchesTorch() throws {
        try run("sgd_momentum") { SGD([$0], learningRate: 0.1, momentum: 0.9, weightDecay: 1e-2) }
        try run("sgd_nesterov") { SGD([$0], learningRate: 0.05, momentum: 0.9, weightDecay: 1e-4, nesterov: true) }
        try run("sgd_plain") { SGD([$0], learningRate: 0.2) }
    }

    func testAdamMatchesTorch() throws {
        try run("adam") { Adam([$0], learningRate: 0.01) }
        try run("adam_inversion") { Adam([$0], learningRate: 0.05, betas: (0.5, 0.9), weightDecay: 1e-3) }
    }

    func testOptimizerStateRestoresTheTrajectory() throws {
        // Two steps, save state, two more steps == restore into a fresh optimizer, two steps.
        let grads = (0..<4).map { randn([6], seed: UInt64(200 + $0)) }
        let a = randn([6], seed: 210).requiringGrad()
        let sgd = SGD([a], learningRate: 0.1, momentum: 0.9, nesterov: true)
        for g in grads[0..<2] {
            a.grad = g
            sgd.step()
        }
        let saved = Dictionary(uniqueKeysWithValues: sgd.stateTensors().map { ($0.name, $0.tensor.copy()) })
        let midpoint = a.copy()
        for g in grads[2...] {
            a.grad = g
            sgd.step()
        }
        let b = midpoint.requiringGrad()
        let resumed = SGD([b], learningRate: 0.1, momentum: 0.9, nesterov: true)
        resumed.loadState(saved)
        for g in grads[2...] {
            b.grad = g
            resumed.step()
        }
        XCTAssertEqual(a.array, b.array)
    }

    func testSchedules() {
        let poly = LearningRateSchedule.poly(power: 0.9)
        XCTAssertEqual(poly.rate(base: 0.01, iteration: 0, total: 100), 0.01, accuracy: 1e-9)
        XCTAssertEqual(poly.rate(base: 0.01, iteration: 50, total: 100), 0.01 * pow(0.5, 0.9), accuracy: 1e-8)
        XCTAssertEqual(poly.rate(base: 0.01, iteration: 100, total: 100), 0, accuracy: 1e-9)
        let cosine = LearningRateSchedule.cosine
        // Warm-up of 10: 0.1 * (it + 1) / 10, then the half cosine over the remaining 90.
        XCTAssertEqual(cosine.rate(base: 0.1, iteration: 0, total: 100, warmup: 10), 0.01, accuracy: 1e-8)
        XCTAssertEqual(cosine.rate(base: 0.1, iteration: 9, total: 100, warmup: 10), 0.1, accuracy: 1e-8)
        XCTAssertEqual(cosine.rate(base: 0.1, iteration: 10, total: 100, warmup: 10), 0.1, accuracy: 1e-8)
        XCTAssertEqual(cosine.rate(base: 0.1, iteration: 55, total: 100, warmup: 10), 0.05, accuracy: 1e-7)
        XCTAssertEqual(cosine.rate(base: 0.1, iteration: 100, total: 100, warmup: 10), 0, accuracy: 1e-8)
        XCTAssertEqual(LearningRateSchedule.constant.rate(base: 0.3, iteration: 77, total: 100), 0.3)
    }
}
