#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import NIOCore
import WeftProto

/// Bytes a thread reads from a socket itself, split into frames (SPEC.md §4: the hub's serving
/// threads, the agent's callers). Not thread-safe: only the thread that holds the connection's
/// read turn uses it, and the turn's lock orders one holder after another.
struct FrameReader {
    /// Where a frame's bulk data starts in its payload, found from the payload's first bytes
    /// (`prefix`, as many as are buffered), or nil: the frame has no bulk data to place on a page
    /// boundary, or `prefix` is too short to tell yet.
    typealias BulkDataOffset = (_ header: FrameHeader, _ payloadBytes: Int, _ prefix: UnsafeRawBufferPointer) -> Int?

    /// The smallest buffer `split` moves an unfinished frame into: reading on then has room
    /// without growing it at once.
    static let restMinimumBytes = 64 * 1024
    /// A frame at least this long (prefix included) gets a buffer of its own as it arrives
    /// (`reserveWhole`): nothing after it is read into that buffer.
    static let largeFrameBytes = 64 * 1024
    /// A read into an empty buffer takes at most this much, so that a large frame's head comes in
    /// with little of the rest, and placing it copies little (`reserveWhole`).
    static let headReadBytes = 4096

    private var buffer: ByteBuffer
    private let allocator: ByteBufferAllocator
    private let bulkDataOffset: BulkDataOffset?
    private let reserveWhole: Bool
    /// Whole frames taken out of the buffer by `receive` (to make room), not yet handed out.
    private var ready: [InboundFrame] = []
    /// Why `receive` stopped splitting (a bad frame); `frames()` throws it.
    private var failure: Error?
    /// Bytes moved from one buffer to another by `split` (copied), since the start.
    private(set) var movedBytes = 0

    /// With `reserveWhole`, room is made for the whole of a frame that has not fully arrived;
    /// without it, none (the caller may receive it elsewhere, or calls `reserve`). With
    /// `bulkDataOffset`, such a frame is received into a buffer placed so that its bulk data
    /// starts on a page boundary (SPEC.md §4, Bulk transfers).
    init(allocator: ByteBufferAllocator, reserveWhole: Bool = true, bulkDataOffset: BulkDataOffset? = nil) {
        self.allocator = allocator
        self.reserveWhole = reserveWhole
        self.bulkDataOffset = bulkDataOffset
        self.buffer = allocator.buffer(capacity: 4096)
    }

    /// Reads what the socket `descriptor` has now, without waiting, up to `maxBytes`. Returns the
    /// bytes read and, if the stream ended (end of file or an error), why.
    mutating func receive(_ descriptor: Int32, maxBytes: Int) -> (count: Int, end: String?) {
        var total = 0
        while total < maxBytes, failure == nil {
            var limit = maxBytes - total
            if reserveWhole {
                if let first = firstFrameBytes(), first >= Self.largeFrameBytes {
                    let missing = first - buffer.readableBytes
                    if missing <= 0 || buffer.capacity - buffer.readerIndex < first {
                        // A large frame that is whole goes out before anything after it is read;
                        // one without room of its own gets it (placed) before more of it is read.
                        split()
                        continue
                    }
                    limit = min(limit, missing)   // its buffer takes nothing of the next frame
                } else if buffer.readableBytes == 0 {
                    limit = min(limit, Self.headReadBytes)
                }
            }
            if buffer.writableBytes < min(16 * 1024, limit) {
                // Whole frames go out of the way first, so the buffer that holds them is never
                // grown (a copy of all of them). A bad frame stops reading: `frames()` throws.
                split()
                if failure != nil { break }
                if buffer.writableBytes < min(16 * 1024, limit) {
                    buffer.reserveCapacity(minimumWritableBytes: 64 * 1024)
                }
            }
            var recvError: Int32 = 0
            let count = buffer.writeWithUnsafeMutableBytes(minimumWritableBytes: 0) { free -> Int in
                let count = recv(descriptor, free.baseAddress, min(free.count, limit), Int32(MSG_DONTWAIT))
                if count < 0 { recvError = errno }
                return max(count, 0)
            }
            if count > 0 {
                total += count
                continue
            }
            if recvError == 0 { return (total, "end of file") }
            if recvError == EINTR { continue }
            if recvError == EAGAIN || recvError == EWOULDBLOCK { break }
            return (total, String(cString: strerror(recvError)))
        }
        return (total, nil)
    }

