/// The version string of this toolkit, recorded in the packs and models it makes.
public let toolkitVersion = "0.1.0"
