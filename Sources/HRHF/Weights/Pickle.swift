import Foundation

/// A value built by the restricted unpickler. Containers are reference types so that memo
/// entries and later SETITEMS/APPENDS see the same object, as in Python.
public indirect enum PickleValue {
    case none
    case bool(Bool)
    case int(Int)
    case float(Double)
    case string(String)
    case bytes([UInt8])
    case tuple([PickleValue])
    case list(PickleList)
    case dict(PickleDict)
    /// A permitted global (a class or function), by "module.name".
    case global(String)
    /// A storage named by a persistent id: key, element type, element count, and for the
    /// legacy format a view's offset.
    case storage(StorageReference)
    case tensor(TensorReference)

    var asInt: Int? {
        if case .int(let v) = self { return v }
        if case .bool(let b) = self { return b ? 1 : 0 }
        return nil
    }
    var asString: String? {
        if case .string(let s) = self { return s }
        return nil
    }
    var asTuple: [PickleValue]? {
        if case .tuple(let t) = self { return t }
        if case .list(let l) = self { return l.items }
        return nil
    }
}

/// What a mutable container needs so that nesting stays bounded: its height, and whether it
/// sits inside another value already (then it is sealed: filling it later could make a cycle
/// or deepen its parents unseen; Python's pickler always fills a container before using it).
public class PickleContainer {
    /// 1 + the greatest height of the values inside (scalars have height 0).
    public internal(set) var height = 1
    public internal(set) var sealed = false
}

public final class PickleList: PickleContainer { public internal(set) var items: [PickleValue] = [] }

/// Insertion-ordered dictionary (Python dicts keep order; state dicts rely on it), hashed on
/// integer keys and string keys of at most 1 KiB, so that filling it is linear even when one
/// long string is set again and again (state dict keys are under 200 bytes). Other keys are
/// kept as they come.
public final class PickleDict: PickleContainer {
    public private(set) var entries: [(key: PickleValue, value: PickleValue)] = []
    private var positions: [Key: Int] = [:]

    private enum Key: Hashable {
        case string(String)
        case int(Int)

        init?(_ value: PickleValue) {
            switch value {
            case .string(let s) where s.utf8.count <= 1024: self = .string(s)
            case .int(let i): self = .int(i)
            case .bool(let b): self = .int(b ? 1 : 0)
            default: return nil
            }
        }
    }

    func set(_ key: PickleValue, _ value: PickleValue) {
        guard let hashed = Key(key) else { return entries.append((key, value)) }
        if let i = positions[hashed] {
            entries[i].value = value
        } else {
            positions[hashed] = entries.count
            entries.append((key, value))
        }
    }

    public subscript(_ key: String) -> PickleValue? { positions[.string(key)].map { entries[$0].value } }
}

public struct StorageReference {
    public var key: String
    public var dtype: StoredDType
    /// Elements the whole storage holds, as its persistent id declares.
    public var count: Int
    /// The part of the storage a tensor indexes: all of it, or a legacy view.
    public var viewOffset: Int
    public var viewCount: Int
}

/// torch._utils._rebuild_tensor_v2's arguments: where the values are and how they are laid out.
public struct TensorReference {
    public var storage: StorageReference
    public var offset: Int
    public var shape: [Int]
    public var strides: [Int]
}

/// Interprets the pickle opcodes a PyTorch state dict uses and nothing more. Globals other
/// than the few a state dict needs are refused by name before anything is built, and no
/// Python code is ever run: a REDUCE can only build an OrderedDict, a tensor or a parameter.
public struct RestrictedUnpickler {
    /// Storage classes as `torch.save` names them, with their element types.
    static let storageTypes: [String: StoredDType] = [
        "torch.FloatStorage": .f32, "torch.DoubleStorage": .f64, "torch.HalfStorage": .f16,
        "torch.BFloat16Storage": .bf16, "torch.LongStorage": .i64, "torch.IntStorage": .i32,
        "torch.ShortStorage": .i16, "torch.CharStorage": .i8, "torch.ByteStorage": .u8, "torch.BoolStorage": .bool,
    ]
    static let callables: Set<String> = [
        "collections.OrderedDict", "torch._utils._rebuild_tensor_v2", "torch._utils._rebuild_parameter",
    ]
    /// Opcodes one pickle may run (each adds at most one value, mark or memo entry). The fixtures
    /// take 35 per tensor, so a ResNet-101 DeepLabV3 checkpoint with Adam state (about 1,300
    /// tensors) needs about 50,000: 4 Mi leaves room for large training logs and bounds the
    /// values built to a few hundred MB.
    public static let maxOps = 1 << 22
    /// Deepest nesting of containers. A checkpoint nests under 10 levels (checkpoint, optimizer,
    /// state, parameter, ...); 200 keeps the recursive release of a value far from the stack's end.
    public static let maxDepth = 200

