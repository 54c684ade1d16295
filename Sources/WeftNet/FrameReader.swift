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
    private var buffer: ByteBuffer
    private let allocator: ByteBufferAllocator

    init(allocator: ByteBufferAllocator) {
        self.allocator = allocator
        self.buffer = allocator.buffer(capacity: 4096)
    }

    /// Reads what the socket `descriptor` has now, without waiting, up to `maxBytes`. Returns the
    /// bytes read and, if the stream ended (end of file or an error), why.
    mutating func receive(_ descriptor: Int32, maxBytes: Int) -> (count: Int, end: String?) {
        var total = 0
        while total < maxBytes {
            if buffer.writableBytes < 16 * 1024 {
                buffer.reserveCapacity(minimumWritableBytes: 64 * 1024)
            }
            var failure: Int32 = 0
            let count = buffer.writeWithUnsafeMutableBytes(minimumWritableBytes: 0) { free -> Int in
                let count = recv(descriptor, free.baseAddress, min(free.count, maxBytes - total), Int32(MSG_DONTWAIT))
                if count < 0 { failure = errno }
                return max(count, 0)
            }
            if count > 0 {
                total += count
                continue
            }
            if failure == 0 { return (total, "end of file") }
            if failure == EINTR { continue }
            if failure == EAGAIN || failure == EWOULDBLOCK { break }
            return (total, String(cString: strerror(failure)))
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
    /// of its own, with room for the whole frame, so that reading on never copies the frames
    /// handed out (they share the old buffer's storage). Throws EPROTO for a bad length, version
    /// or kind, checked as soon as the length's 4 bytes are in. Without `reserveWhole` no room is
    /// made for a frame that has not fully arrived (the caller may receive it elsewhere, or calls
    /// `reserve`).
    mutating func frames(reserveWhole: Bool = true) throws -> [InboundFrame] {
        var frames: [InboundFrame] = []
        var needed = 0
        while let rawLength = buffer.getInteger(at: buffer.readerIndex, endianness: .little, as: UInt32.self) {
            let total = WireCodec.lengthPrefixBytes + (try WireCodec.checkedLength(rawLength))
            guard buffer.readableBytes >= total else {
                needed = total
                break
            }
            guard let frame = try FrameDecoder.nextFrame(from: &buffer) else { break }
            frames.append(frame)
        }
        if !reserveWhole { needed = 0 }
        guard !frames.isEmpty else {
            if needed > buffer.readableBytes { buffer.reserveCapacity(minimumWritableBytes: needed - buffer.readableBytes) }
            return []
        }
        var rest = allocator.buffer(capacity: max(4096, needed))
        rest.writeBuffer(&buffer)
        buffer = rest
        return frames
    }
}
