import Foundation

/// Class names of the datasets the toolkit knows, index = class id.
public enum DatasetClasses {
    public static let voc = [
        "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
        "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
    ]

    /// ADE20K SceneParsing's 150 classes, 0 being "other" (ignored by the benchmark's
    /// evaluation, background in the incremental protocol).
    public static let ade =
        ["background"] + [
            "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
            "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
            "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
            "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
            "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand",
            "path", "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
            "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove",
            "palm", "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus",
            "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver",
            "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle",
            "buffet",
            "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything",
            "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven",
            "ball", "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher",
            "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan",
            "pier",
            "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator", "glass", "clock", "flag",
        ]

    /// Cityscapes' 19 training ids (0-18); it has no background class.
    public static let cityscapes = [
        "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
        "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
    ]

    /// The procedural Shapes dataset: background and 20 shape families.
    public static let shapes = [
        "background", "disc", "square", "triangle", "ring", "cross", "star", "hexagon", "ellipse", "crescent",
        "diamond", "heart", "arrow", "pentagon", "frame", "bar", "l-shape", "semicircle", "target", "chevron",
        "trefoil",
    ]

    public static let named: [String: [String]] = ["voc": voc, "ade": ade, "cityscapes": cityscapes, "shapes": shapes]

    /// A dataset name or a comma-separated list of names.
    public static func resolve(_ spec: String) -> [String] {
        named[spec.lowercased()] ?? spec.split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces) }
    }
}

/// The zoo's JSON cards: `archs/NAME.json` (an architecture description, usable as --arch) and
/// `classes/NAME.json` (a class list). Written from the built-in presets; a test keeps the
/// committed copies equal to them.
public func zooCards() throws -> [(path: String, data: Data)] {
    let encoder = JSONEncoder()
    encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
    var cards: [(String, Data)] = []
    for arch in ArchitectureDescription.presets {
        cards.append(("archs/\(arch.name).json", try encoder.encode(arch) + Data("\n".utf8)))
    }
    for (name, list) in DatasetClasses.named.sorted(by: { $0.key < $1.key }) {
        let classes = list.enumerated().map { ClassInfo(id: $0.offset, name: $0.element) }
        cards.append(("classes/\(name).json", try encoder.encode(classes) + Data("\n".utf8)))
    }
    return cards
}

@discardableResult
public func writeZooCards(to directory: URL) throws -> [String] {
    var written: [String] = []
    for (path, data) in try zooCards() {
        let url = directory.appendingPathComponent(path)
        try FileManager.default.createDirectory(at: url.deletingLastPathComponent(), withIntermediateDirectories: true)
        try writeAtomically(data, to: url)
        written.append(path)
    }
    return written
}