    let data: [UInt8]
    let file: String
    var position = 0
    var ops = 0
    /// Values with the height of each (containers carry theirs, updated while they are filled).
    var stack: [(value: PickleValue, height: Int)] = []
    var marks: [Int] = []
    var memo: [Int: (value: PickleValue, height: Int)] = [:]
    /// Turns a persistent id tuple into a value (the checkpoint format decides its layout).
    let persistentLoad: ([PickleValue]) throws -> PickleValue

    public init(data: [UInt8], file: String, persistentLoad: @escaping ([PickleValue]) throws -> PickleValue) {
        self.data = data
        self.file = file
        self.persistentLoad = persistentLoad
    }

    func error(_ problem: String) -> WeightFileError {
        WeightFileError(file: file, key: "pickle at byte \(position)", problem)
    }

    mutating func byte() throws -> UInt8 {
        guard position < data.count else { throw error("truncated pickle data") }
        defer { position += 1 }
        return data[position]
    }

    mutating func bytes(_ n: Int) throws -> ArraySlice<UInt8> {
        guard n >= 0, n <= data.count - position else {
            throw error("a length of \(n) bytes runs past the end of the pickle (\(data.count - position) left)")
        }
        defer { position += n }
        return data[position..<(position + n)]
    }

    mutating func littleEndian(_ n: Int) throws -> UInt64 {
        try bytes(n).reversed().reduce(0) { $0 << 8 | UInt64($1) }
    }

    /// A length or index of `width` bytes, as an Int that fits what is left of the data.
    mutating func length(_ width: Int) throws -> Int {
        let raw = try littleEndian(width)
        guard let n = Int(exactly: raw), n <= data.count - position else {
            throw error("a length of \(raw) bytes runs past the end of the pickle (\(data.count - position) left)")
        }
        return n
    }

    mutating func line() throws -> String {
        guard let end = data[position...].firstIndex(of: 0x0A) else { throw error("unterminated line") }
        defer { position = end + 1 }
        return String(decoding: data[position..<end], as: UTF8.self)
    }

    /// The height a stack or memo slot stands for (a container's grows while it is filled).
    static func height(_ slot: (value: PickleValue, height: Int)) -> Int {
        switch slot.value {
        case .list(let c): return c.height
        case .dict(let c): return c.height
        default: return slot.height
        }
    }

    mutating func push(_ value: PickleValue, height: Int = 0) throws {
        guard height <= Self.maxDepth else { throw error("nesting deeper than \(Self.maxDepth) levels") }
        stack.append((value, height))
    }

    mutating func pop() throws -> PickleValue {
        guard let v = stack.popLast() else { throw error("stack underflow") }
        return v.value
    }

    mutating func popLast(_ n: Int) throws -> [(value: PickleValue, height: Int)] {
        guard stack.count >= n else { throw error("stack underflow") }
        defer { stack.removeLast(n) }
        return Array(stack.suffix(n))
    }

    mutating func popMark() throws -> [(value: PickleValue, height: Int)] {
        guard let m = marks.popLast(), m <= stack.count else { throw error("MARK missing") }
        defer { stack.removeSubrange(m...) }
        return Array(stack[m...])
    }

    mutating func top() throws -> PickleValue {
        guard let v = stack.last else { throw error("stack underflow") }
        return v.value
    }

    /// Seals the containers among `items` (they now sit inside another value) and returns the
    /// height of a container holding them.
    func enclose(_ items: [(value: PickleValue, height: Int)]) throws -> Int {
        var height = 1
        for item in items {
            switch item.value {
            case .list(let c): c.sealed = true
            case .dict(let c): c.sealed = true
            default: break
            }
            height = max(height, Self.height(item) + 1)
        }
        guard height <= Self.maxDepth else { throw error("nesting deeper than \(Self.maxDepth) levels") }
        return height
    }

