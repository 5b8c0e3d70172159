import Foundation

/// A whole `hrhf-synth` run: batches of SegInversion written to a work directory as they
/// finish (so `--resume` continues after a kill), then assembled into the pack.
public struct SynthesisJob {
    public var teacherURL: URL
    public var model: DeepLabV3
    public var card: ModelCard
    public var classes: [Int]
    public var count: Int
    public var options: InversionOptions
    public var seed: UInt64
    /// (K, N): make the K-th of N disjoint parts, K from 1.
    public var shard: (index: Int, count: Int)?
    public var out: URL

    public init(
        teacherURL: URL, model: DeepLabV3, card: ModelCard, classes: [Int], count: Int, options: InversionOptions,
        seed: UInt64, shard: (index: Int, count: Int)? = nil, out: URL
    ) {
        self.teacherURL = teacherURL
        self.model = model
        self.card = card
        self.classes = classes
        self.count = count
        self.options = options
        self.seed = seed
        self.shard = shard
        self.out = out
    }

    public var workDirectory: URL { URL(fileURLWithPath: out.path + ".partial.d") }
    public var batchCount: Int { (count + options.batchSize - 1) / options.batchSize }

    /// This run's batches: all, or every N-th starting at K-1 for a shard.
    public var batches: [Int] {
        guard let shard else { return Array(0..<batchCount) }
        return (0..<batchCount).filter { $0 % shard.count == shard.index - 1 }
    }

    /// What a resumed run must share with the interrupted one.
    struct Identity: Codable, Equatable {
        var options: InversionOptions
        var seed: UInt64
        var count: Int
        var classes: [Int]
        var teacherSHA256: String
        var shard: [Int]?
    }

    public struct Outcome {
        public var manifest: PackManifest
        public var seconds: Double
        public var imagesMade: Int
        public var resumedImages: Int
        public var imagesPerMinute: Double { seconds > 0 ? Double(imagesMade) / seconds * 60 : 0 }
    }

    /// What `--resume` found of an interrupted run: its work directory and the batches (of this
    /// run's) finished there.
    public struct ResumedWork {
        public var directory: URL
        public var batches: [Int]
        public var images: Int
    }

    /// Thrown when `stopAfterBatches` cuts a run short (tests simulate a kill with it).
    public struct Interrupted: Error {}

    /// Runs (or continues, with `resume`) and writes the pack. `started` sees what is resumed
    /// (nil for a fresh run) before any work; `progress` sees (finished teacher iterations,
    /// resumed ones included, total iterations of this run, current loss).
    public func run(
        resume: Bool, stopAfterBatches: Int? = nil, communicator: Communicator = .single,
        started: ((ResumedWork?) -> Void)? = nil,
        progress: ((Int, Int, Float) -> Void)? = nil
    ) throws -> Outcome {
        if communicator.size > 1 {
            return try runAcrossRanks(communicator, resume: resume, started: started, progress: progress)
        }
        let fm = FileManager.default
        let teacherSHA = try sha256Hex(file: teacherURL)
        let resuming = try openWorkDirectory(resume: resume, teacherSHA: teacherSHA)
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        let mine = batches
        // Batches an interrupted run finished: their record files, written last, are complete.
        var finished: [Int: [SynthesisRecord]] = [:]
        if resuming { for b in mine { finished[b] = try completedRecords(b) } }
        let resumedImages = finished.values.reduce(0) { $0 + $1.count }
        started?(
            resuming
                ? ResumedWork(directory: workDirectory, batches: finished.keys.sorted(), images: resumedImages) : nil)
        let inversion = try SegInversion(
            teacher: model, normalization: card.normalization, classes: classes, options: options)
        var records: [SynthesisRecord] = []
        var made = 0, madeBatches = 0
        let resumedIterations = finished.count * options.iterations
        let start = Date()
        for b in mine {
            if let done = finished[b] {
                records += done
                continue
            }
            if let stop = stopAfterBatches, made >= stop * options.batchSize { throw Interrupted() }
            let first = b * options.batchSize, n = min(options.batchSize, count - first)
            let images = inversion.synthesize(batch: b, firstIndex: first, count: n, seed: seed) { it, total, loss in
                progress?(resumedIterations + madeBatches * total + it, mine.count * total, loss)
            }
            for s in images {
                try ImageIO.writePNG(s.image, to: workDirectory.appendingPathComponent(s.record.image))
                try ImageIO.writePalettePNG(s.label, to: workDirectory.appendingPathComponent(s.record.label))
            }
            // The batch's record file is written last: its presence marks the batch complete.
            try writeAtomically(try encoder.encode(images.map(\.record)), to: recordURL(b))
            records += images.map(\.record)
            made += n
            madeBatches += 1
        }
        let manifest = try writePack(records: records, teacherSHA: teacherSHA)
        // The pack is complete: a work directory left behind costs disk space, nothing else.
        try? fm.removeItem(at: workDirectory)
        return Outcome(
            manifest: manifest, seconds: Date().timeIntervalSince(start), imagesMade: made,
            resumedImages: resumedImages)
    }