    /// The frame whose start is buffered but not its end (call after `frames()`): its length
    /// (after the prefix), header, and how many of its bytes, prefix included, are buffered. Nil
    /// while fewer than the prefix and header are in.
    func partialFrame() throws -> (length: Int, header: FrameHeader, buffered: Int)? {
        let start = WireCodec.lengthPrefixBytes + WireCodec.headerBytes
        guard buffer.readableBytes >= start,
              let rawLength = buffer.getInteger(at: buffer.readerIndex, endianness: .little, as: UInt32.self) else { return nil }
        let length = try WireCodec.checkedLength(rawLength)
        let header = try buffer.withUnsafeReadableBytes {
            try WireCodec.decodeHeader(UnsafeRawBufferPointer(rebasing: $0[WireCodec.lengthPrefixBytes..<start]))
        }
        return (length, header, buffer.readableBytes)
    }

    /// Bytes buffered and not yet consumed.
    var bufferedBytes: Int { buffer.readableBytes }

    /// A copy of the buffered bytes from `offset` (0: the first unread byte), at most `count`.
    func peek(from offset: Int, count: Int) -> [UInt8] {
        withBuffered(from: offset, count: count) { Array($0) }
    }

    /// Runs `body` over the buffered bytes from `offset`, at most `count` (not to be kept).
    func withBuffered<T>(from offset: Int, count: Int, _ body: (UnsafeRawBufferPointer) -> T) -> T {
        buffer.withUnsafeReadableBytes { raw in
            let from = min(offset, raw.count)
            return body(UnsafeRawBufferPointer(rebasing: raw[from..<min(raw.count, from + count)]))
        }
    }

    /// Makes room for `count` more bytes at once (a large frame that arrives in pieces).
    mutating func reserve(_ count: Int) {
        buffer.reserveCapacity(minimumWritableBytes: count)
    }

    /// Drops the first `count` buffered bytes.
    mutating func consume(_ count: Int) {
        buffer.moveReaderIndex(forwardBy: count)
        if buffer.readableBytes == 0 { buffer.clear() }
    }

    /// Reads until at least `count` bytes are buffered, waiting for the socket when it has none.
    /// Returns why the stream ended first, or nil.
    mutating func fill(_ descriptor: Int32, to count: Int) -> String? {
        while buffer.readableBytes < count {
            let missing = count - buffer.readableBytes
            buffer.reserveCapacity(minimumWritableBytes: missing)
            var failure: Int32 = 0
            let got = buffer.writeWithUnsafeMutableBytes(minimumWritableBytes: 0) { free -> Int in
                let got = recv(descriptor, free.baseAddress, min(missing, free.count), Int32(MSG_DONTWAIT))
                if got < 0 { failure = errno }
                return max(got, 0)
            }
            if got > 0 { continue }
            if failure == 0 { return "end of file" }
            if failure == EINTR { continue }
            if failure == EAGAIN || failure == EWOULDBLOCK {
                if let end = FrameReader.waitReadable(descriptor) { return end }
                continue
            }
            return String(cString: strerror(failure))
        }
        return nil
    }

    /// Waits until `descriptor` is readable (or hung up). Returns a reason if polling failed.
    static func waitReadable(_ descriptor: Int32) -> String? {
        var watch = pollfd(fd: descriptor, events: Int16(POLLIN), revents: 0)
        while poll(&watch, 1, -1) < 0 {
            if errno != EINTR { return String(cString: strerror(errno)) }
        }
        return nil
    }

