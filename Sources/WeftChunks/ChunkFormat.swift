import WeftProto

/// The on-disk layout of one chunk object, format version 2 (SPEC.md §Chunk objects).
///
/// ```
/// offset       size  field
/// 0            4     magic "WFTC"
/// 4            1     format version (2; version 1 files are still read)
/// 5            1     compression of the volume when written (0 none, 1 zstd); informative only
/// 6            2     reserved, zero
/// 8            8     slice id
/// 16           4     raw (uncompressed) length in bytes
/// 20           4     block size in bytes (65536)
/// 24           4     block count = ceil(raw length / block size)
/// 28           4     data offset D (version 1: reserved zero, D = 36 + 12n)
/// 32           12*n  block table, per block:
///                      u32 stored length, u32 crc32c of the raw block bytes,
///                      u8 flags (bit 0: zstd frame; other bits zero), 3 bytes reserved, zero
/// 32+12n       4     crc32c of bytes [0, 32+12n)
/// 36+12n       D-36-12n  zero padding (< 4096 bytes), never read
/// D            ...   block payloads in block order, each exactly its stored length
/// ```
/// All integers are little-endian. The file length is exactly D + sum of stored lengths.
/// A writer pads D to a multiple of 4096 for an uncompressed object of at least one block, so
/// that its payloads can be read and written with O_DIRECT.
enum ChunkFormat {
    static let magic: (UInt8, UInt8, UInt8, UInt8) = (0x57, 0x46, 0x54, 0x43)  // "WFTC"
    /// The version this build writes; it reads `oldestReadableVersion...version`.
    static let version: UInt8 = 2
    static let oldestReadableVersion: UInt8 = 1
    /// Alignment of the payloads of an aligned object, and of O_DIRECT transfers.
    static let directAlignment = 4096
    static let fixedHeaderBytes = 32
    static let tableEntryBytes = 12
    static let headerChecksumBytes = 4
    static let blockSizeBytes = Limits.blockSizeBytes
    static let maxRawBytes = Limits.chunkSizeMaxBytes
    static let maxBlockCount = (maxRawBytes + blockSizeBytes - 1) / blockSizeBytes
    /// Block flag: the payload is one zstd frame that decompresses to the raw block.
    static let flagZstd: UInt8 = 1
    /// The largest header an object of any valid size can have.
    static let maxHeaderBytes = headerBytes(blockCount: maxBlockCount)
    /// zstd level for compressed volumes: measured on 2 cores, level 1 compresses 64 KiB blocks
    /// at ~360-410 MB/s versus ~290 MB/s for level 3, for a ratio only 3-5% worse.
    static let zstdLevel: Int32 = 1

    @inline(__always) static func headerBytes(blockCount: Int) -> Int {
        fixedHeaderBytes + tableEntryBytes * blockCount + headerChecksumBytes
    }

    /// Where the payloads start: aligned for an object of whole raw blocks (direct I/O), right
    /// after the header otherwise (small objects would waste most of a page).
    static func dataOffset(blockCount: Int, anyCompressed: Bool, rawLength: Int) -> Int {
        let header = headerBytes(blockCount: blockCount)
        guard !anyCompressed, rawLength >= blockSizeBytes else { return header }
        return (header + directAlignment - 1) / directAlignment * directAlignment
    }

    @inline(__always) static func blockCount(rawLength: Int) -> Int {
        (rawLength + blockSizeBytes - 1) / blockSizeBytes
    }

    @inline(__always) static func rawLength(ofBlock index: Int, rawLength: Int) -> Int {
        min(blockSizeBytes, rawLength - index * blockSizeBytes)
    }
}

/// One block of a decoded object: where its payload lies in the file and how to check it.
struct BlockEntry {
    var fileOffset: Int
    var storedLength: Int
    var crc: UInt32
    var compressed: Bool
}

/// A decoded, fully validated header: every block entry is consistent with the file's length.
struct ChunkLayout {
    var rawLength: Int
    /// File offset of the first payload.
    var dataOffset: Int
    var blocks: ContiguousArray<BlockEntry>
    var fileBytes: Int

    @inline(__always) func rawLength(ofBlock index: Int) -> Int {
        ChunkFormat.rawLength(ofBlock: index, rawLength: rawLength)
    }
}