    /// Creates the work directory, or checks that the interrupted run in it had this job's identity;
    /// true when it resumes one.
    private func openWorkDirectory(resume: Bool, teacherSHA: String) throws -> Bool {
        let fm = FileManager.default
        let identity = Identity(
            options: options, seed: seed, count: count, classes: classes, teacherSHA256: teacherSHA,
            shard: shard.map { [$0.index, $0.count] })
        let identityURL = workDirectory.appendingPathComponent("job.json")
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        if fm.fileExists(atPath: workDirectory.path) {
            guard resume else {
                throw PackError(
                    file: workDirectory.path, "an interrupted run is here: pass --resume to continue it, or delete it")
            }
            let previous: Identity
            do {
                previous = try JSONDecoder().decode(Identity.self, from: Data(contentsOf: identityURL))
            } catch {
                throw PackError(file: identityURL.path, "cannot read the interrupted run's description: \(error)")
            }
            guard previous == identity else {
                throw PackError(
                    file: identityURL.path, "the interrupted run used other options, seed, classes or teacher")
            }
            return true
        } else {
            for sub in ["batches", "images", "labels"] {
                try fm.createDirectory(at: workDirectory.appendingPathComponent(sub), withIntermediateDirectories: true)
            }
            try writeAtomically(try encoder.encode(identity), to: identityURL)
            return false
        }
    }

    private func recordURL(_ batch: Int) -> URL {
        workDirectory.appendingPathComponent(String(format: "batches/%06d.json", batch))
    }

    /// The records of a batch an earlier run completed, or nil.
    private func completedRecords(_ batch: Int) throws -> [SynthesisRecord]? {
        let url = recordURL(batch)
        guard FileManager.default.fileExists(atPath: url.path) else { return nil }
        do {
            return try JSONDecoder().decode([SynthesisRecord].self, from: Data(contentsOf: url))
        } catch {
            throw PackError(file: url.path, "an interrupted run's batch record is unreadable (\(error)): delete it")
        }
    }

    /// Assembles the pack from the work directory's images and labels.
    private func writePack(records unsorted: [SynthesisRecord], teacherSHA: String) throws -> PackManifest {
        let records = unsorted.sorted { $0.index < $1.index }
        let manifest = PackManifest(
            generator: .init(name: "hrhf-synth", version: toolkitVersion, options: options, seed: seed, count: count),
            teacher: .init(file: teacherURL.lastPathComponent, sha256: teacherSHA, card: card),
            classes: classes.map {
                ClassInfo(id: $0, name: $0 < card.classes.count ? card.classes[$0].name : "class \($0)")
            },
            shard: shard.map { .init(index: $0.index, count: $0.count) },
            images: records,
            // Throughput is left out of the manifest: the same seed must give the same bytes.
            quality: SynthesisQuality(records: records, imagesPerMinute: nil))
        try SyntheticPack.write(
            manifest: manifest, files: { try Data(contentsOf: workDirectory.appendingPathComponent($0)) }, to: out)
        return manifest
    }

