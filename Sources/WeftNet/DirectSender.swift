#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import NIOCore
import Synchronization
import WeftProto

/// Writes frames on a connection's socket from the calling thread (SPEC.md §4, Direct sends).
///
/// Guarantees: `send` never blocks on the network; frames leave whole, in the order their
/// callers took the lock, never interleaved; bytes the socket does not take at once go to the
/// channel's write queue, and every later frame follows them there until that queue is empty;
/// after `close` (or a send error, which closes the channel) frames are dropped; the duplicate
/// descriptor is closed exactly once, never while a sender uses it.
final class DirectSender: @unchecked Sendable {
    private let lock = PthreadMutex()
    private let channel: Channel
    /// A duplicate of the channel's socket; -1 once closed. Guarded by `lock`.
    private var descriptor: Int32
    /// Bytes handed to the channel and not yet written by it: raised under `lock`, lowered by
    /// the event loop as the channel writes them (without the lock, so that no loop code ever
    /// waits for a sender). A sender that reads 0 knows every queued byte is on the socket.
    private let queuedBytes = Atomic<Int>(0)
    /// `close()` came while a sender held the lock: the sender closes the descriptor as it lets go.
    private let closePending = Atomic<Bool>(false)
    /// How long `send(_:blocks:)` and `send(_:payload:)` wait for a full socket to take more of
    /// a span or a payload before they put the rest in a buffer for the write queue.
    private let spanWaitMaxNs: UInt64

    /// What `send(_:blocks:)` did with a span.
    struct SpanSend {
        /// The errno of a read of the file that failed after the head went out (0 if none).
        var readError: Int32 = 0
        /// Bytes that went from the file to the socket with `sendfile`.
        var sentFromFile = 0
        /// Bytes read into a buffer (the socket was full, or `sendfile` could not go on).
        var copied = 0
        /// Bytes sent straight from the hub's read cache (`StoredBlocks.memory`); the rest of such
        /// a span counts as `copied` (queued, or dropped with a closed connection).
        var fromMemory = 0
    }

    /// Takes ownership of `descriptor`, a duplicate of `channel`'s socket; closes it when the
    /// channel closes.
    init(descriptor: Int32, channel: Channel, spanWaitMaxNs: UInt64 = 100_000_000) {
        self.descriptor = descriptor
        self.channel = channel
        self.spanWaitMaxNs = spanWaitMaxNs
        channel.closeFuture.whenComplete { [self] _ in close() }
    }

    /// Sends `frame`: directly if the channel has nothing queued, else (and for whatever the
    /// socket does not take now) through the channel.
    func send(_ frame: ByteBuffer) {
        var failure: Int32 = 0
        lock.lock()
        if isOpenLocked { failure = sendOrQueueLocked(frame) }
        unlockClosingIfPending()
        if failure != 0 {
            // Closing the channel ends the connection (the hub's reading threads, or the agent's
            // event loop, would see the error later); waiters fail at once.
            channel.close(promise: nil)
        }
    }

