#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import NIOCore
import WeftChunks
import WeftProto

/// What the event loop keeps of a `readBlocks` response (SPEC.md §4, Stored-block reads): the
/// entries, and where the stored bytes went (the caller's memory, or `staged` when they did not
/// fit there). The calling thread checks them (`StoredBlockDecoder`).
struct StoredBlocksReply {
    var rawLength: Int
    var entries: [StoredBlockEntry]
    var byteCount: Int
    var staged: [UInt8]?
}

extension WireCodec {
    /// Bytes of a `readBlocks` response's trailer (an `i32` errno).
    static let storedBlocksTrailerBytes = 4

    /// The head of a successful `readBlocks` response: the frame start (its length counts the
    /// stored bytes and the trailer that follow), status 0, rawLength, the entries, byteCount.
    static func storedBlocksHead(id: UInt64, blocks: StoredBlocks, allocator: ByteBufferAllocator) -> ByteBuffer? {
        let payload = 4 + 4 + 4 + blocks.entries.count * StoredBlockEntry.encodedBytes + 4
        let length = headerBytes + payload + blocks.byteCount + storedBlocksTrailerBytes
        guard length <= maxFrameBytes else { return nil }
        var buffer = allocator.buffer(capacity: lengthPrefixBytes + headerBytes + payload)
        writeFrameStart(FrameHeader(kind: .response, opcode: HubOpcode.readBlocks.rawValue, requestID: id),
                        length: length, into: &buffer)
        buffer.writeInteger(Int32(0), endianness: .little)
        buffer.writeInteger(UInt32(blocks.rawLength), endianness: .little)
        buffer.writeInteger(UInt32(blocks.entries.count), endianness: .little)
        for entry in blocks.entries {
            buffer.writeInteger(entry.storedLength, endianness: .little)
            buffer.writeInteger(entry.crc, endianness: .little)
            buffer.writeInteger(entry.flags)
        }
        buffer.writeInteger(UInt32(blocks.byteCount), endianness: .little)
        return buffer
    }

    /// Decodes the head and tail of a `readBlocks` response whose stored bytes the reading thread
    /// received straight into the caller's memory (so they fit there), with the checks of the
    /// whole-frame decoder below.
    static func decodeStoredBlocks(head: UnsafeRawBufferPointer, tail: UnsafeRawBufferPointer, id: SliceID,
                                   firstBlock: Int, readBytes: Int) throws -> Result<StoredBlocksReply, WeftError> {
        var reader = ByteReader(head)
        guard try reader.i32() == 0 else { throw WeftError(EPROTO, "a failed readBlocks response cannot have a bulk") }
        let rawLength = Int(try reader.u32())
        let entries = try decodeEntries(&reader)
        let byteCount = Int(try reader.u32())
        guard reader.isAtEnd else { throw trailingBytes(reader.remaining, .readBlocks) }
        var trailing = ByteReader(tail)
        let trailer = try trailing.i32()
        guard trailing.isAtEnd else { throw trailingBytes(trailing.remaining, .readBlocks) }
        return try checkedStoredBlocks(rawLength: rawLength, entries: entries, byteCount: byteCount, trailer: trailer,
                                       id: id, firstBlock: firstBlock, readBytes: readBytes)
    }

    private static func decodeEntries(_ reader: inout ByteReader) throws -> [StoredBlockEntry] {
        let count = try reader.count(max: min(StoredBlocks.countMax, reader.remaining / StoredBlockEntry.encodedBytes))
        var entries: [StoredBlockEntry] = []
        entries.reserveCapacity(count)
        for _ in 0..<count {
            entries.append(StoredBlockEntry(storedLength: try reader.u32(), crc: try reader.u32(), flags: try reader.u8()))
        }
        return entries
    }

    /// The reply, after the checks both decoders share: a byte count that is the entries' sum
    /// (else EPROTO), the trailer (its errno as the failure), and `StoredBlockDecoder.check`
    /// (EPROTO thrown, a read past the object's end EINVAL returned).
    private static func checkedStoredBlocks(rawLength: Int, entries: [StoredBlockEntry], byteCount: Int, trailer: Int32,
                                            id: SliceID, firstBlock: Int,
                                            readBytes: Int) throws -> Result<StoredBlocksReply, WeftError> {
        let sum = entries.reduce(0) { $0 + Int($1.storedLength) }
        guard byteCount == sum else {
            throw WeftError(EPROTO, "readBlocks response of \(byteCount) bytes for blocks of \(sum)")
        }
        guard trailer >= 0 else { throw WeftError(EPROTO, "negative trailer \(trailer) in a readBlocks response") }
        // Malformed entries close the connection whatever the trailer says.
        var outside: WeftError?
        do {
            _ = try StoredBlockDecoder.check(id: id, firstBlock: firstBlock, rawLength: rawLength, entries: entries,
                                             storedBytes: byteCount, readBytes: readBytes)
        } catch let error as WeftError where error.errno == EINVAL {
            outside = error
        }
        if trailer != 0 {
            return .failure(WeftError(trailer, "hub could not read chunk \(hex(id)): \(String(cString: strerror(trailer)))"))
        }
        if let outside { return .failure(outside) }
        return .success(StoredBlocksReply(rawLength: rawLength, entries: entries, byteCount: byteCount, staged: nil))
    }

    /// Decodes a `readBlocks` response on the event loop: an error response is that error; a
    /// non-zero trailer is its errno; otherwise the stored bytes are copied into `destination`
    /// when they fit, else into a buffer of their own. Throws for a malformed payload (the
    /// connection then closes): a count over the limit, a byte count that is not the sum of the
    /// entries' stored lengths, entries that break the format's rules or do not cover the read
    /// (`StoredBlockDecoder.check`), bytes that do not match the frame. A read past the object's
    /// end is EINVAL, as `readSlice` answers it.
    static func decodeStoredBlocks(opcode: HubOpcode, payload: ByteBuffer, id: SliceID, firstBlock: Int,
                                   into destination: UnsafeMutableRawBufferPointer) throws -> Result<StoredBlocksReply, WeftError> {
        try payload.withUnsafeReadableBytes { raw in
            var reader = ByteReader(raw)
            guard try reader.i32() == 0 else {
                guard case .failure(let error) = try decodeResponse(opcode: opcode, payload: raw) else {
                    throw WeftError(EBADMSG, "malformed \(opcode) error response")
                }
                return .failure(error)
            }
            let rawLength = Int(try reader.u32())
            let entries = try decodeEntries(&reader)
            let byteCount = Int(try reader.u32())
            let bytes = try reader.rawSlice(byteCount)
            let trailer = try reader.i32()
            guard reader.isAtEnd else { throw trailingBytes(reader.remaining, opcode) }
            let checked = try checkedStoredBlocks(rawLength: rawLength, entries: entries, byteCount: byteCount,
                                                  trailer: trailer, id: id, firstBlock: firstBlock,
                                                  readBytes: destination.count)
            guard case .success(var reply) = checked else { return checked }
            if byteCount <= destination.count {
                if byteCount > 0 { destination.baseAddress!.copyMemory(from: bytes.baseAddress!, byteCount: byteCount) }
            } else {
                reply.staged = Array(bytes)
            }
            return .success(reply)
        }
    }
}
