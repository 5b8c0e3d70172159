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

    var asInt: Int? { if case .int(let v) = self { return v }; if case .bool(let b) = self { return b ? 1 : 0 }; return nil }
    var asString: String? { if case .string(let s) = self { return s }; return nil }
    var asTuple: [PickleValue]? {
        if case .tuple(let t) = self { return t }
        if case .list(let l) = self { return l.items }
        return nil
    }
}

public final class PickleList { public var items: [PickleValue] = [] }

/// Insertion-ordered dictionary (Python dicts keep order; state dicts rely on it).
public final class PickleDict {
    public var entries: [(key: PickleValue, value: PickleValue)] = []

    func set(_ key: PickleValue, _ value: PickleValue) {
        if let k = key.asString, let i = entries.firstIndex(where: { $0.key.asString == k }) {
            entries[i].value = value
        } else {
            entries.append((key, value))
        }
    }

    public subscript(_ key: String) -> PickleValue? { entries.first { $0.key.asString == key }?.value }
}

public struct StorageReference {
    public var key: String
    public var dtype: StoredDType
    public var viewOffset: Int
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

    let data: [UInt8]
    let file: String
    var position = 0
    var stack: [PickleValue] = []
    var marks: [Int] = []
    var memo: [Int: PickleValue] = [:]
    /// Turns a persistent id tuple into a value (the checkpoint format decides its layout).
    let persistentLoad: ([PickleValue]) throws -> PickleValue

    public init(data: [UInt8], file: String, persistentLoad: @escaping ([PickleValue]) throws -> PickleValue) {
        self.data = data
        self.file = file
        self.persistentLoad = persistentLoad
    }

    func error(_ problem: String) -> WeightFileError {
        WeightFileError(file: file, "pickle at byte \(position): \(problem)")
    }

    mutating func byte() throws -> UInt8 {
        guard position < data.count else { throw error("truncated pickle data") }
        defer { position += 1 }
        return data[position]
    }

    mutating func bytes(_ n: Int) throws -> ArraySlice<UInt8> {
        guard n >= 0, position + n <= data.count else { throw error("truncated pickle data") }
        defer { position += n }
        return data[position..<(position + n)]
    }

    mutating func littleEndian(_ n: Int) throws -> UInt64 {
        try bytes(n).reversed().reduce(0) { $0 << 8 | UInt64($1) }
    }

    mutating func line() throws -> String {
        guard let end = data[position...].firstIndex(of: 0x0A) else { throw error("unterminated line") }
        defer { position = end + 1 }
        return String(decoding: data[position..<end], as: UTF8.self)
    }

    mutating func pop() throws -> PickleValue {
        guard let v = stack.popLast() else { throw error("stack underflow") }
        return v
    }

    mutating func popMark() throws -> [PickleValue] {
        guard let m = marks.popLast(), m <= stack.count else { throw error("MARK missing") }
        defer { stack.removeSubrange(m...) }
        return Array(stack[m...])
    }