    /// Sends a frame made of `head`, then `blocks`' file span, then a 4-byte trailer (SPEC.md §4,
    /// Stored-block reads): the span goes from the file to the socket with `sendfile`, and what
    /// the socket does not take at once is read into a buffer and queued, like the rest of any
    /// frame. A read of the file that fails after the head went out sends the rest of the span
    /// as zeros, with the errno in the trailer; that errno is returned (0 otherwise).
    @discardableResult
    func send(_ head: ByteBuffer, blocks: StoredBlocks) -> SpanSend {
        if let memory = blocks.memory {
            // The span and its zero trailer are in the hub's read cache (SPEC.md §4, Hub read cache).
            let direct = withExtendedLifetime(blocks.keepAlive) { send(head, payload: memory) }
            let fromMemory = min(direct, blocks.byteCount)
            return SpanSend(copied: blocks.byteCount - fromMemory, fromMemory: fromMemory)
        }
        // Start reading the span from disk before taking the lock: `sendfile` waits for the
        // disk under it, and other frames of the connection would wait with it. Started here,
        // concurrent requests' reads overlap.
        _ = posix_fadvise(blocks.descriptor, off_t(blocks.fileOffset), off_t(blocks.byteCount), POSIX_FADV_WILLNEED)
        var failure: Int32 = 0
        var outcome = SpanSend()
        var behindQueue = queuedBytes.load(ordering: .acquiring) > 0
        if !behindQueue {
            lock.lock()
            defer { unlockClosingIfPending() }
            guard isOpenLocked else { return outcome }
            // Frames queued since the check above: this one goes behind them, read outside the lock.
            behindQueue = queuedBytes.load(ordering: .acquiring) > 0
            if !behindQueue {
                var head = head
                var sent = 0
                failure = sendDirectLocked(&head, more: true)
                if failure == 0 && head.readableBytes == 0 { (sent, failure) = sendFileLocked(blocks) }
                outcome.sentFromFile = sent
                if failure == 0 && isOpenLocked {   // (closed while it waited: dropped with the connection)
                    // The rest: what the socket did not take of the head and the span, and the trailer.
                    var rest = channel.allocator.buffer(capacity: head.readableBytes + blocks.byteCount - sent
                                                        + WireCodec.storedBlocksTrailerBytes)
                    rest.writeBuffer(&head)
                    outcome.copied = blocks.byteCount - sent
                    outcome.readError = readSpan(blocks, from: sent, into: &rest)
                    rest.writeInteger(outcome.readError, endianness: .little)
                    failure = sendOrQueueLocked(rest)
                }
            }
        }
        if behindQueue {
            // Everything goes through the queue anyway: read the span without holding up the
            // connection's other senders, then send (or queue) the whole frame.
            var frame = channel.allocator.buffer(capacity: head.readableBytes + blocks.byteCount
                                                 + WireCodec.storedBlocksTrailerBytes)
            var head = head
            frame.writeBuffer(&head)
            outcome.copied = blocks.byteCount
            outcome.readError = readSpan(blocks, from: 0, into: &frame)
            frame.writeInteger(outcome.readError, endianness: .little)
            lock.lock()
            if isOpenLocked { failure = sendOrQueueLocked(frame) }
            unlockClosingIfPending()
        }
        if failure != 0 { channel.close(promise: nil) }
        return outcome
    }

    /// Sends a frame made of `head` and then `payload`, caller memory that is read only during
    /// the call (SPEC.md §4, Bulk transfers): straight from that memory while the socket takes
    /// it, waiting up to `spanWaitMaxNs` for a full socket; what is left is copied into a buffer
    /// and queued, like the rest of any frame. Behind queued frames the whole frame is copied and
    /// queued. Returns the payload bytes that went from `payload` to the socket.
    @discardableResult
    func send(_ head: ByteBuffer, payload: UnsafeRawBufferPointer) -> Int {
        var failure: Int32 = 0
        var sentFromMemory = 0
        var behindQueue = queuedBytes.load(ordering: .acquiring) > 0
        if !behindQueue {
            lock.lock()
            defer { unlockClosingIfPending() }
            guard isOpenLocked else { return 0 }
            behindQueue = queuedBytes.load(ordering: .acquiring) > 0
            if !behindQueue {
                var head = head
                failure = sendDirectLocked(&head, more: !payload.isEmpty)
                if failure == 0 && head.readableBytes == 0 { (sentFromMemory, failure) = sendMemoryLocked(payload) }
                // (Closed while it waited: the frame is dropped with the connection.)
                if failure == 0 && isOpenLocked && (head.readableBytes > 0 || sentFromMemory < payload.count) {
                    var rest = channel.allocator.buffer(capacity: head.readableBytes + payload.count - sentFromMemory)
                    rest.writeBuffer(&head)
                    rest.writeBytes(UnsafeRawBufferPointer(rebasing: payload[sentFromMemory...]))
                    failure = sendOrQueueLocked(rest)
                }
            }
        }
        if behindQueue {
            var frame = channel.allocator.buffer(capacity: head.readableBytes + payload.count)
            var head = head
            frame.writeBuffer(&head)
            frame.writeBytes(payload)
            lock.lock()
            if isOpenLocked { failure = sendOrQueueLocked(frame) }
            unlockClosingIfPending()
        }
        if failure != 0 { channel.close(promise: nil) }
        return sentFromMemory
    }

