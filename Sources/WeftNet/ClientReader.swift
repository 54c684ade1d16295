#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import Foundation
import NIOCore
import NIOPosix
import WeftProto

/// Reads one hub connection of an agent on a thread of its own (SPEC.md §4, Agent reading
/// thread): frames go to `RemoteHub.deliver` in order, as the event loop handed them before, and
/// the bulk bytes of a large reply whose caller waits with a `BulkSink` are received straight
/// into the caller's memory, with no copy in user space.
///
/// Guarantees: one thread reads the socket; a caller's memory is written only while its request
/// is pending and marked `receiving` (`RemoteHub.writing`), so a caller that stops waiting never
/// has its memory written after it returned; when the stream ends (end of file, an error, a
/// malformed frame, or `stop()`), the connection is reported lost and the channel closed, and the
/// reading descriptor is closed exactly once, by this thread.
final class ClientReader: @unchecked Sendable {
    /// Most bytes read at once into the frame buffer: a large reply is received into its
    /// caller's memory once its head is in, so at most this much of it is copied.
    static let receiveMaxBytes = 64 * 1024
    /// Frames at least this long go straight into their caller's memory.
    static let directMinBytes = 128 * 1024
    /// Most bytes one `recv` writes into a caller's memory (a caller that gives up waits at most
    /// for one such read).
    static let directPieceBytes = 1 << 20

    private static let readingThread = ThreadSpecificVariable<ClientReader>()

    /// True on a reading thread of `hub`: a call to it there would wait for a reply only that
    /// thread reads.
    static func isReading(for hub: RemoteHub) -> Bool { readingThread.currentValue?.hub === hub }

    /// The reader whose thread this is, if any.
    static var current: ClientReader? { readingThread.currentValue }

    let hub: RemoteHub
    private let connection: ClientConnection
    private let allocator: ByteBufferAllocator
    private let lock = PthreadMutex()
    /// The reading duplicate of the socket; -1 once closed. Guarded by `lock`.
    private var descriptor: Int32
    /// `stop()` came: the channel is closing already. Guarded by `lock`.
    private var stopping = false
    /// The thread has ended (or never started). Guarded by `lock`.
    private var done = true
    private let ended = ConditionVariable()

    /// Takes ownership of `descriptor`, a duplicate of the connection's socket for reading.
    init(descriptor: Int32, hub: RemoteHub, connection: ClientConnection, allocator: ByteBufferAllocator) {
        self.descriptor = descriptor
        self.hub = hub
        self.connection = connection
        self.allocator = allocator
    }

    func start() {
        lock.withLock { done = false }
        let thread = Thread { [self] in run() }
        thread.name = "weft-hub-reader"
        thread.start()
    }

    /// Makes the reading thread find the end of the stream (the channel closed): the socket's
    /// read side is shut down, so what it holds is still read, then end of file.
    func stop() {
        lock.withLock {
            stopping = true
            if descriptor >= 0 { _ = shutdown(descriptor, Int32(SHUT_RD)) }
        }
    }

    /// Waits until the thread has ended, at most `timeoutMs`; false if it has not.
    @discardableResult
    func waitUntilDone(timeoutMs: Int) -> Bool {
        let deadline = MonotonicClock.deadlineNs(afterMs: timeoutMs)
        return lock.withLock {
            while !done {
                if !ended.wait(lock, deadlineNs: deadline) { return done }
            }
            return true
        }
    }

    private func run() {
        Self.readingThread.currentValue = self
        let fd = lock.withLock { descriptor }
        var reader = FrameReader(allocator: allocator, reserveWhole: false)
        var why = "end of file"
        reading: while true {
            if let failure = FrameReader.waitReadable(fd) {
                why = failure
                break
            }
            let (_, end) = reader.receive(fd, maxBytes: Self.receiveMaxBytes)
            do {
                for frame in try reader.frames() {
                    guard hub.deliver(frame, on: connection) else {
                        why = "a frame the agent cannot take"
                        break reading
                    }
                }
                if let end {
                    why = end
                    break
                }
                if let partial = try reader.partialFrame(), let end = receive(partial, &reader, fd) {
                    why = end
                    break
                }
            } catch {
                hub.logger.error("closing hub connection: malformed frame",
                                 metadata: ["hub": "\(hub.address)", "problem": "\(error)"])
                why = "malformed frame"
                break
            }
        }
        hub.logger.debug("hub connection read to its end", metadata: ["hub": "\(hub.address)", "why": "\(why)"])
        hub.connectionLost(connection)
        // Unless the channel is closing already (it stopped this thread), close it: the hub went.
        if !lock.withLock({ stopping }) { connection.channel?.close(promise: nil) }
        lock.withLock {
            Glibc.close(descriptor)
            descriptor = -1
            done = true
            ended.broadcast()
        }
        hub.readerEnded(self)
    }

