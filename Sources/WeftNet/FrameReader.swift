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

    /// Every whole frame read so far, in order. What remains (part of one frame) moves to a buffer
    /// of its own, with room for the whole frame, so that reading on never copies the frames
    /// handed out (they share the old buffer's storage). Throws EPROTO for a bad length, version
    /// or kind, checked as soon as the length's 4 bytes are in.
    mutating func frames() throws -> [InboundFrame] {
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