    /// One synthesised batch as it travels from a rank to rank 0.
    private struct BatchFiles: Codable {
        var batch: Int
        var records: [SynthesisRecord]
        var files: [String: Data]
    }

    /// The run under several MPI ranks: rank 0 keeps the work directory (so `--resume` works as
    /// in one process) and tells the ranks which batches remain; in each round every rank
    /// synthesises one of them, rank 0 gathers the images, labels and records and stores them,
    /// and at the end writes the pack, byte-identical to one process's (a batch's images depend
    /// on the seed and the batch alone).
    private func runAcrossRanks(
        _ communicator: Communicator, resume: Bool, started: ((ResumedWork?) -> Void)?,
        progress: ((Int, Int, Float) -> Void)?
    ) throws -> Outcome {
        let start = Date()
        let teacherSHA = try sha256Hex(file: teacherURL)
        var records: [SynthesisRecord] = [], remaining: [Int] = []
        if communicator.isRoot {
            let resuming = try openWorkDirectory(resume: resume, teacherSHA: teacherSHA)
            var finished: [Int] = []
            for b in batches {
                if let done = try completedRecords(b) {
                    records += done
                    finished.append(b)
                } else {
                    remaining.append(b)
                }
            }
            started?(resuming ? ResumedWork(directory: workDirectory, batches: finished, images: records.count) : nil)
        }
        let plan = communicator.broadcast(try JSONEncoder().encode(remaining))
        remaining = try JSONDecoder().decode([Int].self, from: plan)
        let resumed = records.count
        let inversion = try SegInversion(
            teacher: model, normalization: card.normalization, classes: classes, options: options)
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        let rounds = (remaining.count + communicator.size - 1) / communicator.size
        var made = 0
        for round in 0..<rounds {
            let slot = round * communicator.size + communicator.rank
            var mine = Data()
            if slot < remaining.count {
                let b = remaining[slot], first = b * options.batchSize, n = min(options.batchSize, count - first)
                let images = inversion.synthesize(batch: b, firstIndex: first, count: n, seed: seed) { it, all, loss in
                    progress?(
                        (batches.count - remaining.count + round * communicator.size) * all + it * communicator.size,
                        batches.count * all, loss)
                }
                var files: [String: Data] = [:]
                for s in images {
                    files[s.record.image] = try ImageIO.encodePNG(s.image)
                    files[s.record.label] = try ImageIO.encodePalettePNG(s.label)
                }
                mine = try encoder.encode(BatchFiles(batch: b, records: images.map(\.record), files: files))
            }
            guard let gathered = communicator.gather(mine) else { continue }
            for data in gathered where !data.isEmpty {
                let part = try JSONDecoder().decode(BatchFiles.self, from: data)
                for (name, bytes) in part.files {
                    try writeAtomically(bytes, to: workDirectory.appendingPathComponent(name))
                }
                // The batch's record file is written last: its presence marks the batch complete.
                try writeAtomically(try encoder.encode(part.records), to: recordURL(part.batch))
                records += part.records
                made += part.records.count
            }
        }
        // Every rank returns the pack's manifest; rank 0 alone wrote the pack.
        var written = Data()
        if communicator.isRoot {
            written = try encoder.encode(try writePack(records: records, teacherSHA: teacherSHA))
            // The pack is complete: a work directory left behind costs disk space, nothing else.
            try? FileManager.default.removeItem(at: workDirectory)
        }
        let manifest = try JSONDecoder().decode(PackManifest.self, from: communicator.broadcast(written))
        return Outcome(
            manifest: manifest, seconds: Date().timeIntervalSince(start), imagesMade: made, resumedImages: resumed)
    }
}

extension SynthesisJob {
    /// The job of a pack a multi-step run needs after a step, its teacher read from the request.
    public init(request: PackRequest, count: Int, options: InversionOptions) throws {
        let (model, card) = try ModelFile.load(request.teacher)
        self.init(
            teacherURL: request.teacher, model: model, card: card, classes: request.classes, count: count,
            options: options, seed: request.seed, out: request.out)
    }
}