    mutating func top() throws -> PickleValue {
        guard let v = stack.last else { throw error("stack underflow") }
        return v
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

    mutating func reduce(_ callable: PickleValue, _ args: PickleValue) throws -> PickleValue {
        guard case .global(let name) = callable, let a = args.asTuple else {
            throw error("REDUCE on something that is not a permitted global")
        }
        switch name {
        case "collections.OrderedDict":
            guard a.isEmpty else { throw error("OrderedDict with arguments is not supported") }
            return .dict(PickleDict())
        case "torch._utils._rebuild_tensor_v2":
            guard a.count >= 4, case .storage(let storage) = a[0], let offset = a[1].asInt,
                  let shape = a[2].asTuple?.compactMap({ $0.asInt }), let strides = a[3].asTuple?.compactMap({ $0.asInt }),
                  shape.count == a[2].asTuple?.count, strides.count == shape.count else {
                throw error("malformed _rebuild_tensor_v2 arguments")
            }
            guard offset >= 0, shape.allSatisfy({ $0 >= 0 }), strides.allSatisfy({ $0 >= 0 }) else {
                throw error("negative tensor offset, size or stride")
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
            let op = try byte()
            switch op {
            case 0x80: _ = try byte()  // PROTO
            case 0x95: _ = try bytes(8)  // FRAME
            case 0x2E:  // STOP
                return try pop()
            case 0x28: marks.append(stack.count)  // MARK
            case 0x7D: stack.append(.dict(PickleDict()))  // EMPTY_DICT
            case 0x5D: stack.append(.list(PickleList()))  // EMPTY_LIST
            case 0x29: stack.append(.tuple([]))  // EMPTY_TUPLE
            case 0x8F: stack.append(.list(PickleList()))  // EMPTY_SET, held as a list
            case 0x74: stack.append(.tuple(try popMark()))  // TUPLE
            case 0x85: stack.append(.tuple([try pop()]))  // TUPLE1
            case 0x86:  // TUPLE2
                let b = try pop(), a = try pop()
                stack.append(.tuple([a, b]))
            case 0x87:  // TUPLE3
                let c = try pop(), b = try pop(), a = try pop()
                stack.append(.tuple([a, b, c]))
            case 0x6C:  // LIST
                let l = PickleList()
                l.items = try popMark()
                stack.append(.list(l))
            case 0x64:  // DICT
                let items = try popMark()
                guard items.count % 2 == 0 else { throw error("DICT with an odd item count") }
                let d = PickleDict()
                for i in stride(from: 0, to: items.count, by: 2) { d.set(items[i], items[i + 1]) }
                stack.append(.dict(d))
            case 0x73:  // SETITEM
                let value = try pop(), key = try pop()
                guard case .dict(let d) = try top() else { throw error("SETITEM on a non-dict") }
                d.set(key, value)
            case 0x75:  // SETITEMS
                let items = try popMark()
                guard items.count % 2 == 0, case .dict(let d) = try top() else { throw error("SETITEMS on a non-dict") }
                for i in stride(from: 0, to: items.count, by: 2) { d.set(items[i], items[i + 1]) }
            case 0x61:  // APPEND
                let value = try pop()
                guard case .list(let l) = try top() else { throw error("APPEND on a non-list") }
                l.items.append(value)
            case 0x65, 0x90:  // APPENDS, ADDITEMS
                let items = try popMark()
                guard case .list(let l) = try top() else { throw error("APPENDS on a non-list") }
                l.items += items
            case 0x71: memo[Int(try byte())] = try top()  // BINPUT
            case 0x72: memo[Int(try littleEndian(4))] = try top()  // LONG_BINPUT
            case 0x94: memo[memo.count] = try top()  // MEMOIZE
            case 0x68, 0x6A:  // BINGET, LONG_BINGET
                let index = op == 0x68 ? Int(try byte()) : Int(try littleEndian(4))
                guard let v = memo[index] else { throw error("memo entry \(index) missing") }
                stack.append(v)
            case 0x4B: stack.append(.int(Int(try byte())))  // BININT1
            case 0x4D: stack.append(.int(Int(try littleEndian(2))))  // BININT2
            case 0x4A: stack.append(.int(Int(Int32(truncatingIfNeeded: try littleEndian(4)))))  // BININT
            case 0x8A, 0x8B:  // LONG1, LONG4
                let n = op == 0x8A ? Int(try byte()) : Int(try littleEndian(4))
                let raw = try bytes(n)
                if n == 0 { stack.append(.int(0)); break }
                guard n <= 8 else {
                    // torch's legacy magic number is 10 bytes: keep it as bytes, compared by the caller.
                    stack.append(.bytes(Array(raw)))
                    break
                }
                var v = raw.reversed().reduce(UInt64(0)) { $0 << 8 | UInt64($1) }
                if n < 8 && raw.last! & 0x80 != 0 { v |= ~UInt64(0) << (8 * UInt64(n)) }
                stack.append(.int(Int(Int64(bitPattern: v))))
            case 0x47:  // BINFLOAT, big-endian
                let bits = try bytes(8).reduce(UInt64(0)) { $0 << 8 | UInt64($1) }
                stack.append(.float(Double(bitPattern: bits)))
            case 0x58: stack.append(.string(try string(try bytes(Int(try littleEndian(4))))))  // BINUNICODE
            case 0x8C: stack.append(.string(try string(try bytes(Int(try byte())))))  // SHORT_BINUNICODE
            case 0x8D: stack.append(.string(try string(try bytes(Int(try littleEndian(8))))))  // BINUNICODE8
            case 0x54: stack.append(.string(try string(try bytes(Int(try littleEndian(4))))))  // BINSTRING
            case 0x55: stack.append(.string(try string(try bytes(Int(try byte())))))  // SHORT_BINSTRING
            case 0x42: stack.append(.bytes(Array(try bytes(Int(try littleEndian(4))))))  // BINBYTES
            case 0x43: stack.append(.bytes(Array(try bytes(Int(try byte())))))  // SHORT_BINBYTES
            case 0x8E: stack.append(.bytes(Array(try bytes(Int(try littleEndian(8))))))  // BINBYTES8
            case 0x4E: stack.append(.none)  // NONE
            case 0x88: stack.append(.bool(true))  // NEWTRUE
            case 0x89: stack.append(.bool(false))  // NEWFALSE
            case 0x63:  // GLOBAL
                let module = try line(), name = try line()
                stack.append(try resolveGlobal(module, name))
            case 0x93:  // STACK_GLOBAL
                let name = try pop(), module = try pop()
                guard let n = name.asString, let m = module.asString else { throw error("STACK_GLOBAL needs two strings") }
                stack.append(try resolveGlobal(m, n))
            case 0x51:  // BINPERSID
                guard let pid = try pop().asTuple else { throw error("persistent id is not a tuple") }
                stack.append(try persistentLoad(pid))
            case 0x52:  // REDUCE
                let args = try pop(), callable = try pop()
                stack.append(try reduce(callable, args))
            case 0x81:  // NEWOBJ
                let args = try pop(), cls = try pop()
                stack.append(try reduce(cls, args))
            case 0x62:  // BUILD: state on an OrderedDict (its _metadata) carries nothing we need
                let state = try pop()
                guard case .dict = try top() else { throw error("BUILD on an object that is not a dict") }
                _ = state
            default:
                throw error(String(format: "unsupported opcode 0x%02X", op))
            }
        }
    }
}