    /// The frame whose start is buffered: a large reply with a sink is received into its caller's
    /// memory; any other frame gets room to arrive whole. Returns why the stream ended, or nil.
    private func receive(_ partial: (length: Int, header: FrameHeader, buffered: Int), _ reader: inout FrameReader,
                         _ fd: Int32) -> String? {
        let total = WireCodec.lengthPrefixBytes + partial.length
        guard partial.length >= Self.directMinBytes, partial.header.kind == .response,
              let (waiter, sink) = hub.sink(for: partial.header, on: connection) else {
            reader.reserve(total - partial.buffered)
            return nil
        }
        let start = WireCodec.lengthPrefixBytes + WireCodec.headerBytes
        // The payload's head: status and count, and for stored blocks the entries.
        var headBytes = 8
        var tailBytes = 0
        if sink.shape == .storedBlocks {
            if let end = reader.fill(fd, to: start + 12) { return end }
            let count = Int(reader.withBuffered(from: start + 8, count: 4) { Self.u32($0) })
            guard count <= StoredBlocks.countMax else {
                reader.reserve(total - partial.buffered)
                return nil
            }
            headBytes = 12 + count * StoredBlockEntry.encodedBytes + 4
            tailBytes = WireCodec.storedBlocksTrailerBytes
        }
        if let end = reader.fill(fd, to: start + headBytes) { return end }
        let head = reader.peek(from: start, count: headBytes)
        let status = head.withUnsafeBytes { Int32(bitPattern: Self.u32(UnsafeRawBufferPointer(rebasing: $0[0..<4]))) }
        let bulk = head.withUnsafeBytes { Int(Self.u32(UnsafeRawBufferPointer(rebasing: $0[(headBytes - 4)...]))) }
        let fits = sink.shape == .bytes ? bulk == sink.destination.count : bulk <= sink.destination.count
        guard status == 0, fits, WireCodec.headerBytes + headBytes + bulk + tailBytes == partial.length else {
            // Not what the sink takes (an error, a size the caller did not ask for): the frame
            // arrives whole and goes the ordinary way, which answers or rejects it.
            reader.reserve(total - partial.buffered)
            return nil
        }
        reader.consume(start + headBytes)
        // Bulk bytes already read with the head, then the rest straight from the socket.
        var done = min(bulk, reader.bufferedBytes)
        if done > 0 {
            _ = hub.writing(into: waiter, id: partial.header.requestID, on: connection) {
                reader.withBuffered(from: 0, count: done) {
                    sink.destination.baseAddress!.copyMemory(from: $0.baseAddress!, byteCount: done)
                }
            }
            reader.consume(done)
        }
        var discard: UnsafeMutableRawBufferPointer?
        defer { discard?.deallocate() }
        while done < bulk {
            let piece = min(bulk - done, Self.directPieceBytes)
            var got = 0
            var failure: Int32 = 0
            let live = hub.writing(into: waiter, id: partial.header.requestID, on: connection) {
                got = recv(fd, sink.destination.baseAddress! + done, piece, Int32(MSG_DONTWAIT))
                if got < 0 { failure = errno }
            }
            if !live {
                // The caller stopped waiting: read the rest of its bytes into scratch memory.
                if discard == nil { discard = .allocate(byteCount: Self.receiveMaxBytes, alignment: 16) }
                got = recv(fd, discard!.baseAddress, min(piece, discard!.count), Int32(MSG_DONTWAIT))
                if got < 0 { failure = errno }
            }
            if got > 0 {
                done += got
                continue
            }
            if got == 0 { return "end of file" }
            if failure == EINTR { continue }
            guard failure == EAGAIN || failure == EWOULDBLOCK else { return String(cString: strerror(failure)) }
            if let end = FrameReader.waitReadable(fd) { return end }
        }
        if let end = reader.fill(fd, to: tailBytes) { return end }
        let tail = reader.peek(from: 0, count: tailBytes)
        reader.consume(tailBytes)
        hub.finishDirect(waiter, header: partial.header, head: head, tail: tail, on: connection)
        return nil
    }

    private static func u32(_ bytes: UnsafeRawBufferPointer) -> UInt32 {
        UInt32(littleEndian: bytes.loadUnaligned(as: UInt32.self))
    }
}
