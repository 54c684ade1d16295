/// Appends little-endian fixed-width integers and length-prefixed byte strings to a byte array.
///
/// All of Weft's persistent records and wire messages are written with this type, so their
/// layout is explicit and versioned by the caller (see SPEC.md §Formats).
public struct ByteWriter {
    public var bytes: [UInt8]

    public init(capacity: Int = 64) {
        bytes = []
        bytes.reserveCapacity(capacity)
    }

    @inlinable public mutating func u8(_ v: UInt8) { bytes.append(v) }
    @inlinable public mutating func bool(_ v: Bool) { bytes.append(v ? 1 : 0) }
    @inlinable public mutating func u16(_ v: UInt16) { withUnsafeBytes(of: v.littleEndian) { bytes.append(contentsOf: $0) } }
    @inlinable public mutating func u32(_ v: UInt32) { withUnsafeBytes(of: v.littleEndian) { bytes.append(contentsOf: $0) } }
    @inlinable public mutating func u64(_ v: UInt64) { withUnsafeBytes(of: v.littleEndian) { bytes.append(contentsOf: $0) } }
    @inlinable public mutating func i32(_ v: Int32) { u32(UInt32(bitPattern: v)) }
    @inlinable public mutating func i64(_ v: Int64) { u64(UInt64(bitPattern: v)) }
    /// Big-endian u64, used in RocksDB keys so that byte order equals numeric order.
    @inlinable public mutating func u64BE(_ v: UInt64) { withUnsafeBytes(of: v.bigEndian) { bytes.append(contentsOf: $0) } }
    @inlinable public mutating func u32BE(_ v: UInt32) { withUnsafeBytes(of: v.bigEndian) { bytes.append(contentsOf: $0) } }
    @inlinable public mutating func raw(_ v: [UInt8]) { bytes.append(contentsOf: v) }
    @inlinable public mutating func raw(_ v: UnsafeRawBufferPointer) { bytes.append(contentsOf: v) }
    /// u32 length followed by the bytes.
    @inlinable public mutating func blob(_ v: [UInt8]) { u32(UInt32(v.count)); bytes.append(contentsOf: v) }
    @inlinable public mutating func string(_ v: String) { blob(Array(v.utf8)) }
    @inlinable public mutating func optionalU64(_ v: UInt64?) {
        if let v { u8(1); u64(v) } else { u8(0) }
    }
}

/// Reads what `ByteWriter` wrote. Every read is bounds-checked and throws `WeftError(EBADMSG)`
/// on a short or malformed input; a length prefix above `maxBlobBytes` is rejected before any allocation.
public struct ByteReader {
    public let bytes: UnsafeRawBufferPointer
    public private(set) var offset: Int = 0
    public var maxBlobBytes: Int

    public init(_ bytes: UnsafeRawBufferPointer, maxBlobBytes: Int = Limits.transferMaxBytes) {
        self.bytes = bytes
        self.maxBlobBytes = maxBlobBytes
    }

    public var remaining: Int { bytes.count - offset }
    public var isAtEnd: Bool { offset == bytes.count }

    @inline(__always) mutating func need(_ n: Int) throws {
        if n < 0 || n > bytes.count - offset { throw WeftError.malformed }
    }
    @inline(__always) mutating func fixed<T: FixedWidthInteger>(_: T.Type) throws -> T {
        try need(MemoryLayout<T>.size)
        var v: T = 0
        withUnsafeMutableBytes(of: &v) { $0.copyMemory(from: UnsafeRawBufferPointer(rebasing: bytes[offset..<offset + MemoryLayout<T>.size])) }
        offset += MemoryLayout<T>.size
        return v
    }
    public mutating func u8() throws -> UInt8 { try fixed(UInt8.self) }
    public mutating func bool() throws -> Bool {
        let v = try u8()
        guard v <= 1 else { throw WeftError.malformed }
        return v == 1
    }
    public mutating func u16() throws -> UInt16 { UInt16(littleEndian: try fixed(UInt16.self)) }
    public mutating func u32() throws -> UInt32 { UInt32(littleEndian: try fixed(UInt32.self)) }
    public mutating func u64() throws -> UInt64 { UInt64(littleEndian: try fixed(UInt64.self)) }
    public mutating func i32() throws -> Int32 { Int32(bitPattern: try u32()) }
    public mutating func i64() throws -> Int64 { Int64(bitPattern: try u64()) }
    public mutating func u64BE() throws -> UInt64 { UInt64(bigEndian: try fixed(UInt64.self)) }
    public mutating func u32BE() throws -> UInt32 { UInt32(bigEndian: try fixed(UInt32.self)) }
    public mutating func raw(_ n: Int) throws -> [UInt8] {
        try need(n)
        let v = Array(bytes[offset..<offset + n])
        offset += n
        return v
    }
    public mutating func rawSlice(_ n: Int) throws -> UnsafeRawBufferPointer {
        try need(n)
        let v = UnsafeRawBufferPointer(rebasing: bytes[offset..<offset + n])
        offset += n
        return v
    }
    public mutating func blob(max: Int? = nil) throws -> [UInt8] {
        let n = Int(try u32())
        if n > (max ?? maxBlobBytes) { throw WeftError.malformed }
        return try raw(n)
    }
    public mutating func string(max: Int = 4096) throws -> String {
        String(decoding: try blob(max: max), as: UTF8.self)
    }
    public mutating func optionalU64() throws -> UInt64? {
        try bool() ? try u64() : nil
    }
    /// A count prefix for a list, bounded before anything is allocated.
    public mutating func count(max: Int) throws -> Int {
        let n = Int(try u32())
        if n > max { throw WeftError.malformed }
        return n
    }
}

extension WeftError {
    /// A record or frame that does not decode.
    public static let malformed = WeftError(74 /* EBADMSG */, "malformed record")
}

extension Array where Element == UInt8 {
    /// Decodes with a `ByteReader` over this array's storage.
    public func decode<T>(_ body: (inout ByteReader) throws -> T) throws -> T {
        try withUnsafeBytes { raw in
            var reader = ByteReader(raw)
            return try body(&reader)
        }
    }
}
