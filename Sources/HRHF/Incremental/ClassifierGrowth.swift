import Foundation

/// The new model of step t: the old one with `newClasses` more outputs, whose classifier rows
/// start as `initialisation` says (random ones drawn from `seed`).
public func extendModel(
    _ old: DeepLabV3, card: ModelCard, newClassNames: [String], step: Int,
    initialisation: ClassifierInitialisation = .background, seed: UInt64 = 0
) throws -> (DeepLabV3, ModelCard) {
    let added = newClassNames.count
    precondition(added >= 1, "a step adds at least one class")
    var arch = old.architecture
    arch.classesPerStep.append(added)
    let model = try DeepLabV3(arch)
    let oldState = Dictionary(old.stateDict().map { ($0.name, $0.tensor) }, uniquingKeysWith: { a, _ in a })
    let oldClasses = old.numClasses
    for (name, t) in model.stateDict() {
        if let v = oldState[name], v.shape == t.shape { t.assign(v) }
    }
    var rng = SeededGenerator(seed: seed)
    /// Rows `rows` of a 1x1 classifier (`w`, `b`) start new: as the background row of `ow`, `ob`,
    /// with the new biases and the background's b_bg - log(added + 1), or at random.
    func initialise(_ rows: Range<Int>, _ w: Tensor, _ b: Tensor, background ow: Tensor, _ ob: Tensor) -> Float? {
        let inChannels = ow.shape[1]
        switch initialisation {
        case .background:
            let shared = ob.pointer[0] - Foundation.log(Float(added + 1))
            for k in rows {
                for i in 0..<inChannels { w.pointer[k * inChannels + i] = ow.pointer[i] }
                b.pointer[k] = shared
            }
            return shared
        case .random:
            let bound = 1 / Float(inChannels).squareRoot()
            for k in rows {
                for i in 0..<inChannels { w.pointer[k * inChannels + i] = (2 * rng.nextUnitFloat() - 1) * bound }
            }
            for k in rows { b.pointer[k] = (2 * rng.nextUnitFloat() - 1) * bound }
            return nil
        }
    }
    /// A grown 1x1 classifier: the old rows copied, the new ones initialised.
    func grow(_ w: Tensor, _ b: Tensor, from ow: Tensor, _ ob: Tensor) {
        w.pointer.update(from: ow.pointer, count: ow.count)
        b.pointer.update(from: ob.pointer, count: ob.count)
        if let shared = initialise(oldClasses..<(oldClasses + added), w, b, background: ow, ob) {
            b.pointer[0] = shared
        }
    }
    switch arch.flavor {
    case .torchvision:
        grow(
            model.classifiers[0].weight, model.classifiers[0].bias!, from: old.classifiers[0].weight,
            old.classifiers[0].bias!)
    case .mib:
        // One classifier per step: the new one is `cls.<step>`, all of its rows new.
        let ow = old.classifiers[0].weight, ob = old.classifiers[0].bias!
        let w = model.classifiers.last!.weight, b = model.classifiers.last!.bias!
        if let shared = initialise(0..<added, w, b, background: ow, ob) {
            model.classifiers[0].bias!.pointer[0] = shared
        }
    }
    // The auxiliary head's classifier grows the same way.
    let newState = Dictionary(model.stateDict().map { ($0.name, $0.tensor) }, uniquingKeysWith: { a, _ in a })
    if arch.auxHead, let aw = newState["aux_classifier.4.weight"], let ab = newState["aux_classifier.4.bias"],
        let ow = oldState["aux_classifier.4.weight"], let ob = oldState["aux_classifier.4.bias"]
    {
        grow(aw, ab, from: ow, ob)
    }
    var newCard = card
    newCard.architecture = arch
    newCard.classes += newClassNames.enumerated().map { ClassInfo(id: oldClasses + $0.offset, name: $0.element) }
    newCard.history.append(IncrementalStep(step: step, classes: Array(oldClasses..<(oldClasses + added))))
    return (model, newCard)
}