extension ChunkLayout {
    /// Checks every block of `file`, an object's whole file laid out as this layout says (a
    /// copy from another hub, an image an agent sent): a compressed block must decompress to
    /// exactly its raw length, and each block's raw bytes must match its CRC32C. The first
    /// failure, as its block index and the reason, or nil when every block is sound.
    func firstDamagedBlock(in file: UnsafeRawBufferPointer, workspace: Workspace) -> (block: Int, reason: String)? {
        for (index, entry) in blocks.enumerated() {
            let stored = UnsafeRawBufferPointer(rebasing: file[entry.fileOffset..<entry.fileOffset + entry.storedLength])
            let rawLength = rawLength(ofBlock: index)
            let raw: UnsafeRawBufferPointer
            if entry.compressed {
                let target = UnsafeMutableRawBufferPointer(rebasing: workspace.raw[0..<rawLength])
                guard workspace.decompress(stored, into: target) == rawLength else {
                    return (index, "zstd frame does not decode to \(rawLength) bytes")
                }
                raw = UnsafeRawBufferPointer(target)
            } else {
                raw = stored
            }
            let actual = crc32c(raw)
            guard actual == entry.crc else {
                return (index, "crc32c mismatch (stored \(String(entry.crc, radix: 16)), computed \(String(actual, radix: 16)))")
            }
        }
        return nil
    }
}

/// Why a stored object is unreadable; the store turns it into one log line and EIO.
struct ChunkDamage: Error {
    var block: String
    var reason: String
}

extension ChunkFormat {
    /// Encodes the header and block table (with its checksum) into `header`, which must be
    /// exactly `headerBytes(blockCount: blocks.count)` long; the payloads start at `dataOffset`.
    static func encodeHeader(into header: UnsafeMutableRawBufferPointer, id: SliceID, compression: Compression,
                             rawLength: Int, dataOffset: Int, blocks: UnsafeBufferPointer<BlockEntry>) {
        let count = blocks.count
        precondition(header.count == headerBytes(blockCount: count), "header buffer size")
        precondition(count == blockCount(rawLength: rawLength), "block count")
        let base = header.baseAddress!
        base.storeBytes(of: magic.0, toByteOffset: 0, as: UInt8.self)
        base.storeBytes(of: magic.1, toByteOffset: 1, as: UInt8.self)
        base.storeBytes(of: magic.2, toByteOffset: 2, as: UInt8.self)
        base.storeBytes(of: magic.3, toByteOffset: 3, as: UInt8.self)
        base.storeBytes(of: version, toByteOffset: 4, as: UInt8.self)
        base.storeBytes(of: compression.rawValue, toByteOffset: 5, as: UInt8.self)
        base.storeBytes(of: UInt16(0), toByteOffset: 6, as: UInt16.self)
        base.storeBytes(of: id.littleEndian, toByteOffset: 8, as: UInt64.self)
        base.storeBytes(of: UInt32(rawLength).littleEndian, toByteOffset: 16, as: UInt32.self)
        base.storeBytes(of: UInt32(blockSizeBytes).littleEndian, toByteOffset: 20, as: UInt32.self)
        base.storeBytes(of: UInt32(count).littleEndian, toByteOffset: 24, as: UInt32.self)
        precondition(dataOffset >= header.count && dataOffset - header.count < directAlignment, "data offset")
        base.storeBytes(of: UInt32(dataOffset).littleEndian, toByteOffset: 28, as: UInt32.self)
        for index in 0..<count {
            let entry = blocks[index]
            let at = fixedHeaderBytes + index * tableEntryBytes
            base.storeBytes(of: UInt32(entry.storedLength).littleEndian, toByteOffset: at, as: UInt32.self)
            base.storeBytes(of: entry.crc.littleEndian, toByteOffset: at + 4, as: UInt32.self)
            base.storeBytes(of: UInt32(entry.compressed ? UInt32(flagZstd) : 0).littleEndian,
                            toByteOffset: at + 8, as: UInt32.self)
        }
        let checksumAt = header.count - headerChecksumBytes
        let checksum = crc32c(UnsafeRawBufferPointer(rebasing: header[0..<checksumAt]))
        base.storeBytes(of: checksum.littleEndian, toByteOffset: checksumAt, as: UInt32.self)
    }

