import Foundation

/// Learning rate as a function of the iteration (0-based), with optional linear warm-up.
public enum LearningRateSchedule: Sendable, Equatable {
    case constant
    /// base * (1 - it / total)^power, MiB's and PLOP's schedule (power 0.9).
    case poly(power: Float)
    /// base * (1 + cos(pi * t)) / 2 after warm-up, t going from 0 to 1.
    case cosine

    /// The rate at iteration `it` of `total`; during the first `warmup` iterations the rate
    /// rises linearly, base * (it + 1) / warmup, and the main schedule runs over the rest.
    public func rate(base: Float, iteration it: Int, total: Int, warmup: Int = 0) -> Float {
        precondition(total > 0 && warmup >= 0 && warmup < total, "schedule: warm-up \(warmup) of \(total)")
        if it < warmup { return base * Float(it + 1) / Float(warmup) }
        let t = Float(min(it - warmup, total - warmup)) / Float(total - warmup)
        switch self {
        case .constant: return base
        case .poly(let power): return base * Foundation.pow(max(1 - t, 0), power)
        case .cosine: return base * 0.5 * (1 + Foundation.cos(Float.pi * t))
        }
    }
}