    /// Every whole frame read so far, in order. What remains (part of one frame) moves to a buffer
    /// of its own (with room for the whole frame, `reserveWhole`), so that reading on never copies
    /// the frames handed out (they share the old buffer's storage). Throws EPROTO for a bad
    /// length, version or kind, checked as soon as the length's 4 bytes are in.
    mutating func frames() throws -> [InboundFrame] {
        if failure == nil { split() }
        if let failure { throw failure }
        defer { ready = [] }
        return ready
    }

    /// The length (prefix included) of the frame at the buffer's start, once its prefix is in;
    /// not checked (`split` checks it).
    private func firstFrameBytes() -> Int? {
        guard let raw = buffer.getInteger(at: buffer.readerIndex, endianness: .little, as: UInt32.self) else { return nil }
        return WireCodec.lengthPrefixBytes + Int(raw)
    }

    /// `splitting`, keeping what it throws for `frames()`.
    private mutating func split() {
        do { try splitting() } catch { failure = error }
    }

    /// Moves every whole frame in the buffer to `ready`, then the rest (part of one frame) to a
    /// buffer of its own when frames went out or the rest needs a place of its own: room for the
    /// whole frame (`reserveWhole`), its bulk data on a page boundary (`bulkDataOffset`).
    private mutating func splitting() throws {
        var took = false
        var needed = 0
        while let rawLength = buffer.getInteger(at: buffer.readerIndex, endianness: .little, as: UInt32.self) {
            let total = WireCodec.lengthPrefixBytes + (try WireCodec.checkedLength(rawLength))
            guard buffer.readableBytes >= total else {
                needed = total
                break
            }
            guard let frame = try FrameDecoder.nextFrame(from: &buffer) else { break }
            ready.append(frame)
            took = true
        }
        if !reserveWhole { needed = 0 }
        let dataOffset = needed > 0 ? bulkDataStart(frameBytes: needed) : nil
        if !took {
            guard needed > buffer.readableBytes else { return }
            // Unfinished, and nothing went out: the buffer stays if the frame's bulk data is
            // placed (or it has none) and it fits, else what is in moves (the frame's first bytes).
            let placed = dataOffset.map { offset in
                buffer.withUnsafeReadableBytes { (Int(bitPattern: $0.baseAddress) + offset) % BulkMemory.pageBytes == 0 }
            } ?? true
            if placed, buffer.capacity - buffer.readerIndex >= needed || dataOffset == nil {
                buffer.reserveCapacity(minimumWritableBytes: needed - buffer.readableBytes)
                return
            }
        }
        let page = BulkMemory.pageBytes
        // Nothing left: a small buffer, as an idle connection keeps it.
        let capacity = buffer.readableBytes == 0 ? 4096 : max(Self.restMinimumBytes, needed + (dataOffset == nil ? 0 : page))
        var rest = allocator.buffer(capacity: capacity)
        if let dataOffset {
            let base = rest.withVeryUnsafeMutableBytes { Int(bitPattern: $0.baseAddress) }
            let shift = (page - (base + dataOffset) % page) % page
            rest.moveWriterIndex(forwardBy: shift)
            rest.moveReaderIndex(forwardBy: shift)
        }
        movedBytes += buffer.readableBytes
        rest.writeBuffer(&buffer)
        buffer = rest
    }

    /// For the unfinished frame at the buffer's start, `frameBytes` long in all (length prefix
    /// included): where its bulk data starts, counted from the frame's first byte, or nil when it
    /// has no bulk data to place or not enough of it is in to tell.
    private func bulkDataStart(frameBytes: Int) -> Int? {
        guard let bulkDataOffset else { return nil }
        let start = WireCodec.lengthPrefixBytes + WireCodec.headerBytes
        guard buffer.readableBytes >= start else { return nil }
        return buffer.withUnsafeReadableBytes { raw -> Int? in
            guard let header = try? WireCodec.decodeHeader(UnsafeRawBufferPointer(rebasing: raw[WireCodec.lengthPrefixBytes..<start])),
                  let offset = bulkDataOffset(header, frameBytes - start, UnsafeRawBufferPointer(rebasing: raw[start...])) else {
                return nil
            }
            return start + offset
        }
    }
}