    /// Sends `payload` from memory while the socket takes it, waiting for a full socket as
    /// `waitWritableLocked` allows. Returns the bytes sent and a connection failure (0 if none).
    private func sendMemoryLocked(_ payload: UnsafeRawBufferPointer) -> (Int, Int32) {
        var sent = 0
        let startNs = MonotonicClock.nowNs()
        while sent < payload.count {
            let count = Glibc.send(descriptor, payload.baseAddress! + sent, payload.count - sent,
                                   Int32(MSG_DONTWAIT | MSG_NOSIGNAL))
            if count > 0 {
                sent += count
                continue
            }
            let error = count == 0 ? EAGAIN : errno
            if error == EINTR { continue }
            if error == EAGAIN || error == EWOULDBLOCK {
                if let done = afterFullSocketLocked(sent: sent, since: startNs) { return done }
                continue
            }
            return (sent, error)
        }
        return (sent, 0)
    }

    /// After a send of `sent` bytes so far met a full socket: nil when the socket takes more now
    /// (send again), else what the send loop returns (gave up: no failure; the socket failed).
    private func afterFullSocketLocked(sent: Int, since startNs: UInt64) -> (Int, Int32)? {
        switch waitWritableLocked(since: startNs) {
        case .writable: return nil
        case .gaveUp: return (sent, 0)
        case .failed(let failure): return (sent, failure)
        }
    }

    private enum WaitOutcome {
        case writable
        case gaveUp
        case failed(Int32)
    }

    /// Waits for the full socket to take more, at most until `spanWaitMaxNs` after `startNs`, and
    /// not once `close()` has come. Call with `lock` held.
    private func waitWritableLocked(since startNs: UInt64) -> WaitOutcome {
        while true {
            let waitedNs = MonotonicClock.nowNs() - startNs
            guard waitedNs < spanWaitMaxNs, !closePending.load(ordering: .acquiring) else { return .gaveUp }
            var watch = pollfd(fd: descriptor, events: Int16(POLLOUT), revents: 0)
            let ms = Int32(max(1, (spanWaitMaxNs - waitedNs) / 1_000_000))
            let ready = poll(&watch, 1, ms)
            if ready < 0 && errno == EINTR { continue }
            if ready > 0 && watch.revents & Int16(POLLERR | POLLHUP) != 0 { return .failed(EPIPE) }
            return ready > 0 ? .writable : .gaveUp
        }
    }

    /// Sends what the socket takes of `buffer` now (`more`: more of the frame follows at once).
    /// Returns a send error other than EAGAIN, else 0. Call with `lock` held.
    private func sendDirectLocked(_ buffer: inout ByteBuffer, more: Bool = false) -> Int32 {
        let flags = Int32(MSG_DONTWAIT | MSG_NOSIGNAL) | (more ? Int32(MSG_MORE) : 0)
        while buffer.readableBytes > 0 {
            let sent = buffer.withUnsafeReadableBytes { raw in Glibc.send(descriptor, raw.baseAddress, raw.count, flags) }
            if sent >= 0 {
                buffer.moveReaderIndex(forwardBy: sent)
                continue
            }
            let error = errno
            if error == EINTR { continue }
            return error == EAGAIN || error == EWOULDBLOCK ? 0 : error
        }
        return 0
    }

    /// `sendfile` of `blocks`' span while the socket takes it. Returns the bytes sent and a
    /// connection failure (0 if none). Stops early, without a failure, when the socket is full
    /// or `sendfile` cannot go on (refused, the file ends early, a read error): the caller
    /// reads the rest itself, which tells a read error apart.
    private func sendFileLocked(_ blocks: StoredBlocks) -> (Int, Int32) {
        var offset = off_t(blocks.fileOffset)
        var sent = 0
        let startNs = MonotonicClock.nowNs()
        while sent < blocks.byteCount {
            let count = Glibc.sendfile(descriptor, blocks.descriptor, &offset, blocks.byteCount - sent)
            if count > 0 {
                sent += count
                continue
            }
            if count == 0 { break }   // the file ends early: `readSpan` says so
            let error = errno
            if error == EINTR { continue }
            if error == EAGAIN || error == EWOULDBLOCK {
                if let done = afterFullSocketLocked(sent: sent, since: startNs) { return done }
                continue
            }
            // The file's side (a read error, a file system that cannot splice): `readSpan`
            // reads the rest and tells a read error apart. Anything else is the socket's.
            if [EIO, EINVAL, ENOSYS, EOVERFLOW, ENOMEM, ENODATA].contains(error) { break }
            return (sent, error)
        }
        return (sent, 0)
    }

