/// One block-table entry of a chunk object, as the object file stores it (SPEC.md §3.2).
public struct StoredBlockEntry: Equatable, Sendable {
    /// Bytes of the block's payload in the file.
    public var storedLength: UInt32
    /// CRC32C of the block's raw (uncompressed) bytes.
    public var crc: UInt32
    /// Bit 0: the payload is a zstd frame. Every other bit is 0.
    public var flags: UInt8

    public static let flagZstd: UInt8 = 1
    public static let encodedBytes = 9

    public init(storedLength: UInt32, crc: UInt32, flags: UInt8) {
        self.storedLength = storedLength
        self.crc = crc
        self.flags = flags
    }

    public var compressed: Bool { flags & Self.flagZstd != 0 }
}

/// Blocks of a chunk object as its file holds them, for a transport that sends the bytes from
/// the file without reading them (SPEC.md §4, Stored-block reads). The blocks' stored bytes are
/// `byteCount` bytes at `fileOffset` of `descriptor`, which stays open while `keepAlive` lives.
/// A hub's read cache (SPEC.md §4, Hub read cache) gives them in `memory` instead: the span's
/// bytes followed by a zero 4-byte trailer, valid while `keepAlive` lives.
public struct StoredBlocks: @unchecked Sendable {
    public var id: SliceID
    /// The object's raw (uncompressed) length.
    public var rawLength: Int
    public var firstBlock: Int
    public var entries: [StoredBlockEntry]
    public var descriptor: Int32
    public var fileOffset: Int
    public var byteCount: Int
    /// The span and its zero trailer (`byteCount` + 4 bytes) in memory, or nil: read the file.
    public var memory: UnsafeRawBufferPointer?
    public let keepAlive: AnyObject

    public init(id: SliceID, rawLength: Int, firstBlock: Int, entries: [StoredBlockEntry], descriptor: Int32,
                fileOffset: Int, byteCount: Int, memory: UnsafeRawBufferPointer? = nil, keepAlive: AnyObject) {
        self.id = id
        self.rawLength = rawLength
        self.firstBlock = firstBlock
        self.entries = entries
        self.descriptor = descriptor
        self.fileOffset = fileOffset
        self.byteCount = byteCount
        self.memory = memory
        self.keepAlive = keepAlive
    }

    /// Most blocks one request names: a 64 MiB object's whole table.
    public static let countMax = Limits.chunkSizeMaxBytes / Limits.blockSizeBytes
}
