#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import Logging
import WeftProto

/// Turns the stored blocks of a chunk object, as a hub sent them unread (SPEC.md §4,
/// Stored-block reads), into raw bytes, checking each block as the store itself would (§3.2):
/// a raw block's stored length is its raw length, a compressed one is shorter and decodes to
/// exactly its raw length, and every block's CRC32C matches. The reader thus gets exactly the
/// bytes `ChunkStore.read` gives, or an error.
public enum StoredBlockDecoder {
    private static let workspaces = WorkspacePool()

    /// Fills `destination` with the raw bytes from block `firstBlock` on, out of `stored` (the
    /// blocks' stored bytes back to back). `stored` may be the start of `destination` itself
    /// (the event loop copies them there when they fit): blocks are placed from the last to the
    /// first, so no block's raw place overlaps the stored bytes of a block before it.
    ///
    /// Throws EINVAL when the blocks hold fewer raw bytes than `destination` (a read past the
    /// object's end), EPROTO for entries that break the format's rules or do not cover
    /// `destination` (a malformed response), and EIO for a damaged block, after one log line
    /// naming the chunk and the block.
    public static func decode(id: SliceID, firstBlock: Int, rawLength: Int, entries: [StoredBlockEntry],
                              stored: UnsafeRawBufferPointer, into destination: UnsafeMutableRawBufferPointer,
                              logger: Logger) throws {
        let blockSize = ChunkFormat.blockSizeBytes
        let offsets = try check(id: id, firstBlock: firstBlock, rawLength: rawLength, entries: entries,
                                storedBytes: stored.count, readBytes: destination.count)
        var workspace: Workspace?
        defer { if let workspace { workspaces.release(workspace) } }
        for index in entries.indices.reversed() {
            let entry = entries[index]
            let block = firstBlock + index
            let raw = ChunkFormat.rawLength(ofBlock: block, rawLength: rawLength)
            let place = destination.baseAddress! + index * blockSize
            let room = min(raw, destination.count - index * blockSize)
            let source = stored.baseAddress! + offsets[index]
            if !entry.compressed {
                let actual = crc32c(UnsafeRawBufferPointer(start: source, count: raw))
                guard actual == entry.crc else { throw damaged(id, block, entry.crc, actual, logger) }
                if UnsafeRawPointer(place) != source { memmove(place, source, room) }
                continue
            }
            if workspace == nil { workspace = workspaces.acquire() }
            let frame = UnsafeMutableRawBufferPointer(rebasing: workspace!.stored[0..<Int(entry.storedLength)])
            frame.baseAddress!.copyMemory(from: source, byteCount: frame.count)
            let target = room == raw ? UnsafeMutableRawBufferPointer(start: place, count: raw)
                                     : UnsafeMutableRawBufferPointer(rebasing: workspace!.raw[0..<raw])
            guard let size = workspace!.decompress(UnsafeRawBufferPointer(frame), into: target), size == raw else {
                logger.error("chunk \(hex(id)) damaged at block \(block): zstd frame does not decode to \(raw) bytes (read from the hub)",
                             metadata: ["chunk": "\(hex(id))", "block": "\(block)"])
                throw WeftError(EIO, "chunk \(hex(id)) damaged at block \(block)")
            }
            let actual = crc32c(UnsafeRawBufferPointer(target))
            guard actual == entry.crc else { throw damaged(id, block, entry.crc, actual, logger) }
            if room < raw { place.copyMemory(from: target.baseAddress!, byteCount: room) }
        }
    }

    /// Checks the entries against the format's rules and the read, before any byte is looked
    /// at; returns where each block's stored bytes start. EINVAL for a read past the object's
    /// end, EPROTO for entries that break the rules or do not cover the read (a malformed response).
    public static func check(id: SliceID, firstBlock: Int, rawLength: Int, entries: [StoredBlockEntry],
                             storedBytes: Int, readBytes: Int) throws -> [Int] {
        let blockSize = ChunkFormat.blockSizeBytes
        let start = firstBlock * blockSize
        guard rawLength <= ChunkFormat.maxRawBytes else {
            throw WeftError(EPROTO, "chunk \(hex(id)) sent as \(rawLength) bytes, over the \(ChunkFormat.maxRawBytes)-byte limit")
        }
        guard start + readBytes <= rawLength else {
            throw WeftError(EINVAL, "range \(start)+\(readBytes) outside chunk \(hex(id)) of \(rawLength) bytes")
        }
        let needed = (readBytes + blockSize - 1) / blockSize
        guard entries.count == needed else {
            throw WeftError(EPROTO, "\(entries.count) blocks of chunk \(hex(id)) sent for a \(readBytes)-byte read")
        }
        var offsets: [Int] = []
        offsets.reserveCapacity(entries.count)
        var position = 0
        for (index, entry) in entries.enumerated() {
            let raw = ChunkFormat.rawLength(ofBlock: firstBlock + index, rawLength: rawLength)
            let length = Int(entry.storedLength)
            let valid = entry.flags & ~StoredBlockEntry.flagZstd == 0
                && (entry.compressed ? length > 0 && length < raw : length == raw)
            guard valid else {
                throw WeftError(EPROTO, "block \(firstBlock + index) of chunk \(hex(id)) sent as \(length) bytes, "
                                + "flags \(entry.flags), for \(raw) raw bytes")
            }
            offsets.append(position)
            position += length
        }
        guard position == storedBytes else {
            throw WeftError(EPROTO, "\(storedBytes) stored bytes of chunk \(hex(id)) sent for blocks of \(position)")
        }
        return offsets
    }

    private static func damaged(_ id: SliceID, _ block: Int, _ expected: UInt32, _ actual: UInt32, _ logger: Logger) -> WeftError {
        let reason = "crc32c mismatch (stored \(String(expected, radix: 16)), computed \(String(actual, radix: 16)))"
        logger.error("chunk \(hex(id)) damaged at block \(block): \(reason) in the bytes read from the hub",
                     metadata: ["chunk": "\(hex(id))", "block": "\(block)"])
        return WeftError(EIO, "chunk \(hex(id)) damaged at block \(block)")
    }
}