    /// Appends `blocks`' span from byte `from` on to `buffer`, read with `pread`; on a read error
    /// or a file that ends early, zeros for the rest. Returns that errno (0 if none).
    private func readSpan(_ blocks: StoredBlocks, from: Int, into buffer: inout ByteBuffer) -> Int32 {
        let count = blocks.byteCount - from
        guard count > 0 else { return 0 }
        var readError: Int32 = 0
        buffer.writeWithUnsafeMutableBytes(minimumWritableBytes: count) { free in
            var done = 0
            while done < count {
                let got = pread(blocks.descriptor, free.baseAddress! + done, count - done,
                                off_t(blocks.fileOffset + from + done))
                if got > 0 {
                    done += got
                    continue
                }
                if got < 0 && errno == EINTR { continue }
                readError = got == 0 ? EIO : errno
                (free.baseAddress! + done).initializeMemory(as: UInt8.self, repeating: 0, count: count - done)
                break
            }
            return count
        }
        return readError
    }

    /// Sends `frame` directly if nothing is queued, and queues what the socket does not take.
    /// Returns a send error (the caller closes the channel), else 0. Call with `lock` held.
    private func sendOrQueueLocked(_ frame: ByteBuffer) -> Int32 {
        var frame = frame
        if queuedBytes.load(ordering: .acquiring) == 0 {
            let failure = sendDirectLocked(&frame)
            if frame.readableBytes == 0 || failure != 0 { return failure }
        }
        let count = frame.readableBytes
        queuedBytes.add(count, ordering: .releasing)
        // Always through the loop's task queue, also from the loop itself: frames queued by
        // other threads before this one are written first, and no NIO code runs under `lock`.
        let channel = self.channel
        let frameToQueue = frame
        channel.eventLoop.execute { [self] in
            let promise = channel.eventLoop.makePromise(of: Void.self)
            promise.futureResult.whenComplete { [self] result in
                // A failed write (the channel closing cancels the queue) ends direct sends first:
                // a sender that sees the count drop sees this too.
                if case .failure = result { closePending.store(true, ordering: .sequentiallyConsistent) }
                queuedBytes.subtract(count, ordering: .releasing)
                if case .failure = result { closeIfPendingAndFree() }
            }
            channel.writeAndFlush(frameToQueue, promise: promise)
        }
        return 0
    }

    /// Closes the duplicate descriptor; later frames are dropped. Idempotent. Never waits for a
    /// sender (it runs on the event loop, as the channel closes): while one holds the lock (a
    /// stored-block send may wait for the disk or, up to `spanWaitMaxNs`, for the socket), the
    /// last holder to let go closes it ("last one out": each holder looks at the flag again
    /// after it unlocks, so a close that came between its look and its unlock is not missed).
    func close() {
        closePending.store(true, ordering: .sequentiallyConsistent)
        closeIfPendingAndFree()
    }

    private func closeIfPendingAndFree() {
        atomicMemoryFence(ordering: .sequentiallyConsistent)
        guard closePending.load(ordering: .sequentiallyConsistent) else { return }
        // Busy: its holder runs this again after it unlocks.
        if pthread_mutex_trylock(lock.raw) == 0 {
            closeLocked()
            lock.unlock()
        }
    }

    private func closeLocked() {
        guard descriptor >= 0 else { return }
        Glibc.close(descriptor)
        descriptor = -1
    }

    /// True while frames may go on the socket: not closed, and no queued write failed (NIO
    /// cancels the queue as the channel closes, so the queue's count drops to 0 while part of a
    /// frame may be on the wire: a frame sent then would follow a half-written one). Under `lock`.
    private var isOpenLocked: Bool {
        descriptor >= 0 && !closePending.load(ordering: .sequentiallyConsistent)
    }

    /// Releases `lock`, closing the descriptor first if `close()` came meanwhile, and again
    /// after, for a `close()` that came between the look and the unlock.
    private func unlockClosingIfPending() {
        if closePending.load(ordering: .sequentiallyConsistent) { closeLocked() }
        lock.unlock()
        closeIfPendingAndFree()
    }
}
