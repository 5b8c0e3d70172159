import Foundation

/// The shard (K of N, K from 1) an array job's task makes, from the environment its scheduler
/// gives it: Slurm's SLURM_ARRAY_TASK_ID (counted from SLURM_ARRAY_TASK_MIN) and
/// SLURM_ARRAY_TASK_COUNT, or Kubernetes' JOB_COMPLETION_INDEX (from 0) of an Indexed Job, whose
/// count is `count` or HRHF_SHARD_COUNT (the Job's `completions`, which Kubernetes does not export).
public func shardFromEnvironment(
    _ environment: [String: String],
    count: Int? = nil
) throws -> (index: Int, count: Int) {
    func number(_ key: String) throws -> Int? {
        guard let text = environment[key] else { return nil }
        guard let value = Int(text.trimmingCharacters(in: .whitespaces)) else {
            throw OptionError(option: "--shard auto", "\(key): environment variable is \"\(text)\", not a whole number")
        }
        return value
    }
    let index: Int, total: Int
    if let task = try number("SLURM_ARRAY_TASK_ID") {
        guard let tasks = try count ?? number("SLURM_ARRAY_TASK_COUNT") else {
            throw OptionError(option: "--shard auto", "SLURM_ARRAY_TASK_COUNT: not set: give the shard count")
        }
        index = task - (try number("SLURM_ARRAY_TASK_MIN") ?? 0) + 1
        total = tasks
    } else if let completion = try number("JOB_COMPLETION_INDEX") {
        guard let completions = try count ?? number("HRHF_SHARD_COUNT") else {
            throw OptionError(
                option: "--shard auto",
                "JOB_COMPLETION_INDEX: set, but not the count: give --shard-count or HRHF_SHARD_COUNT")
        }
        index = completion + 1
        total = completions
    } else {
        throw OptionError(option: "--shard auto", "needs SLURM_ARRAY_TASK_ID or JOB_COMPLETION_INDEX")
    }
    guard total >= 1, index >= 1, index <= total else {
        throw OptionError(option: "--shard auto", "shard \(index) of \(total) is outside 1...\(total)")
    }
    return (index, total)
}