    /// The container on top of the stack, ready to take `items`.
    func fill(_ container: PickleContainer, with items: [(value: PickleValue, height: Int)], _ op: String) throws {
        guard !container.sealed else {
            throw error("\(op) into a container already placed inside another (or into itself)")
        }
        let height = try enclose(items)
        guard !container.sealed else { throw error("\(op) puts a container inside itself") }
        container.height = max(container.height, height)
    }

    mutating func tuple(_ items: [(value: PickleValue, height: Int)]) throws {
        try push(.tuple(items.map(\.value)), height: try enclose(items))
    }

    mutating func memoize(_ index: Int) throws {
        guard index < Self.maxOps else { throw error("memo index \(index) beyond \(Self.maxOps)") }
        guard let slot = stack.last else { throw error("stack underflow") }
        memo[index] = slot
    }

    func resolveGlobal(_ module: String, _ name: String) throws -> PickleValue {
        let full = "\(module).\(name)"
        guard Self.callables.contains(full) || Self.storageTypes[full] != nil else {
            throw WeightFileError(file: file, "refused global \(full): a state dict never needs it, and it is not run")
        }
        return .global(full)
    }

    func string(_ bytes: ArraySlice<UInt8>) throws -> String {
        guard let s = String(bytes: bytes, encoding: .utf8) else { throw error("string is not UTF-8") }
        return s
    }

    func reduce(_ callable: PickleValue, _ args: PickleValue) throws -> PickleValue {
        guard case .global(let name) = callable, let a = args.asTuple else {
            throw error("REDUCE on something that is not a permitted global")
        }
        switch name {
        case "collections.OrderedDict":
            guard a.isEmpty else { throw error("OrderedDict with arguments is not supported") }
            return .dict(PickleDict())
        case "torch._utils._rebuild_tensor_v2":
            guard a.count >= 4, case .storage(let storage) = a[0], let offset = a[1].asInt,
                let shapeItems = a[2].asTuple, let strideItems = a[3].asTuple
            else {
                throw error("malformed _rebuild_tensor_v2 arguments")
            }
            let shape = shapeItems.compactMap(\.asInt), strides = strideItems.compactMap(\.asInt)
            guard shape.count == shapeItems.count, strides.count == strideItems.count,
                strides.count == shape.count
            else {
                throw error("_rebuild_tensor_v2: size and stride must be tuples of integers of one length")
            }
            guard offset >= 0, shape.allSatisfy({ $0 >= 0 }), strides.allSatisfy({ $0 >= 0 }) else {
                throw error("_rebuild_tensor_v2: negative offset \(offset), size \(shape) or stride \(strides)")
            }
            return .tensor(TensorReference(storage: storage, offset: offset, shape: shape, strides: strides))
        case "torch._utils._rebuild_parameter":
            guard let first = a.first, case .tensor = first else { throw error("malformed _rebuild_parameter") }
            return first
        default:
            throw error("\(name) cannot be called")
        }
    }