    /// Decodes and validates a header read from the start of a file of `fileBytes` bytes.
    ///
    /// `prefix` holds the first `min(fileBytes, maxHeaderBytes)` bytes of the file. Every field
    /// is checked before it is used; nothing is allocated beyond `maxBlockCount` entries.
    static func decodeHeader(_ prefix: UnsafeRawBufferPointer, fileBytes: Int, expectedID: SliceID) throws(ChunkDamage)
        -> ChunkLayout
    {
        func damage(_ reason: String) -> ChunkDamage { ChunkDamage(block: "header", reason: reason) }
        guard prefix.count >= headerBytes(blockCount: 0) else {
            throw damage("file is \(fileBytes) bytes, shorter than the smallest header")
        }
        func u8(_ at: Int) -> UInt8 { prefix.load(fromByteOffset: at, as: UInt8.self) }
        func u32(_ at: Int) -> UInt32 { UInt32(littleEndian: prefix.loadUnaligned(fromByteOffset: at, as: UInt32.self)) }
        guard u8(0) == magic.0, u8(1) == magic.1, u8(2) == magic.2, u8(3) == magic.3 else { throw damage("bad magic") }
        let formatVersion = u8(4)
        guard (oldestReadableVersion...version).contains(formatVersion) else {
            throw damage("unsupported format version \(formatVersion)")
        }
        guard Compression(rawValue: u8(5)) != nil else { throw damage("unknown compression \(u8(5))") }
        guard u8(6) == 0, u8(7) == 0, formatVersion >= 2 || u32(28) == 0 else {
            throw damage("reserved header bytes not zero")
        }
        let id = UInt64(littleEndian: prefix.loadUnaligned(fromByteOffset: 8, as: UInt64.self))
        guard id == expectedID else { throw damage("header names chunk \(hex(id))") }
        let rawLength = Int(u32(16))
        guard rawLength <= maxRawBytes else { throw damage("raw length \(rawLength) over the limit") }
        guard Int(u32(20)) == blockSizeBytes else { throw damage("block size \(u32(20)) is not \(blockSizeBytes)") }
        let count = Int(u32(24))
        guard count == blockCount(rawLength: rawLength) else {
            throw damage("block count \(count) does not match raw length \(rawLength)")
        }
        let headerLength = headerBytes(blockCount: count)
        guard prefix.count >= headerLength else {
            throw damage("file is \(fileBytes) bytes, shorter than its \(headerLength)-byte header")
        }
        let checksumAt = headerLength - headerChecksumBytes
        let expectedChecksum = u32(checksumAt)
        let actualChecksum = crc32c(UnsafeRawBufferPointer(rebasing: prefix[0..<checksumAt]))
        guard expectedChecksum == actualChecksum else { throw damage("header checksum mismatch") }

        let dataOffset = formatVersion >= 2 ? Int(u32(28)) : headerLength
        guard dataOffset >= headerLength, dataOffset - headerLength < directAlignment else {
            throw damage("data offset \(dataOffset) outside [\(headerLength), \(headerLength + directAlignment))")
        }
        var blocks = ContiguousArray<BlockEntry>()
        blocks.reserveCapacity(count)
        var fileOffset = dataOffset
        for index in 0..<count {
            let at = fixedHeaderBytes + index * tableEntryBytes
            let storedLength = Int(u32(at))
            let flags = u32(at + 8)
            guard flags & ~UInt32(flagZstd) == 0 else { throw damage("block \(index) has unknown flags \(flags)") }
            let compressed = flags & UInt32(flagZstd) != 0
            let raw = ChunkFormat.rawLength(ofBlock: index, rawLength: rawLength)
            if compressed {
                guard storedLength > 0, storedLength < raw else {
                    throw damage("block \(index) compressed length \(storedLength) not below raw \(raw)")
                }
            } else {
                guard storedLength == raw else { throw damage("block \(index) stored length \(storedLength) is not \(raw)") }
            }
            blocks.append(BlockEntry(fileOffset: fileOffset, storedLength: storedLength, crc: u32(at + 4),
                                     compressed: compressed))
            fileOffset += storedLength
        }
        guard fileOffset == fileBytes else {
            throw damage("file is \(fileBytes) bytes, header describes \(fileOffset) (truncated or extended)")
        }
        return ChunkLayout(rawLength: rawLength, dataOffset: dataOffset, blocks: blocks, fileBytes: fileBytes)
    }
}

/// The 16-digit lower-case hex spelling of a slice id, as used in file names and logs.
public func hex(_ id: SliceID) -> String {
    let digits = String(id, radix: 16)
    return String(repeating: "0", count: 16 - digits.count) + digits
}
