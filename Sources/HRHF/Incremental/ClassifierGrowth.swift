import Foundation

/// The new model of step t: the old one with `newClasses` more outputs. New classifier rows
/// start as the background row; their bias and the background's are b_bg - log(newClasses + 1)
/// (MiB's initialisation, so the background's probability is shared, not changed).
public func extendModel(_ old: DeepLabV3, card: ModelCard, newClassNames: [String], step: Int) throws -> (
    DeepLabV3, ModelCard
) {
    let added = newClassNames.count
    precondition(added >= 1, "a step adds at least one class")
    var arch = old.architecture
    arch.classesPerStep.append(added)
    let model = try DeepLabV3(arch)
    let oldState = Dictionary(old.stateDict().map { ($0.name, $0.tensor) }, uniquingKeysWith: { a, _ in a })
    let oldClasses = old.numClasses
    let headChannels = arch.headChannels
    for (name, t) in model.stateDict() {
        if let v = oldState[name], v.shape == t.shape { t.assign(v) }
    }
    /// A grown 1x1 classifier: the old rows copied, each new row the background row, the new
    /// biases and the background's b_bg - log(added + 1).
    func grow(_ w: Tensor, _ b: Tensor, from ow: Tensor, _ ob: Tensor) {
        let inChannels = ow.shape[1]
        w.pointer.update(from: ow.pointer, count: ow.count)
        b.pointer.update(from: ob.pointer, count: ob.count)
        let shared = ob.pointer[0] - Foundation.log(Float(added + 1))
        for k in oldClasses..<(oldClasses + added) {
            for i in 0..<inChannels { w.pointer[k * inChannels + i] = ow.pointer[i] }
            b.pointer[k] = shared
        }
        b.pointer[0] = shared
    }
    switch arch.flavor {
    case .torchvision:
        grow(
            model.classifiers[0].weight, model.classifiers[0].bias!, from: old.classifiers[0].weight,
            old.classifiers[0].bias!)
    case .mib:
        // One classifier per step: the new one is `cls.<step>`, all of its rows new.
        let ow = old.classifiers[0].weight, ob = old.classifiers[0].bias!
        let shared = ob.pointer[0] - Foundation.log(Float(added + 1))
        let w = model.classifiers.last!.weight, b = model.classifiers.last!.bias!
        for k in 0..<added {
            for i in 0..<headChannels { w.pointer[k * headChannels + i] = ow.pointer[i] }
            b.pointer[k] = shared
        }
        model.classifiers[0].bias!.pointer[0] = shared
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