    /// Runs the opcodes to STOP and returns the value built.
    public mutating func load() throws -> PickleValue {
        while true {
            ops += 1
            guard ops <= Self.maxOps else { throw error("more than \(Self.maxOps) opcodes") }
            let op = try byte()
            switch op {
            case 0x80: _ = try byte() // PROTO
            case 0x95: _ = try length(8) // FRAME: the frame's length, checked; its opcodes follow inline
            case 0x2E: // STOP
                return try pop()
            case 0x28: marks.append(stack.count) // MARK
            case 0x7D: try push(.dict(PickleDict()), height: 1) // EMPTY_DICT
            case 0x5D, 0x8F: try push(.list(PickleList()), height: 1) // EMPTY_LIST, EMPTY_SET (held as a list)
            case 0x29: try tuple([]) // EMPTY_TUPLE
            case 0x74: try tuple(try popMark()) // TUPLE
            case 0x85, 0x86, 0x87: // TUPLE1, TUPLE2, TUPLE3
                try tuple(try popLast(Int(op) - 0x84))
            case 0x6C: // LIST
                let items = try popMark(), l = PickleList()
                l.height = try enclose(items)
                l.items = items.map(\.value)
                try push(.list(l))
            case 0x64: // DICT
                let items = try popMark()
                guard items.count % 2 == 0 else { throw error("DICT with an odd item count") }
                let d = PickleDict()
                d.height = try enclose(items)
                for i in stride(from: 0, to: items.count, by: 2) { d.set(items[i].value, items[i + 1].value) }
                try push(.dict(d))
            case 0x73, 0x75: // SETITEM, SETITEMS
                let items = op == 0x73 ? try popLast(2) : try popMark()
                guard items.count % 2 == 0, case .dict(let d) = try top() else { throw error("SETITEMS on a non-dict") }
                try fill(d, with: items, "SETITEMS")
                for i in stride(from: 0, to: items.count, by: 2) { d.set(items[i].value, items[i + 1].value) }
            case 0x61, 0x65, 0x90: // APPEND, APPENDS, ADDITEMS
                let items = op == 0x61 ? try popLast(1) : try popMark()
                guard case .list(let l) = try top() else { throw error("APPENDS on a non-list") }
                try fill(l, with: items, "APPENDS")
                l.items += items.map(\.value)
            case 0x71: try memoize(Int(try byte())) // BINPUT
            case 0x72: try memoize(Int(try littleEndian(4))) // LONG_BINPUT
            case 0x94: try memoize(memo.count) // MEMOIZE
            case 0x68, 0x6A: // BINGET, LONG_BINGET
                let index = op == 0x68 ? Int(try byte()) : Int(try littleEndian(4))
                guard let slot = memo[index] else { throw error("memo entry \(index) missing") }
                stack.append(slot)
            case 0x4B: try push(.int(Int(try byte()))) // BININT1
            case 0x4D: try push(.int(Int(try littleEndian(2)))) // BININT2
            case 0x4A: try push(.int(Int(Int32(truncatingIfNeeded: try littleEndian(4))))) // BININT
            case 0x8A, 0x8B: // LONG1, LONG4
                let n = op == 0x8A ? Int(try byte()) : try length(4)
                let raw = try bytes(n)
                guard let last = raw.last else {
                    try push(.int(0))
                    break
                }
                guard n <= 8 else {
                    // torch's legacy magic number is 10 bytes: keep it as bytes, compared by the caller.
                    try push(.bytes(Array(raw)))
                    break
                }
                var v = raw.reversed().reduce(UInt64(0)) { $0 << 8 | UInt64($1) }
                if n < 8 && last & 0x80 != 0 { v |= ~UInt64(0) << (8 * UInt64(n)) }
                try push(.int(Int(Int64(bitPattern: v))))
            case 0x47: // BINFLOAT, big-endian
                let bits = try bytes(8).reduce(UInt64(0)) { $0 << 8 | UInt64($1) }
                try push(.float(Double(bitPattern: bits)))
            case 0x58, 0x54: try push(.string(try string(try bytes(try length(4))))) // BINUNICODE, BINSTRING
            case 0x8D: try push(.string(try string(try bytes(try length(8))))) // BINUNICODE8
            case 0x8C, 0x55: try push(.string(try string(try bytes(Int(try byte()))))) // SHORT_BINUNICODE/STRING
            case 0x42: try push(.bytes(Array(try bytes(try length(4))))) // BINBYTES
            case 0x43: try push(.bytes(Array(try bytes(Int(try byte()))))) // SHORT_BINBYTES
            case 0x8E: try push(.bytes(Array(try bytes(try length(8))))) // BINBYTES8
            case 0x4E: try push(.none) // NONE
            case 0x88: try push(.bool(true)) // NEWTRUE
            case 0x89: try push(.bool(false)) // NEWFALSE
            case 0x63: // GLOBAL
                let module = try line(), name = try line()
                try push(try resolveGlobal(module, name))
            case 0x93: // STACK_GLOBAL
                let name = try pop(), module = try pop()
                guard let n = name.asString, let m = module.asString else {
                    throw error("STACK_GLOBAL needs two strings")
                }
                try push(try resolveGlobal(m, n))
            case 0x51: // BINPERSID
                guard let pid = try pop().asTuple else { throw error("persistent id is not a tuple") }
                try push(try persistentLoad(pid))
            case 0x52, 0x81: // REDUCE, NEWOBJ
                let args = try pop(), callable = try pop()
                try push(try reduce(callable, args), height: 1)
            case 0x62: // BUILD: state on an OrderedDict (its _metadata) carries nothing we need
                _ = try pop()
                guard case .dict = try top() else { throw error("BUILD on an object that is not a dict") }
            default:
                throw error(String(format: "unsupported opcode 0x%02X", op))
            }
        }
    }
}
