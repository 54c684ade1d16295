import WeftProto

/// RocksDB key layout of a Weft volume (format version 1). Every key starts with a one-byte
/// tag; integers in keys are big-endian so that byte order is numeric order. SPEC.md §Formats.
enum Key {
    static let volumeTag: UInt8 = 0x56       // 'V'            -> VolumeInfo
    static let counterTag: UInt8 = 0x4E      // 'N'            -> Counters
    static let inodeTag: UInt8 = 0x49        // 'I' ino        -> InodeRecord
    static let entryTag: UInt8 = 0x44        // 'D' parent name -> EntryValue
    static let chunkTag: UInt8 = 0x43        // 'C' ino index  -> [Slice]
    static let xattrTag: UInt8 = 0x58        // 'X' ino name   -> value
    static let symlinkTag: UInt8 = 0x53      // 'S' ino        -> target
    static let orphanTag: UInt8 = 0x4F       // 'O' ino        -> (empty) unlinked but open
    static let garbageTag: UInt8 = 0x47      // 'G' sliceID    -> (empty) or u16BE holder hub: chunk object to delete
    static let journaledTag: UInt8 = 0x4A    // 'J' sliceID    -> raw bytes of an object the journal carries

    static let volume: [UInt8] = [volumeTag]
    static let counters: [UInt8] = [counterTag]

    static func inode(_ ino: InodeID) -> [UInt8] { tagged(inodeTag, ino) }
    static func symlink(_ ino: InodeID) -> [UInt8] { tagged(symlinkTag, ino) }
    static func orphan(_ ino: InodeID) -> [UInt8] { tagged(orphanTag, ino) }
    static func garbage(_ id: SliceID) -> [UInt8] { tagged(garbageTag, id) }
    static func journaled(_ id: SliceID) -> [UInt8] { tagged(journaledTag, id) }
    static func entryPrefix(_ parent: InodeID) -> [UInt8] { tagged(entryTag, parent) }
    static func entry(_ parent: InodeID, _ name: [UInt8]) -> [UInt8] { entryPrefix(parent) + name }
    static func chunkPrefix(_ ino: InodeID) -> [UInt8] { tagged(chunkTag, ino) }
    static func chunk(_ ino: InodeID, _ index: UInt32) -> [UInt8] {
        var w = ByteWriter(capacity: 13)
        w.u8(chunkTag); w.u64BE(ino); w.u32BE(index)
        return w.bytes
    }
    static func xattrPrefix(_ ino: InodeID) -> [UInt8] { tagged(xattrTag, ino) }
    static func xattr(_ ino: InodeID, _ name: [UInt8]) -> [UInt8] { xattrPrefix(ino) + name }

    /// The id of a key made by `tagged(tag, id)` (`G`, `J`, `I`, ...), or nil for another key.
    static func id(in key: [UInt8], tag: UInt8) -> UInt64? {
        guard key.count == 9, key[0] == tag else { return nil }
        return key[1...].reduce(0) { $0 << 8 | UInt64($1) }
    }

    /// Whether `key` is a chunk's slice list (`C` ino index).
    static func isChunk(_ key: [UInt8]) -> Bool { key.count == 13 && key[0] == chunkTag }

    private static func tagged(_ tag: UInt8, _ id: UInt64) -> [UInt8] {
        var w = ByteWriter(capacity: 9)
        w.u8(tag); w.u64BE(id)
        return w.bytes
    }
}

/// An inode as stored: its attributes and, for a directory, its parent.
struct InodeRecord: Equatable {
    var attributes: Attributes
    var parent: InodeID

    func encoded() -> [UInt8] {
        var w = ByteWriter(capacity: 80)
        attributes.encode(into: &w)
        w.u64(parent)
        return w.bytes
    }
    static func decode(_ bytes: UnsafeRawBufferPointer) throws -> InodeRecord {
        var r = ByteReader(bytes)
        return InodeRecord(attributes: try Attributes.decode(from: &r), parent: try r.u64())
    }
}

/// A directory entry's value: the child inode and its file type bits.
struct EntryValue {
    var ino: InodeID
    var type: UInt32

    func encoded() -> [UInt8] {
        var w = ByteWriter(capacity: 12)
        w.u64(ino); w.u32(type)
        return w.bytes
    }
    static func decode(_ bytes: UnsafeRawBufferPointer) throws -> EntryValue {
        var r = ByteReader(bytes)
        return EntryValue(ino: try r.u64(), type: try r.u32())
    }
}

/// Volume-wide counters, rewritten in the same batch as every change that moves them.
struct Counters: Equatable {
    var nextInode: UInt64 = 2
    var nextSlice: UInt64 = 1
    var inodes: UInt64 = 1
    var logicalBytes: UInt64 = 0

    func encoded() -> [UInt8] {
        var w = ByteWriter(capacity: 33)
        w.u8(1); w.u64(nextInode); w.u64(nextSlice); w.u64(inodes); w.u64(logicalBytes)
        return w.bytes
    }
    static func decode(_ bytes: [UInt8]) throws -> Counters {
        try bytes.decode { r in
            guard try r.u8() == 1 else { throw WeftError.malformed }
            return Counters(nextInode: try r.u64(), nextSlice: try r.u64(), inodes: try r.u64(), logicalBytes: try r.u64())
        }
    }
}

/// First u32 of a versioned slice-list record: never a valid version 1 count.
let sliceListVersionMarker: UInt32 = 0xFFFF_FFFF

/// A chunk's slice list (`C` value). Version 1 (u32 count, 24-byte slices) is written while
/// every slice is held by the home (`hub` 0), so single-hub volumes keep their format; otherwise
/// version 2: u32 marker 0xFFFFFFFF, u8 version 2, u32 count, 26-byte slices (with `hub`).
func encodeSlices(_ slices: [Slice]) -> [UInt8] {
    if slices.allSatisfy({ $0.hub == 0 }) {
        var w = ByteWriter(capacity: 4 + slices.count * Slice.encodedBytesVersion1)
        w.u32(UInt32(slices.count))
        for s in slices { s.encodeVersion1(into: &w) }
        return w.bytes
    }
    var w = ByteWriter(capacity: 9 + slices.count * Slice.encodedBytes)
    w.u32(sliceListVersionMarker); w.u8(2); w.u32(UInt32(slices.count))
    for s in slices { s.encode(into: &w) }
    return w.bytes
}

func decodeSlices(_ bytes: UnsafeRawBufferPointer) throws -> [Slice] {
    var r = ByteReader(bytes)
    let first = try r.u32()
    var slices: [Slice] = []
    if first != sliceListVersionMarker {
        let n = Int(first)
        guard n <= 1 << 20 else { throw WeftError.malformed }
        slices.reserveCapacity(n)
        for _ in 0..<n { slices.append(try Slice.decodeVersion1(from: &r)) }
        return slices
    }
    guard try r.u8() == 2 else { throw WeftError.malformed }
    let n = try r.count(max: 1 << 20)
    slices.reserveCapacity(n)
    for _ in 0..<n { slices.append(try Slice.decode(from: &r)) }
    return slices
}
